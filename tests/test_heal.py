"""Healing compressed models, LoRA wrappers (merge/unmerge) and LoRA extraction."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import compressor
from compressor.train.heal import heal
from compressor.train.lora import LoRALayer, apply_lora, extract_lora, lora_parameters, merge_lora

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add overhead


def _problem(seed: int = 0):
    """A small MLP, its rank-2 compressed copy (clearly worse), and data labelled by the MLP."""
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(400, 16)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    student = compressor.rewrite(copy.deepcopy(teacher), compressor.analyze(teacher, rank=2))
    return teacher, student, x, y


def _randomize_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(std=0.3)


@pytest.mark.parametrize("layer, x", [
    (nn.Linear(12, 7), torch.randn(5, 12)),
    (nn.Conv2d(3, 6, 3, stride=2, padding=1), torch.randn(2, 3, 9, 9)),
    (nn.Conv1d(4, 5, 3, dilation=2), torch.randn(2, 4, 11)),
    (nn.Embedding(20, 6, padding_idx=0), torch.randint(0, 20, (3, 7))),
])
def test_lora_merge_and_unmerge_are_exact(layer, x):
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    plain = layer(x)
    wrapped = apply_lora(model, rank=3, alpha=6)
    assert list(wrapped) == ["0"] and isinstance(model[0], LoRALayer)
    assert torch.equal(model(x), plain)  # a fresh adapter changes nothing (B or A starts at zero)
    _randomize_lora(model)
    adapted = model(x)
    assert not torch.allclose(adapted, plain)
    w0 = layer.weight.detach().clone()
    model[0].merge()
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    model[0].unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)
    merged = merge_lora(model)
    assert type(merged[0]) is type(layer)  # the plain module is back, with the adapter inside
    torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)


def test_apply_lora_filter_and_rank_cap():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 8))
    wrapped = apply_lora(model, rank=16, alpha=32, filter_fn=lambda name, _: name == "2")
    assert list(wrapped) == ["2"] and isinstance(model[0], nn.Linear)
    assert wrapped["2"].rank == 3 and wrapped["2"].scale == pytest.approx(2.0)  # alpha/rank kept
    assert apply_lora(model, rank=2, filter_fn=lambda name, _: name.startswith("2")) == {}  # no double wrap


def test_extract_lora_recovers_a_low_rank_update():
    torch.manual_seed(0)
    base = {"a.weight": torch.randn(30, 20), "b.weight": torch.randn(8, 3, 3, 3), "a.bias": torch.randn(30)}
    B, A = torch.randn(30, 3), torch.randn(3, 20)
    tuned = {"a.weight": base["a.weight"] + B @ A, "b.weight": base["b.weight"].clone(),
             "a.bias": base["a.bias"] + 1}
    exact = extract_lora(base, tuned, rank=3)
    assert set(exact) == {"a.weight"}  # unchanged weights and 1-D tensors are not adapted
    assert exact["a.weight"].rel_error < 1e-5
    torch.testing.assert_close(base["a.weight"] + exact["a.weight"].B @ exact["a.weight"].A,
                               tuned["a.weight"], rtol=1e-4, atol=1e-4)
    low = extract_lora(base, tuned, rank=1)["a.weight"]
    S = torch.linalg.svdvals(B @ A)
    assert low.rel_error == pytest.approx(float(S[1:].norm() / S.norm()), rel=1e-4)  # Eckart-Young
    with pytest.raises(compressor.CompressorError, match="tuned"):
        extract_lora(base, {"a.weight": torch.randn(3, 3)}, rank=1)


@pytest.mark.parametrize("kind, kw", [
    ("supervised", {"train": "factors"}),
    ("supervised", {"train": "lora", "lora_rank": 2, "lr": 1e-2}),
    ("distill", {"loss": "mse"}),
    ("distill", {"loss": "kl", "temperature": 2.0}),
])
def test_heal_improves_a_compressed_model(kind, kw):
    teacher, student, x, y = _problem()
    before_state = {k: v.clone() for k, v in student.state_dict().items()}
    opts = {"lr": 1e-2, "epochs": 6, "batch_size": 32, "progress": False, **kw}
    if kind == "supervised":
        r = heal(student, data=x[:300], targets=y[:300], val_data=(x[300:], y[300:]), **opts)
        assert r.after["val_accuracy"] >= r.before["val_accuracy"] + 0.1, (r.before, r.after)
        assert r.after["val_loss"] < 0.7 * r.before["val_loss"]
    else:
        r = heal(student, teacher=teacher, data=x[:300], val_data=x[300:], **opts)
        assert r.after["val_loss"] < 0.8 * r.before["val_loss"], (r.before, r.after)
        assert r.after["val_cosine"] > r.before["val_cosine"]
    # The result keeps the compressed architecture and size; the input was not touched.
    assert [type(m) for m in r.model.modules()] == [type(m) for m in student.modules()]
    assert sum(p.numel() for p in r.model.parameters()) == sum(p.numel() for p in student.parameters())
    for k, v in student.state_dict().items():
        assert torch.equal(v, before_state[k])
    # Only the factor matrices moved.
    changed = {k for k, v in r.model.state_dict().items() if not torch.equal(v, before_state[k])}
    assert changed and all(k.endswith(("down.weight", "up.weight")) for k in changed)
    # The returned model is the best validation step (ties: the earliest).
    key, sign = ("val_accuracy", -1) if kind == "supervised" else ("val_loss", 1)
    assert r.best_step == min(r.history, key=lambda h: (sign * h["metrics"][key], h["step"]))["step"]
    assert r.after == next(h["metrics"] for h in r.history if h["step"] == r.best_step)


def test_heal_on_tokenized_inputs_with_attention_mask():
    """HF-style: dict inputs, an output object with last_hidden_state; padding tokens do not count."""
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 24)
            self.proj = nn.Linear(24, 24)

        def forward(self, input_ids, attention_mask):
            return {"last_hidden_state": torch.tanh(self.proj(self.emb(input_ids)))}

    teacher = Encoder()
    student = compressor.rewrite(copy.deepcopy(teacher), compressor.analyze(teacher, rank=3))
    ids = torch.randint(1, 50, (64, 10))
    mask = (torch.arange(10) < torch.randint(3, 11, (64, 1))).long()
    ids = ids * mask
    r = heal(student, teacher=teacher, data={"input_ids": ids[:48], "attention_mask": mask[:48]},
             val_data={"input_ids": ids[48:], "attention_mask": mask[48:]}, loss="cosine", epochs=20,
             batch_size=16, lr=2e-2, progress=False)
    assert r.after["val_cosine"] > r.before["val_cosine"] + 0.05, (r.before, r.after)


@pytest.mark.parametrize("kw, match", [
    ({"train": "everything"}, "train="),
    ({"lr": -1.0}, "lr must be"),
    ({"batch_size": 0}, "batch_size"),
    ({"loss": "hinge"}, "loss="),
    ({"targets": None}, "needs targets"),
    ({"targets": torch.zeros(3, dtype=torch.long)}, "targets"),
])
def test_heal_rejects_bad_input(kw, match):
    _, student, x, y = _problem()
    with pytest.raises(compressor.CompressorError, match=match):
        heal(student, **{"data": x, "targets": y, "progress": False, **kw})


def test_heal_needs_factored_layers():
    teacher, _, x, y = _problem()
    with pytest.raises(compressor.CompressorError, match="no factored layers"):
        heal(teacher, data=x, targets=y, progress=False)


def test_heal_without_validation_uses_steps_and_train_loss():
    _, student, x, y = _problem()
    r = heal(student, data=x, targets=y, steps=7, every=3, batch_size=64, lr=1e-2, schedule="constant",
             warmup_steps=2, optimizer="sgd", progress=False)
    assert r.steps == 7 and [h["step"] for h in r.history] == [0, 3, 6, 7]
    assert r.before == {} and "train_loss" in r.after
    assert r.best_step == min(r.history[1:], key=lambda h: (h["metrics"]["train_loss"], h["step"]))["step"]


def test_heal_config_round_trips_and_validates():
    from dataclasses import fields

    from compressor.train.heal import HealConfig

    cfg = HealConfig(train="lora", lora_alpha=8, steps=5, monitor="val_loss", mode="min", grad_clip=None)
    assert isinstance(cfg.lora_alpha, float)  # an int given for a float setting is made a float
    assert HealConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert all(f.metadata["help"] for f in fields(HealConfig))
    for bad, match in [({"lr": float("nan")}, "lr must be a finite number"), ({"steps": 0}, "steps must be >= 1"),
                       ({"steps": 2.5}, "whole number"), ({"batch_size": True}, "whole number"),
                       ({"optimizer": "lion"}, "optimizer='lion' is not one of adamw, adam, sgd"),
                       ({"lora_dropout": 1.0}, "< 1"), ({"seed": -1}, ">= 0"), ({"temperature": 0}, "> 0"),
                       ({"warp": 9}, "unknown heal setting 'warp'")]:
        with pytest.raises(compressor.CompressorError, match=match):
            HealConfig.from_dict(bad)


def test_heal_cli_options_are_generated_from_the_config():
    """Each HealConfig field is a `compress heal` option with its name, default, help and choices."""
    from dataclasses import fields

    import click

    from compressor.cli.heal import heal_cmd
    from compressor.train.heal import HealConfig

    options = {p.name: p for p in heal_cmd.params}
    for f in fields(HealConfig):
        opt = options[f.name]
        assert opt.opts == ["--" + f.name.replace("_", "-")] and opt.default == f.default
        assert opt.help == f.metadata["help"]
    assert isinstance(options["optimizer"].type, click.Choice)
    assert list(options["optimizer"].type.choices) == ["adamw", "adam", "sgd"]
    assert list(options["mode"].type.choices) == ["min", "max"]


def test_heal_takes_a_config_and_settings_by_name():
    from compressor.train.heal import HealConfig

    _, student, x, y = _problem()
    base = HealConfig(steps=3, lr=1e-2, batch_size=64, optimizer="sgd")
    a = heal(student, base, data=x, targets=y, progress=False)
    b = heal(student, data=x, targets=y, steps=3, lr=1e-2, batch_size=64, optimizer="sgd", progress=False)
    c = heal(student, HealConfig(steps=3), data=x, targets=y, lr=1e-2, batch_size=64, optimizer="sgd",
             progress=False)
    for r in (b, c):
        assert r.config == a.config and r.history == a.history
    assert a.config.loss == "ce" and a.config.monitor == "train_loss" and a.config.mode == "min"  # resolved
    assert base.loss is None  # the config passed in is not changed
    with pytest.raises(TypeError, match="'stepz'"):
        heal(student, data=x, targets=y, stepz=3)
    with pytest.raises(compressor.CompressorError, match="checkpoint_dir"):
        heal(student, base, data=x, targets=y, resume=True)
