"""Perplexity of a causal language model on a text file, by the protocol of the low-rank LLM papers
(SVD-LLM, LowRankArena): the file is tokenized once into one stream, cut into windows of ``window``
model positions that start ``stride`` stream tokens apart (by default they tile the stream without
overlap), each window optionally begins with the BOS token, and the perplexity is ``exp`` of the mean
negative log-likelihood over every predicted token.

    corpus = read_corpus("eval.txt", tokenizer)
    result = perplexity(model, corpus, max_windows=8)          # a Perplexity: ppl, mean_nll, protocol
    json.dumps(result.to_dict())

Memory does not grow with vocabulary x tokens: the model runs up to its output head, whose input (the
last hidden state, ``window x hidden``) is captured; the head then runs on chunks of positions small enough
that a chunk's logits stay under :data:`HEAD_CHUNK_BYTES`. Gemma 3's 262,144-token vocabulary would
otherwise take 2 GB of float32 logits per 2048-token window, and as much again for their log-softmax.
:func:`compressor.export.perplexity.onnx_perplexity` measures an exported file by the same protocol.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.fileio import regular_file
from compressor.core.hooks import StopForward, captured_inputs, stop_before
from compressor.data.inputs import eval_mode, model_device

# Model positions per window unless told otherwise (the papers' 2048), capped at the model's context.
DEFAULT_WINDOW = 2048
# The most bytes of float32 logits one chunk of positions may take through the output head.
HEAD_CHUNK_BYTES = 2**26


# ------------------------------------------------------------------------------------------ the text


@dataclass(frozen=True)
class Corpus:
    """A text file tokenized once: its name, the sha256 of its bytes, the token stream (no special
    tokens added) and the tokenizer's BOS token (None when it has none)."""

    name: str
    sha256: str
    ids: torch.Tensor  # 1-D int64
    bos_id: int | None


def read_text(path: str | Path) -> tuple[str, str]:
    """``(text, sha256 of its bytes)`` of an evaluation text file, or one :class:`CompressorError`
    line when it is missing, not a regular file, empty, or not UTF-8 text."""
    path = regular_file(path, "evaluation text")
    data = path.read_bytes()
    fix = "pass a UTF-8 text file (e.g. one written by compressor.examples.write_docstring_texts)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CompressorError(f"evaluation text '{path}' is not UTF-8 text", fix) from None
    if "\x00" in text:  # valid UTF-8, but a binary file all the same
        raise CompressorError(f"evaluation text '{path}' holds NUL bytes: it is a binary file", fix)
    if not text.strip():
        raise CompressorError(f"evaluation text '{path}' is empty", fix)
    return text, hashlib.sha256(data).hexdigest()


def read_corpus(path: str | Path, tokenizer: Any) -> Corpus:
    """The text file at ``path`` tokenized once by ``tokenizer`` (a Hugging Face tokenizer), without
    special tokens: BOS is the protocol's to add (per window), not the tokenizer's."""
    if tokenizer is None:
        raise CompressorError("perplexity needs the model's tokenizer, and none was found",
                              "use a Hugging Face model folder that holds its tokenizer files")
    text, sha = read_text(path)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return Corpus(Path(path).name, sha, torch.tensor(ids, dtype=torch.long), tokenizer.bos_token_id)


# -------------------------------------------------------------------------------------- the protocol


@dataclass(frozen=True)
class Span:
    """One window: stream tokens ``[start, end)`` are its input (after BOS when given); the tokens
    ``[scored, end)`` are predicted and counted."""

    start: int
    end: int
    scored: int


