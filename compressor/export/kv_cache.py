"""Decoders with a key/value cache: the ONNX file a generation loop runs, one new token per call.

    path = export_kv_onnx(model, "out/model_kv.onnx")      # a Hugging Face *ForCausalLM
    check = check_generation(path, model, prompt_token_ids(tokenizer, GENERATION_PROMPTS))
    print(format_generation(check))                         # same 32 greedy tokens as torch on each prompt?

The file follows the layout Optimum and onnxruntime-genai use for decoder-only models:

    inputs   input_ids                   [batch_size, sequence_length]                       int64
             attention_mask              [batch_size, total_sequence_length]                 int64 (1 real, 0 pad)
             position_ids                [batch_size, sequence_length]  (if forward() takes them)  int64
             past_key_values.{i}.key     [batch_size, num_kv_heads, past_sequence_length, head_dim]
             past_key_values.{i}.value   (the same)
    outputs  logits                      [batch_size, sequence_length, vocab]
             present.{i}.key / .value    [batch_size, num_kv_heads, total_sequence_length, head_dim]

with ``total_sequence_length = past_sequence_length + sequence_length``. The first call (the prompt) gets
past tensors of length 0; each later call gets the previous call's presents and the new token.

Every layer's cache holds every past position, sliding-window layers (Gemma 3) included: the attention mask
the model builds keeps the window, so the graph computes what the model computes at any length, and every
layer's past has one shape (what the runtimes expect). The cache is transformers' own ``DynamicCache``,
filled from the flat past tensors inside a thin wrapper (:class:`KVCacheModel`), so the exported graph is the
model's own attention code; a factored layer stays two MatMuls as in ``model.onnx``.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.export.measure import file_size
from compressor.export.onnx import DEFAULT_OPSET, EXPORTERS, check_opset, export_in_turn
from compressor.export.onnx_files import EXTERNAL_DATA_BYTES
from compressor.formats.runtime import session

# Tokens generated per prompt, and prompts, for the greedy comparison (issue: 32 tokens on 10 prompts).
NEW_TOKENS = 32
PROMPTS = 10
# A prompt is its text's first tokens at most: generation, not the prompt, is what is compared.
PROMPT_TOKENS = 32
# Used when the run has no text of its own (no --eval-text, no text --calibration): plain English prompts
# of several kinds (prose, a list, code, a question), so that greedy decoding has different things to do.
GENERATION_PROMPTS = (
    "The history of the printing press begins in",
    "To make a good cup of tea, first",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three largest planets in the solar system are",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
    "The main difference between a list and a tuple in Python is",
    "Low-rank factorization replaces each large weight matrix by",
    "Dear colleagues, I am writing to let you know that",
    "The recipe calls for two cups of flour, one egg and",
)
# Names of the axes that change between calls (the static ones, heads and head size, keep their numbers).
AXES = {"batch": "batch_size", "sequence": "sequence_length", "past": "past_sequence_length",
        "total": "total_sequence_length"}


@dataclass
class KVLayout:
    """What a cached decoder's ONNX file takes and returns (see the module docstring)."""

    layers: int
    kv_heads: int
    head_dim: int
    position_ids: bool  # the model's forward() takes position_ids, so the file does too
    cache_arg: str  # the forward() argument that takes the cache ("cache", or "past_key_values" before 5.x)

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", *(["position_ids"] if self.position_ids else []), *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names]

    def axes(self, name: str) -> dict[int, str]:
        """The dynamic axes of input or output ``name`` (keys of :data:`AXES`)."""
        if name in ("input_ids", "position_ids", "logits"):
            return {0: "batch", 1: "sequence"}
        if name == "attention_mask":
            return {0: "batch", 1: "total"}
        return {0: "batch", 2: "past" if name.startswith("past_key_values.") else "total"}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "inputs": self.input_names, "outputs": self.output_names}


