"""What loading a model returns (:class:`Loaded`), and the example inputs a loaded model is given where it says
unambiguously what it takes. Every loader (:mod:`compressor.formats.torch_files`, :mod:`compressor.formats.hf`,
:mod:`compressor.formats.compressed`) builds one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.data.readers import ExampleInputs

# Real English text to tokenize into example inputs for text models (2 sequences x 16 tokens).
EXAMPLE_TEXT = ["Low-rank factorization replaces each large weight matrix by two thin ones.",
                "The compressed model should answer almost exactly like the original model does."]
EXAMPLE_TOKENS = 16


@dataclass
class Loaded:
    """What :func:`load_model` found. ``model`` is None only for weights without ``arch``."""

    model: nn.Module | None
    format: str  # one of compressor.formats.detect.FORMATS
    source: Path
    state_dict: dict[str, torch.Tensor] | None = None  # weights-only inputs
    example_inputs: ExampleInputs | None = None  # inferred where unambiguous
    tokenizer: Any = None  # Hugging Face folders
    meta: dict[str, Any] = field(default_factory=dict)  # hf_config, arch, plan, needs_trust_pickle, ...


def infer_example_inputs(model: nn.Module, tokenizer=None) -> ExampleInputs | None:
    """Example inputs where the model says unambiguously what it takes, else None.

    A text model with a tokenizer gets 2 real sentences as 16 tokens (``input_ids`` + ``attention_mask``),
    padded on the right; an ``nn.Sequential`` that starts with ``nn.Linear`` gets one random row of its
    input width.
    """
    device = next((p.device for p in model.parameters()), None)
    if tokenizer is not None and getattr(model, "main_input_name", None) == "input_ids":
        # Right padding, whatever the tokenizer's own side (Gemma 3's says left, for batched generation).
        # These inputs feed one forward pass, and in a causal model a left pad's query sees only masked
        # keys: torch's SDPA path returns one thing there, the exported graph another (a tiny Gemma 3 and a
        # tiny Llama: logits 0 vs 0.44 apart; neither runtime gave NaN, and eager attention in torch agreed
        # with the graph), and a model with learned positions (GPT-2) sees every real token shifted (0.35
        # apart from the unpadded sentence on a tiny one). Right-padded, every query sees at least the real
        # tokens before it and a real token's output is exactly the unpadded sentence's. Comparisons leave
        # padding out anyway (compressor.data.inputs.real_tokens).
        side = tokenizer.padding_side
        tokenizer.padding_side = "right"  # an attribute, not the call's padding_side=: older tokenizers lack it
        try:
            enc = tokenizer(EXAMPLE_TEXT, padding="max_length", truncation=True, max_length=EXAMPLE_TOKENS,
                            return_tensors="pt")
        finally:
            tokenizer.padding_side = side
        return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
    if isinstance(model, nn.Sequential) and len(model) and isinstance(model[0], nn.Linear):
        w = model[0].weight
        gen = torch.Generator().manual_seed(0)
        return torch.randn(1, model[0].in_features, generator=gen).to(device=w.device, dtype=w.dtype)
    return None