def default_window(config: Any) -> int:
    """:data:`DEFAULT_WINDOW`, capped at the model's context (``max_position_embeddings``, GPT-2's
    ``n_positions``). A sliding-window size is not a cap: those layers attend within it by design, and
    Gemma 3 mixes them with global layers that see the whole context."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return min(DEFAULT_WINDOW, limit) if isinstance(limit, int) and limit > 1 else DEFAULT_WINDOW


def check_protocol(window: int | None, stride: int | None = None, bos: bool = True,
                   max_windows: int | None = None, flags: str = "") -> None:
    """Refuse settings no measurement can use (before any model is loaded); ``window`` None: the
    model's default, checked when known. ``flags``: the command line's prefix of their options
    (``eval-`` for ``compress --eval-window``)."""
    for name, value, low, example in (("window", window, 2, 512), ("stride", stride, 1, 256),
                                      ("max_windows", max_windows, 1, 8)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise CompressorError(f"{name} must be a whole number >= {low}, got {value!r}",
                                  f"pass e.g. {name}={example}",
                                  cli_fix=f"pass e.g. --{flags}{name.replace('_', '-')} {example}")
    length = None if window is None else window - 1 if bos else window
    if stride is not None and length is not None and stride > length:
        raise CompressorError(f"stride {stride} is longer than a window's {length} text tokens, so tokens "
                              "between windows would never be scored",
                              f"pass a stride from 1 to {length}, or leave it out for non-overlapping windows",
                              cli_fix=f"pass --{flags}stride 1 to {length}, or leave it out for non-overlapping "
                                      "windows")


def spans(n_tokens: int, window: int, stride: int | None = None, bos: bool = True,
          max_windows: int | None = None) -> tuple[list[Span], int]:
    """The windows over a stream of ``n_tokens`` and the stride used: each holds ``window`` model
    positions (``window - 1`` stream tokens after BOS, or ``window`` without), starts ``stride`` stream
    tokens after the previous one (default: its own stream length, so windows tile the stream), and only
    whole windows are used. A token is counted once: in the first window that predicts it (without BOS,
    a window's first token has nothing before it and is context only)."""
    check_protocol(window, stride, bos, max_windows)
    length = window - 1 if bos else window
    stride = length if stride is None else stride
    if n_tokens < length:
        raise CompressorError(f"the text has {n_tokens} tokens, fewer than one window of {length}",
                              f"pass a longer text or a smaller window (at most {max(n_tokens + bos, 2)})",
                              cli_fix=f"pass a longer text or a smaller --window (at most {max(n_tokens + bos, 2)})")
    out: list[Span] = []
    done = 0  # stream tokens below this are already counted
    for start in range(0, n_tokens - length + 1, stride):
        if max_windows is not None and len(out) == max_windows:
            break
        out.append(Span(start, start + length, max(done, start + (0 if bos else 1))))
        done = start + length
    return out, stride


def window_ids(corpus: Corpus, span: Span, bos: bool) -> torch.Tensor:
    """The ``(1, window)`` input ids of one window."""
    ids = corpus.ids[span.start:span.end]
    if bos:
        if corpus.bos_id is None:
            raise CompressorError("the tokenizer has no BOS token to begin each window with",
                                  "pass bos=False", cli_fix="pass --no-bos")
        ids = torch.cat([torch.tensor([corpus.bos_id]), ids])
    return ids[None]


def scored_rows(span: Span, bos: bool) -> slice:
    """The positions of a window's outputs that predict its counted tokens (position i predicts i + 1)."""
    first = span.scored - span.start - (0 if bos else 1)
    return slice(first, first + span.end - span.scored)


def head_chunk(vocab: int) -> int:
    """Positions per chunk through the output head: their float32 logits take at most HEAD_CHUNK_BYTES."""
    return max(1, HEAD_CHUNK_BYTES // (4 * vocab))


def token_nll(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """Per-token negative log-likelihood (float64) of ``targets`` under ``(positions, vocab)`` logits,
    after ``cap * tanh(logits / cap)`` when the model soft-caps its logits (Gemma 2's
    ``final_logit_softcapping``)."""
    logits = logits.float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return nn.functional.cross_entropy(logits, targets.to(logits.device), reduction="none").double()


@dataclass(frozen=True)
class Protocol:
    """A text and how it is cut into windows: everything a perplexity depends on besides the model
    (:func:`perplexity` takes its :meth:`settings`)."""

    corpus: Corpus
    window: int
    stride: int | None = None
    bos: bool = True
    max_windows: int | None = None

    def settings(self) -> dict[str, Any]:
        return {"window": self.window, "stride": self.stride, "bos": self.bos, "max_windows": self.max_windows}

    def key(self) -> str:
        """Stable identity for caches: the settings and the token stream itself (text and tokenizer)."""
        ids = hashlib.sha256(self.corpus.ids.numpy().tobytes()).hexdigest()[:16]
        return f"{self.corpus.sha256[:16]}:{ids}:{self.window}:{self.stride}:{self.bos}:{self.max_windows}"

    def summary(self) -> dict[str, Any]:
        """The protocol as :meth:`Perplexity.protocol` states it, worked out without running a model."""
        chosen, stride = spans(len(self.corpus.ids), self.window, self.stride, self.bos, self.max_windows)
        return {"tokens": sum(s.end - s.scored for s in chosen), "windows": len(chosen), "window": self.window,
                "stride": stride, "bos": self.bos, "corpus": self.corpus.name, "sha256": self.corpus.sha256,
                "stream_tokens": len(self.corpus.ids), "max_windows": self.max_windows}


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Perplexity:
    """The perplexity of one model on one text, with the protocol it was measured by.

    ``tokens``: predicted tokens counted; ``stream_tokens``: tokens of the whole text (only whole windows
    are used, at most ``max_windows``); ``stride``: stream tokens between window starts; ``bos``: each
    window began with the BOS token; ``corpus`` and ``sha256``: the text file's name and the hash of its
    bytes; ``seconds``: wall time of the measurement; ``notes``: how a measurement departed from the
    plain protocol (e.g. an ONNX file's dynamic int8 activation scales computed per chunk of positions).
    """

    ppl: float
    mean_nll: float
    tokens: int
    windows: int
    window: int
    stride: int
    bos: bool
    corpus: str
    sha256: str
    stream_tokens: int
    max_windows: int | None = None
    seconds: float = 0.0
    notes: tuple[str, ...] = ()

    PROTOCOL = ("tokens", "windows", "window", "stride", "bos", "corpus", "sha256", "stream_tokens", "max_windows")

    def protocol(self) -> dict[str, Any]:
        """What must be equal for two perplexities to be compared."""
        return {k: getattr(self, k) for k in self.PROTOCOL}

    def describe(self) -> str:
        """The protocol in words, for reports and the command line."""
        first = "" if self.max_windows is None or self.windows < self.max_windows else " (the first ones)"
        return (f"{self.tokens:,} predicted tokens in {self.windows} windows{first} of {self.window} positions, "
                f"stride {self.stride}, {'BOS at the start of each window' if self.bos else 'no BOS added'}; "
                f"{self.stream_tokens:,} tokens in `{self.corpus}` (sha256 {self.sha256[:12]})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Perplexity:
        return cls(**{**d, "notes": tuple(d.get("notes", ()))})


def run_protocol(corpus: Corpus, window: int, stride: int | None, bos: bool, max_windows: int | None,
                 window_nll: Callable[[torch.Tensor, slice, torch.Tensor], torch.Tensor],
                 notes: tuple[str, ...] = ()) -> Perplexity:
    """Run the protocol: ``window_nll(ids, rows, targets)`` returns the per-token NLL of one window
    (``ids`` its input, ``rows`` the output positions that predict ``targets``); the torch and the ONNX
    measurements differ only in it."""
    t0 = time.perf_counter()
    chosen, stride = spans(len(corpus.ids), window, stride, bos, max_windows)
    total, count = 0.0, 0
    for span in chosen:
        targets = corpus.ids[span.scored:span.end]
        nll = window_nll(window_ids(corpus, span, bos), scored_rows(span, bos), targets)
        total += float(nll.sum())
        count += len(targets)
    mean = total / count
    return Perplexity(math.exp(mean), mean, count, len(chosen), window, stride, bos, corpus.name, corpus.sha256,
                      len(corpus.ids), max_windows, round(time.perf_counter() - t0, 3), notes)


# ------------------------------------------------------------------------------------- torch models


def output_head(model: nn.Module) -> nn.Module:
    """The module that turns the last hidden state into logits (``get_output_embeddings()``), or one
    :class:`CompressorError` line for a model that is not a causal language model."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        raise CompressorError(f"{type(model).__name__} has no output head (get_output_embeddings), so it is not a "
                              "causal language model whose perplexity can be measured",
                              "pass a causal language model, e.g. a Hugging Face *ForCausalLM folder")
    return head


@torch.no_grad()
def hidden_states(model: nn.Module, head: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The ``(positions, hidden)`` input of ``head`` for the input ids ``(1, positions)``: the forward
    pass is stopped at the head, so the full logits are never computed."""
    seen: list[torch.Tensor] = []
    with captured_inputs({"head": head}, lambda _k, args: seen.append(args[0])), stop_before(head), \
            suppress(StopForward):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    if not seen:
        raise CompressorError(f"{type(model).__name__}'s forward pass never called its output head",
                              "pass a causal language model whose forward() computes logits with it")
    return seen[0][0]


@torch.no_grad()
def check_head(model: nn.Module, head: nn.Module, ids: torch.Tensor, softcap: float | None) -> int:
    """Compare the head applied to the captured hidden state (and soft-capped) with the logits the model
    itself returns, at the first position (one row of logits, whatever the vocabulary); returns the
    vocabulary size. A model that changes its logits after the head in another way (a scale, a bias) is
    refused, since its perplexity by chunks would be wrong."""
    ids = ids[:, :1]
    seen: list[torch.Tensor] = []
    with captured_inputs({"head": head}, lambda _k, args: seen.append(args[0])):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or not seen:
        raise CompressorError(f"{type(model).__name__} returns no logits from its output head",
                              "pass a causal language model (a Hugging Face *ForCausalLM)")
    ours = head(seen[0]).float()
    if softcap:
        ours = torch.tanh(ours / softcap) * softcap
    theirs = logits.float()
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4,
                                                        atol=1e-4 * float(theirs.abs().max()) + 1e-6):
        raise CompressorError(f"{type(model).__name__}'s logits are not its output head applied to its last "
                              f"hidden state (soft-capped at {softcap}): it changes them in a way the chunked "
                              "perplexity does not reproduce", "measure a standard causal language model")
    return int(theirs.shape[-1])


def perplexity(model: nn.Module, corpus: Corpus, *, window: int | None = None, stride: int | None = None,
               bos: bool = True, max_windows: int | None = None) -> Perplexity:
    """The perplexity of the causal language model ``model`` (a Hugging Face ``*ForCausalLM``, dense or
    factored) on ``corpus`` by the module's protocol. ``window`` defaults to :func:`default_window` of
    the model's config. The output head runs on chunks of positions (:func:`head_chunk`), soft-capped
    as the config says (``final_logit_softcapping``), checked once against the model's own logits."""
    config = getattr(model, "config", None)
    window = default_window(config) if window is None else window
    softcap = getattr(config, "final_logit_softcapping", None)
    head = output_head(model)
    device = model_device(model)
    chunk: list[int] = []

    def window_nll(ids: torch.Tensor, rows: slice, targets: torch.Tensor) -> torch.Tensor:
        ids = ids.to(device)
        if not chunk:
            chunk.append(head_chunk(check_head(model, head, ids, softcap)))
        hidden = hidden_states(model, head, ids)[rows]
        return torch.cat([token_nll(head(hidden[i:i + chunk[0]]), targets[i:i + chunk[0]], softcap)
                          for i in range(0, len(targets), chunk[0])])

    with eval_mode(model), torch.no_grad():
        return run_protocol(corpus, window, stride, bos, max_windows, window_nll)