def _cache_arg(model: nn.Module) -> str | None:
    params = inspect.signature(model.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _returned_cache(out: Any) -> Any:
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else getattr(
        out, "past_key_values", None)


def _cache_layers(cache: Any, layers: int) -> list[torch.Tensor]:
    """``[key 0, value 0, key 1, ...]`` of a transformers cache, every layer's full length."""
    return [t for layer in cache.layers[:layers] for t in (layer.keys, layer.values)]


@torch.no_grad()
def kv_layout(model: nn.Module) -> KVLayout:
    """The cache layout of a Hugging Face causal LM, read from the cache it returns on two tokens (so it is
    what the model does, whatever its config calls the sizes); :class:`CompressorError` if it has none."""
    arg = _cache_arg(model)
    config = getattr(model, "config", None)
    if arg is None or config is None or getattr(config, "is_encoder_decoder", False):
        raise CompressorError(f"{type(model).__name__} is not a causal language model that takes a key/value cache "
                              "(a Hugging Face *ForCausalLM)", "export it without a key/value cache",
                              cli_fix="leave out --kv-cache")
    layers = config.get_text_config(decoder=True).num_hidden_layers
    ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        cache = _returned_cache(model(input_ids=ids, use_cache=True))
    finally:
        model.train(was_training)
    if cache is None or len(getattr(cache, "layers", ())) < layers:
        raise CompressorError(f"{type(model).__name__} returns no key/value cache of {layers} layers",
                              "export it without a key/value cache", cli_fix="leave out --kv-cache")
    shapes = {tuple(t.shape) for t in _cache_layers(cache, layers)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise CompressorError(f"{type(model).__name__}'s cache layers differ in shape ({sorted(shapes)}); the "
                              "one-shape [batch, heads, sequence, head_dim] layout cannot hold them",
                              "export it without a key/value cache", cli_fix="leave out --kv-cache")
    _, heads, _, head_dim = next(iter(shapes))
    return KVLayout(layers, heads, head_dim, "position_ids" in inspect.signature(model.forward).parameters, arg)


class KVCacheModel(nn.Module):
    """``model`` called with flat past tensors (filled into transformers' ``DynamicCache``, every layer a full
    one) and returning ``(logits, present.0.key, present.0.value, ...)``: what :func:`export_kv_onnx` exports."""

    def __init__(self, model: nn.Module, layout: KVLayout):
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        position_ids, past = (rest[0], rest[1:]) if self.layout.position_ids else (None, rest)
        cache = DynamicCache()  # no config: full layers only, the sliding window is the mask's job
        for i in range(self.layout.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs = {"position_ids": position_ids} if self.layout.position_ids else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{self.layout.cache_arg: cache}, **kwargs)
        return (out.logits, *_cache_layers(_returned_cache(out), self.layout.layers))


def example_feed(layout: KVLayout, *, batch: int = 2, past: int = 3, sequence: int = 2,
                 dtype: torch.dtype = torch.float32, vocab: int = 2) -> list[torch.Tensor]:
    """Inputs in :attr:`KVLayout.input_names` order: random tokens after ``past`` cached positions."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randint(0, vocab, (batch, sequence), generator=g),
               torch.ones(batch, past + sequence, dtype=torch.long)]
    if layout.position_ids:
        tensors.append(torch.arange(past, past + sequence).expand(batch, -1).contiguous())
    shape = (batch, layout.kv_heads, past, layout.head_dim)
    return tensors + [torch.randn(shape, generator=g).to(dtype) for _ in layout.past_names]


def export_kv_onnx(model: nn.Module, path: str | Path, *, opset: int | None = None, exporter: str = "auto"
                   ) -> Path:
    """Export the causal LM ``model`` with a key/value cache to ``path`` (atomically; layout in the module
    docstring) and return the path. ``exporter``: "dynamo", "legacy" or "auto" (dynamo, then legacy if
    dynamo cannot capture the model), as :func:`compressor.export.onnx.export_onnx`."""
    import onnx

    opset = check_opset(DEFAULT_OPSET if opset is None else opset)
    if exporter not in EXPORTERS:
        raise CompressorError(f"unknown exporter '{exporter}'", "use 'auto', 'dynamo' or 'legacy'")
    layout = kv_layout(model)
    wrapper = KVCacheModel(model, layout).eval()
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    vocab = model.get_input_embeddings().num_embeddings
    # Every dynamic size at least 2 and all different: torch.export specializes sizes 0 and 1.
    args = tuple(t.to(next(model.parameters()).device) for t in example_feed(layout, dtype=dtype, vocab=vocab))
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    path = Path(path)

    def write(how: str, target: Path) -> None:
        with torch.no_grad():
            _export_with(how, wrapper, args, target, layout, opset, external)
        proto = onnx.load(str(target), load_external_data=False)
        _name_axes(proto, layout)
        onnx.save(proto, str(target))

    errors = export_in_turn(path, exporter, write)
    if not errors:
        return path
    raise CompressorError(f"ONNX export of {type(model).__name__} with a key/value cache failed ({'; '.join(errors)})",
                          "export it without a key/value cache", cli_fix="leave out --kv-cache")


def _export_with(how: str, wrapper: KVCacheModel, args: tuple, target: Path, layout: KVLayout, opset: int,
                 external: bool) -> None:
    names, out_names = layout.input_names, layout.output_names
    common = dict(input_names=names, output_names=out_names, opset_version=opset, verbose=False)
    if how == "dynamo":
        # Dim.DYNAMIC lets torch.export find that the mask's length is past + sequence itself (named Dims
        # cannot say so: a Dim plus a Dim is refused); the axes get their names in _name_axes.
        dyn = torch.export.Dim.DYNAMIC
        # As forward() takes them: input_ids, attention_mask, then the rest as one tuple (*rest).
        axes = [{a: dyn for a in layout.axes(n)} for n in names]
        shapes = (axes[0], axes[1], tuple(axes[2:]))
        program = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=shapes, external_data=external,
                                    optimize=True, **common)
        program.save(str(target), external_data=external)
    else:
        axes = {n: {a: AXES[k] for a, k in layout.axes(n).items()} for n in (*names, *out_names)}
        torch.onnx.export(wrapper, args, str(target), dynamo=False, dynamic_axes=axes, do_constant_folding=True,
                          **common)


def _name_axes(proto, layout: KVLayout) -> None:
    """Give the dynamic axes of the graph's inputs and outputs the layout's names (the dynamo exporter calls
    them s0, s1, ...); a static axis keeps its number."""
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, key in layout.axes(value.name).items():
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].dim_param = AXES[key]


def check_kv_layout(path: str | Path, layout: KVLayout) -> list[str]:
    """Problems (empty when fine) with the names, ranks and axes of a cached decoder's ONNX inputs and outputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    problems = []
    for what, values, want in (("inputs", graph.input, layout.input_names), ("outputs", graph.output,
                                                                            layout.output_names)):
        have = [v.name for v in values]
        if have != want:
            problems.append(f"{what} are {have[:5]}{' ...' if len(have) > 5 else ''}, expected {want[:5]} ...")
            continue
        for v in values:
            dims = v.type.tensor_type.shape.dim
            static = {1: layout.kv_heads, 3: layout.head_dim} if "key" in v.name or "value" in v.name else {}
            rank = 4 if static else (3 if v.name == "logits" else 2)
            if len(dims) != rank:
                problems.append(f"'{v.name}' has {len(dims)} axes, expected {rank}")
                continue
            for axis, key in layout.axes(v.name).items():
                if dims[axis].dim_param != AXES[key]:
                    problems.append(f"axis {axis} of '{v.name}' is {dims[axis].dim_value or dims[axis].dim_param!r}, "
                                    f"expected the dynamic {AXES[key]}")
            for axis, size in static.items():
                if dims[axis].dim_value != size:
                    problems.append(f"axis {axis} of '{v.name}' is {dims[axis].dim_value}, expected {size}")
    return problems


# -------------------------------------------------------------------------------- greedy generation


def prompt_token_ids(tokenizer: Any, texts: Sequence[str], *, prompts: int = PROMPTS,
                     max_tokens: int = PROMPT_TOKENS) -> list[list[int]]:
    """The first ``prompts`` non-empty texts as token ids (with the tokenizer's special tokens, e.g. Gemma's
    BOS), each cut to its first ``max_tokens`` tokens."""
    out = []
    for text in texts:
        if text.strip() and len(out) < prompts:
            ids = list(tokenizer(text.strip())["input_ids"])[:max_tokens]
            if ids:
                out.append(ids)
    if not out:
        raise CompressorError("no prompt to generate from: the text has no non-empty line",
                              "give a text with at least one non-empty line")
    return out


@torch.no_grad()
def greedy_torch(model: nn.Module, prompt: Sequence[int], new_tokens: int = NEW_TOKENS
                 ) -> tuple[list[int], np.ndarray]:
    """``new_tokens`` greedy tokens (argmax, no stopping at EOS) from the torch model with its own cache
    (transformers' default, sliding-window layers kept short), and its logits on the prompt."""
    arg = _cache_arg(model)
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(prompt)], device=device), use_cache=True)
    prompt_logits = out.logits[0].float().cpu().numpy()
    tokens = []
    for _ in range(new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]], device=device), use_cache=True,
                    **{arg: _returned_cache(out)})
    return tokens, prompt_logits


