"""What a job reads besides the model, and the stand-in a bare state_dict gets: example inputs, calibration
and held-out batches, the BatchNorm probe, the prompts a key/value-cache export is checked on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.jobs.options import Options


def with_pooled_output(opts: Options, loaded) -> Options:
    """``opts`` comparing the sentence embedding a sentence-transformers folder pools (what its users
    consume) when no outputs were named: fidelity, sensitivity and the calibrated analysis then measure it."""
    spec = loaded.meta.get("pooling")
    if opts.outputs or not spec:
        return opts
    from compressor.data.inputs import pooled_name

    return dataclasses.replace(opts, outputs=[pooled_name(spec["mode"], spec["normalize"])])


def calibration_batches(loaded, opts: Options) -> list | None:
    """The batches of ``opts.calibration`` (tensors, or text through the folder's tokenizer); None without."""
    if opts.calibration is None:
        return None
    from compressor.analysis.decoder import is_decoder
    from compressor.data.calibration import load_calibration

    # A causal LM calibrates on sequences cut from the text as one token stream (no padding), 128 tokens each.
    return load_calibration(opts.calibration, tokenizer=loaded.tokenizer, samples=opts.calibration_samples,
                            stream=loaded.model is not None and is_decoder(loaded.model))


def held_out_batches(loaded, opts: Options, weights_only: bool) -> list | None:
    """The batches of ``opts.eval_inputs`` (read as calibration inputs are: tensors, or text through the
    folder's tokenizer), checked against the model; None without them."""
    if opts.eval_inputs is None:
        return None
    if weights_only:
        raise CompressorError("held-out inputs need a model to run, and the input holds weights only",
                              "leave out eval_inputs", cli_fix="leave out --eval-inputs")
    from compressor.data.calibration import load_calibration
    from compressor.data.inputs import check_fits

    batches = load_calibration(opts.eval_inputs, tokenizer=loaded.tokenizer)
    check_fits(loaded.model, batches, f"the held-out inputs in '{opts.eval_inputs}'")
    return batches


def probe_inputs(loaded, opts: Options, weights_only: bool):
    """Example inputs to find BatchNorm/conv pairs with when there is no calibration data (None: unknown)."""
    if weights_only or opts.keep_batchnorm or opts.calibration is not None:
        return None
    if opts.input_shapes or opts.example_inputs is not None or loaded.example_inputs is not None:
        return example_inputs(loaded, opts)
    return None


def example_inputs(loaded, opts: Options):
    """The inputs to export and validate with: --input-shape, --example-inputs, or what the model file holds."""
    from compressor.data.readers import load_example_inputs

    if opts.input_shapes:
        # Random inputs in the model's floating dtype (a bfloat16 model cannot take float32 inputs).
        dtype = next((p.dtype for p in (loaded.model.parameters() if loaded.model is not None else ())
                      if p.is_floating_point()), torch.float32)
        g = torch.Generator().manual_seed(0)
        tensors = tuple(torch.randn(s, generator=g).to(dtype) for s in opts.shapes())
        return tensors[0] if len(tensors) == 1 else tensors
    if opts.example_inputs is not None:
        return load_example_inputs(opts.example_inputs)
    if loaded.example_inputs is not None:
        return loaded.example_inputs
    raise CompressorError("cannot tell what inputs this model takes, so it cannot be exported",
                          "pass --input-shape 1x3x224x224 (repeat for several inputs) or --example-inputs FILE")


def generation_prompts(loaded, model: nn.Module, weights_only: bool, opts: Options) -> tuple[list[list[int]], str]:
    """The prompts (token ids) a --kv-cache export is checked on, and where they come from: the first lines of
    the evaluation text, else of a text calibration file (the user's own text), else built-in sentences;
    refused before the slow steps when the model is not a causal LM."""
    from compressor.analysis.decoder import is_decoder
    from compressor.export.kv_cache import GENERATION_PROMPTS, PROMPTS, prompt_token_ids

    if weights_only or not is_decoder(model) or loaded.tokenizer is None:
        raise CompressorError("a key/value cache export is for causal language models with a tokenizer (a Hugging "
                              "Face *ForCausalLM folder or a GGUF file), and this model is not one",
                              "leave out kv_cache", cli_fix="leave out --kv-cache")
    for path in (opts.eval_text, opts.calibration):
        if path is not None and is_text(path):
            lines = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    lines += [line] if line.strip() else []
                    if len(lines) == PROMPTS:
                        break
            if lines:
                return prompt_token_ids(loaded.tokenizer, lines), f"first {len(lines)} lines of {Path(path).name}"
    return prompt_token_ids(loaded.tokenizer, GENERATION_PROMPTS), "built-in prompts"


def weights_only_model(state_dict: dict[str, torch.Tensor] | None) -> nn.Module:
    """A stand-in module tree for a bare state_dict, so its weights can be analyzed and factored.

    Every ``X.weight`` of 2 dims becomes an ``nn.Linear`` (an embedding table has the same matrix
    view), 3 to 5 dims a ``Conv1d/2d/3d`` whose groups cannot be known (``in == 1`` per group
    is treated as depthwise and left dense); other tensors are kept as plain parameters so totals count
    them. The names are the state_dict's own, so the plan and factored weights match them.
    """
    if not state_dict:
        raise CompressorError("the file holds no tensors", "pass a model or a state_dict of weights")
    root = nn.Module()
    used: set[str] = set()
    for key, tensor in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf != "weight" or tensor.dim() < 2 or not tensor.is_floating_point():
            continue
        bias = state_dict.get(f"{prefix}.bias")
        has_bias = bias is not None and bias.dim() == 1 and bias.shape[0] == tensor.shape[0]
        if tensor.dim() == 2:
            layer: nn.Module = nn.Linear(tensor.shape[1], tensor.shape[0], bias=has_bias, device="meta")
        elif tensor.dim() in (3, 4, 5):
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[tensor.dim() - 3]
            groups = tensor.shape[0] if tensor.shape[1] == 1 and tensor.shape[0] > 1 else 1
            layer = conv(tensor.shape[1] * groups, tensor.shape[0], tuple(tensor.shape[2:]), groups=groups,
                         bias=has_bias, device="meta")
        else:
            continue
        layer.weight = nn.Parameter(tensor, requires_grad=False)
        used.add(key)
        if has_bias:
            layer.bias = nn.Parameter(bias, requires_grad=False)
            used.add(f"{prefix}.bias")
        _place(root, prefix or "weight_matrix", layer)
    for key, tensor in state_dict.items():
        if key not in used:
            prefix, _, leaf = key.rpartition(".")
            holder = _container(root, prefix) if prefix else root
            holder.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
    return root


def _container(root: nn.Module, dotted: str) -> nn.Module:
    node = root
    for part in dotted.split("."):
        if part not in node._modules:
            node.add_module(part, nn.Module())
        node = node._modules[part]
    return node


def _place(root: nn.Module, dotted: str, layer: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    (_container(root, parent) if parent else root).add_module(leaf, layer)


def is_text(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            f.read(4096)
    except (UnicodeDecodeError, OSError):
        return False
    return True

