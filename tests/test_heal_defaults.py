"""Heal defaults by model kind (HealConfig.resolved, KIND_DEFAULTS): each kind gets its measured recipe, a given
setting always wins, the run records what was filled, and the transformer recipe heals a tiny transformer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import compressor
from compressor.core.errors import CompressorError
from compressor.train.heal import KIND_DEFAULTS, HealConfig, heal, model_kind
from tests.models import CNN, mlp

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # training steps: one thread (tests/conftest.py)


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    """A two-layer BERT whose layers matter: at BERT's initializer_range (0.02) the residual stream is the
    embeddings, and a compressed copy's embeddings keep a cosine of 0.9999 to the original's."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, initializer_range=0.2)
    return transformers.BertModel(config).eval()


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(n: int, seed: int, length: int = 12) -> dict[str, torch.Tensor]:
    """Token ids with padding at the end of some rows (as a tokenizer pads a batch)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(length) < torch.randint(4, length + 1, (n, 1), generator=g)).long()
    return {"input_ids": torch.randint(1, 64, (n, length), generator=g) * mask, "attention_mask": mask}


def test_each_kind_resolves_its_row_and_given_settings_win():
    assert model_kind(tiny_bert()) == "transformer"
    assert model_kind(tiny_llama()) == "causal-lm"
    assert model_kind(CNN()) == "cnn"
    # A Hugging Face CNN has a config and a list of stages, but no attention heads.
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1]))
    assert model_kind(resnet) == "cnn"
    assert model_kind(mlp()) == "default"
    # Supervised healing is never a distillation recipe.
    assert model_kind(tiny_bert(), supervised=True) == model_kind(CNN(), supervised=True) == "default"

    for kind in KIND_DEFAULTS:
        cfg, filled = HealConfig().resolved(kind)
        row = {**KIND_DEFAULTS["default"], **KIND_DEFAULTS[kind]}
        assert filled == row and all(getattr(cfg, k) == v for k, v in row.items())
    cfg, filled = HealConfig().resolved("transformer")
    assert (cfg.method, cfg.distill, cfg.lr, cfg.block_steps) == ("both", "hidden", 3e-4, 150) and cfg.steps
    assert (HealConfig().resolved("cnn")[0].loss, HealConfig().resolved("causal-lm")[0].lr) == ("cosine", 1e-4)

    given = HealConfig(lr=1e-2, method="end-to-end", distill="output", block_steps=7, loss="mse", steps=3)
    for kind in KIND_DEFAULTS:
        cfg, filled = given.resolved(kind)
        assert cfg.to_dict() == given.replace(**filled).to_dict()
        assert (cfg.lr, cfg.method, cfg.distill, cfg.block_steps, cfg.loss, cfg.steps) == \
            (1e-2, "end-to-end", "output", 7, "mse", 3)
        assert not {"lr", "method", "distill", "block_steps", "loss", "steps"} & set(filled)
    # --epochs is the length of the run: the transformer row's steps do not replace it.
    cfg, filled = HealConfig(epochs=2).resolved("transformer")
    assert cfg.steps is None and cfg.epochs == 2 and "steps" not in filled
    with pytest.raises(CompressorError, match="kind"):
        HealConfig().resolved("rnn")


def test_heal_uses_the_kind_of_the_model_it_is_given():
    """What heal() ran with is the kind's row where nothing was given, and what was given elsewhere."""
    teacher = CNN().eval()
    student = compressor.rewrite(copy.deepcopy(teacher), compressor.analyze(teacher, rank_ratio=0.5))
    x = torch.randn(8, 3, 8, 8)
    r = heal(student, teacher=teacher, data=x, steps=1, progress=False)
    assert (r.config.lr, r.config.loss, r.config.method) == (3e-4, "cosine", "end-to-end")
    assert r.recipe == {"kind": "cnn", "filled": {**KIND_DEFAULTS["default"], **KIND_DEFAULTS["cnn"]}}
    r = heal(student, teacher=teacher, data=x, steps=1, lr=5e-3, loss="mse", progress=False)
    assert (r.config.lr, r.config.loss) == (5e-3, "mse") and not {"lr", "loss"} & set(r.recipe["filled"])
    # Labels: the general row, whatever the model.
    r = heal(student, data=x, targets=torch.randint(0, 10, (8,)), steps=1, progress=False)
    assert (r.recipe["kind"], r.config.lr, r.config.loss) == ("default", 1e-3, "ce")


def test_the_transformer_defaults_heal_a_tiny_transformer():
    """Nothing but data and a teacher: block-wise then end-to-end with hidden states, and the held-out cosine
    of the sentence embeddings (masked mean of the last hidden state) to the teacher's goes up."""
    teacher = tiny_bert()
    student = compressor.rewrite(copy.deepcopy(teacher),
                                 compressor.analyze(teacher, rank=4, include=["encoder.*"], progress=False))
    train, val, held_out = tokens(256, 1), tokens(64, 2), tokens(128, 3)
    batches = [{k: v[i:i + 32] for k, v in train.items()} for i in range(0, 256, 32)]

    def cosine(model: torch.nn.Module) -> float:
        with torch.no_grad():
            mask = held_out["attention_mask"].unsqueeze(-1).float()
            a, b = (((m(**held_out).last_hidden_state * mask).sum(1) / mask.sum(1)) for m in (model, teacher))
        return float(F.cosine_similarity(a, b, dim=-1).mean())

    # Fewer end-to-end steps than the recipe's (a test is short); everything else is the transformer row.
    r = heal(student, teacher=teacher, data=batches, val_data=val, steps=100, progress=False)
    assert r.recipe["kind"] == "transformer" and r.note is None
    assert (r.config.method, r.config.distill, r.config.lr, r.config.block_steps) == ("both", "hidden", 3e-4, 150)
    assert len(r.blocks) == 2 and all(b["after"] < b["before"] for b in r.blocks)
    before, after = cosine(student), cosine(r.model)
    assert after > before + 0.1, (before, after)  # measured 0.32 -> 0.67