def greedy_onnx(session: Any, prompt: Sequence[int], new_tokens: int = NEW_TOKENS) -> tuple[list[int], np.ndarray]:
    """``new_tokens`` greedy tokens from a cached decoder's ONNX ``session`` (onnxruntime): the prompt with
    empty pasts, then one token a call with the previous presents; and its logits on the prompt."""
    inputs = {i.name: i for i in session.get_inputs()}
    past = {}
    for name, i in inputs.items():
        if name.startswith("past_key_values."):
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            past[name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=dtype)
    outputs = [o.name for o in session.get_outputs()]
    ids, done, tokens, prompt_logits = np.asarray([list(prompt)], dtype=np.int64), 0, [], None
    for _ in range(new_tokens):
        feed = {"input_ids": ids, "attention_mask": np.ones((1, done + ids.shape[1]), dtype=np.int64), **past}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(done, done + ids.shape[1], dtype=np.int64)[None]
        got = dict(zip(outputs, session.run(outputs, feed), strict=True))
        if prompt_logits is None:
            prompt_logits = got["logits"][0].astype(np.float32)
        tokens.append(int(got["logits"][0, -1].argmax()))
        past = {name: got["present." + name.removeprefix("past_key_values.")] for name in past}
        done += ids.shape[1]
        ids = np.asarray([[tokens[-1]]], dtype=np.int64)
    return tokens, prompt_logits


@dataclass
class GenerationCheck:
    """A cached decoder's ONNX file against the torch model, by greedy generation from each prompt.

    ``passed``: the layout is right, every prompt gave the same ``new_tokens`` tokens (``same_tokens``
    required) and/or the prompt's logits are within ``min_cosine`` of torch's (a quantized variant's rounding
    may flip a near tie, so it is held to its cosine floor and its token agreement is reported)."""

    path: str
    size_bytes: int
    variant: str
    prompts: int
    new_tokens: int
    prompt_source: str  # where the prompts came from ("built-in", or the text file's name)
    identical: int  # prompts whose generated tokens equal torch's, all of them
    first_divergence: list[int | None]  # per prompt: index of the first differing token (None: none)
    token_agreement: float  # generated tokens equal to torch's at the same index, over all prompts
    max_abs_diff: float  # of the logits on the prompts (prefill), onnxruntime vs torch
    cosine: float  # the worst over prompts of the cosine of those logits (each prompt's positions flattened)
    onnx_tokens_per_s: float  # generated tokens per second over all prompts (prefill included)
    torch_tokens_per_s: float
    threads: int | None  # onnxruntime intra-op threads (None: its default)
    same_tokens: bool  # the criterion: every prompt's tokens identical
    min_cosine: float | None  # the criterion: the logits' cosine at least this
    passed: bool = False
    problems: list[str] = field(default_factory=list)
    layout: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("max_abs_diff", "cosine"):  # JSON has no inf/nan
            d[k] = d[k] if math.isfinite(d[k]) else None
        return d


@dataclass
class TorchGeneration:
    """What the torch model generated from each prompt (:func:`greedy_torch`), and how long it took."""

    tokens: list[list[int]]
    prompt_logits: list[np.ndarray]
    seconds: float
    new_tokens: int


def torch_generation(model: nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int = NEW_TOKENS
                     ) -> TorchGeneration:
    """The torch side of :func:`check_generation`, computed once for several files of one model."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        runs = [greedy_torch(model, p, new_tokens) for p in prompts]
    finally:
        model.train(was_training)
    return TorchGeneration([r[0] for r in runs], [r[1] for r in runs], time.perf_counter() - start, new_tokens)


def check_generation(path: str | Path, model: nn.Module, prompts: Sequence[Sequence[int]], *,
                     new_tokens: int = NEW_TOKENS, same_tokens: bool = True, min_cosine: float | None = None,
                     variant: str = "fp32", prompt_source: str = "built-in", threads: int | None = None,
                     reference: TorchGeneration | None = None) -> GenerationCheck:
    """Generate ``new_tokens`` greedy tokens from every prompt (token ids) with the ONNX file at ``path`` in
    onnxruntime (CPU, ``threads`` intra-op threads) and with ``model`` in torch (or take ``reference``, the
    model's :func:`torch_generation` on these prompts), and compare (see :class:`GenerationCheck`). Failures are
    returned (``passed=False``, ``problems``), not raised."""
    path = Path(path)
    if reference is not None and (len(reference.tokens) != len(prompts) or reference.new_tokens != new_tokens):
        raise ValueError("the reference was generated from other prompts or another number of tokens")
    layout = kv_layout(model)
    check = GenerationCheck(str(path), file_size(path), variant, len(prompts), new_tokens, prompt_source, 0, [],
                            0.0, math.inf, math.nan, math.nan, math.nan, threads, same_tokens, min_cosine,
                            layout=layout.to_dict())
    check.problems += check_kv_layout(path, layout)
    try:
        sess = session(path, threads=threads)
    except Exception as err:  # onnxruntime raises its own types
        check.problems.append(f"onnxruntime cannot load the model: {str(err).strip().splitlines()[0][:300]}")
        return check
    reference = reference or torch_generation(model, prompts, new_tokens)
    onnx_s = 0.0
    diffs, cosines, agree = [], [], 0
    for prompt, want, want_logits in zip(prompts, reference.tokens, reference.prompt_logits, strict=True):
        start = time.perf_counter()
        try:
            have, have_logits = greedy_onnx(sess, prompt, new_tokens)
        except Exception as err:
            check.problems.append(f"onnxruntime failed: {str(err).strip().splitlines()[0][:300]}")
            return check
        onnx_s += time.perf_counter() - start
        diverge = next((i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b), None)
        check.first_divergence.append(diverge)
        check.identical += diverge is None
        agree += sum(a == b for a, b in zip(want, have, strict=True))
        diffs.append(float(np.max(np.abs(have_logits.astype(np.float64) - want_logits))))
        # One cosine per prompt over all its positions' logits, as validate_onnx takes one per sample: the
        # variants' floors (INT4_MIN_COSINE ...) were measured that way.
        a, b = have_logits.astype(np.float64).ravel(), want_logits.astype(np.float64).ravel()
        cosines.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300)))
    generated = len(prompts) * new_tokens
    check.token_agreement = agree / generated
    check.max_abs_diff, check.cosine = max(diffs), min(cosines)
    check.onnx_tokens_per_s, check.torch_tokens_per_s = generated / onnx_s, generated / reference.seconds
    if not math.isfinite(check.max_abs_diff):
        check.problems.append("the ONNX model produced NaN or Inf")
    if same_tokens and check.identical < len(prompts):
        check.problems.append(f"{len(prompts) - check.identical} of {len(prompts)} prompts generated other tokens "
                              f"than torch (first differences at {check.first_divergence})")
    if min_cosine is not None and not check.cosine >= min_cosine:
        check.problems.append(f"cosine {check.cosine:.6f} of the prompt logits is below {min_cosine}")
    check.passed = not check.problems
    return check


def format_generation(check: GenerationCheck | dict[str, Any]) -> str:
    """One line for the terminal."""
    c = check.to_dict() if isinstance(check, GenerationCheck) else check
    rule = (f"same {c['new_tokens']} tokens" if c["same_tokens"] else f"cosine >= {c['min_cosine']}")
    cosine = "n/a" if c["cosine"] is None or math.isnan(c["cosine"]) else f"{c['cosine']:.6f}"
    return (f"  {Path(c['path']).name:<17} {c['size_bytes'] / 1e6:.2f} MB, {c['new_tokens']} greedy tokens from "
            f"{c['prompts']} prompts: {c['identical']} identical to torch, token agreement "
            f"{c['token_agreement']:.3f}, prompt logits cosine {cosine} ({rule}): {'PASS' if c['passed'] else 'FAIL'}")
