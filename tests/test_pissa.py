"""PiSSA initialisation: the same outputs at step 0 for every layer kind, and a trained PiSSA adapter
written as a plain LoRA on the original weights (compressor's and peft's loaders reproduce the model)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.handlers import handler_for
from compressor.train.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, load_adapter, save_adapter
from compressor.train.lora import apply_lora, merge_lora
from tests.test_adapter import CASES as MODEL_CASES
from tests.test_adapter import _out
from tests.test_handlers import CASES

# LoRA wraps a layer by the kind it dispatches to; an alternative factoring of the same module (a conv's
# spatial decomposition) has no LoRA of its own, its layer is the plain conv row.
CASES = [c for c in CASES if handler_for(c[1]().layer).kind == c[0]]
IDS = [c[0] for c in CASES]


def _train(wrapped, seed=3):
    """Stand in for training: move both factors away from their PiSSA start."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for w in wrapped.values():
            w.lora_A.add_(torch.randn_like(w.lora_A) * 0.1)
            w.lora_B.add_(torch.randn_like(w.lora_B) * 0.1)


@pytest.mark.parametrize(("kind", "make", "example"), CASES, ids=IDS)
def test_pissa_step_zero_is_the_original_and_the_saved_adapter_fits_the_original(tmp_path, kind, make, example):
    torch.manual_seed(0)
    base, x = make().eval(), example()
    model = copy.deepcopy(base)
    wrapped = apply_lora(model, rank=4, alpha=8, init="pissa")
    layer = wrapped["layer"]
    assert handler_for(base.layer).kind == kind
    # the adapter holds the top-4 part of W exactly, the base the residual
    W = handler_for(base.layer).weight_matrix(base.layer).detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    W4 = (U[:, :4] * S[:4]) @ Vh[:4]
    torch.testing.assert_close((layer.scale * layer.lora_B @ layer.lora_A).double(), W4, atol=1e-5, rtol=1e-4)
    residual = handler_for(layer.base).weight_matrix(layer.base).detach().double()
    torch.testing.assert_close(residual, W - W4, atol=1e-5, rtol=1e-4)
    assert torch.linalg.matrix_norm(residual) < torch.linalg.matrix_norm(W) - 1e-3
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=1e-5, rtol=1e-4)

    _train(wrapped)
    with torch.no_grad():
        trained = model(x)
        assert (trained - base(x)).abs().max() > 1e-3
    folder = save_adapter(model, tmp_path / "ad")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # rank 2r, a plain LoRA
    from safetensors import safe_open

    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as f:
        assert f.metadata()["lora_init"].startswith("pissa")
    again = copy.deepcopy(base)  # the untouched original
    load_adapter(again, folder)
    with torch.no_grad():
        torch.testing.assert_close(again(x), trained, atol=1e-4, rtol=1e-4)
    merge_lora(model)  # residual + B @ A: the tuned weight, plain modules again
    assert not any(n.endswith("lora_A") for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["gpt2-conv1d", "minilm"])
def test_pissa_adapter_of_a_hugging_face_model_loads_in_peft_on_the_original(tmp_path, case):
    build, _, _ = MODEL_CASES[case]
    base, inputs, only = build()
    model = copy.deepcopy(base)
    wrapped = apply_lora(model, rank=4, alpha=8, filter_fn=only, init="pissa")
    torch.testing.assert_close(_out(model, inputs), _out(base, inputs), atol=1e-4, rtol=1e-4)
    _train(wrapped)
    expected = _out(model, inputs)
    assert (expected - _out(base, inputs)).abs().max() > 1e-3
    folder = save_adapter(model, tmp_path / "ad")
    assert Adapter.load(folder).layers[next(iter(wrapped))].rank == 8
    again = copy.deepcopy(base)
    load_adapter(again, folder)
    torch.testing.assert_close(_out(again, inputs), expected, atol=1e-4, rtol=1e-4)
    peft = pytest.importorskip("peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    torch.testing.assert_close(_out(loaded, inputs), expected, atol=1e-4, rtol=1e-4)


def test_pissa_refuses_a_tied_weight_and_an_unknown_init():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
            self.b.weight = self.a.weight

    model = Tied()
    before = model.a.weight.detach().clone()
    with pytest.raises(CompressorError, match="shares its weight"):
        apply_lora(model, rank=2, init="pissa")
    assert isinstance(model.a, nn.Linear) and torch.equal(model.a.weight, before)  # untouched
    with pytest.raises(CompressorError, match="unknown LoRA init"):
        apply_lora(Tied(), rank=2, init="olora")


def test_heal_with_pissa_trains_from_the_same_start_and_its_adapter_fits_the_compressed_model():
    import compressor
    from compressor.train.heal import HealConfig, heal

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(200, 16)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    student = compressor.rewrite(copy.deepcopy(teacher), compressor.analyze(teacher, rank=3))
    cfg = HealConfig(train="lora", lora_rank=2, lora_init="pissa", lr=0.01, steps=8, batch_size=32)
    assert HealConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).lora_init == "pissa"
    result = heal(copy.deepcopy(student), cfg, data=x, targets=y)
    assert result.adapter.metadata["lora_init"].startswith("pissa")
    assert {lay.rank for lay in result.adapter.layers.values()} == {4}  # 2r on the original factors
    healed = result.model
    again = copy.deepcopy(student)
    result.adapter.apply(again)
    with torch.no_grad():
        assert (healed(x) - student(x)).abs().max() > 1e-4  # it trained
        torch.testing.assert_close(again(x), healed(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(CompressorError, match="lora_init"):
        HealConfig(lora_init="olora")


def test_heal_lora_fine_tunes_a_model_that_was_never_compressed(tmp_path):
    """`compress heal MODEL --train lora --save-adapter DIR` on a plain .pt: adapters on every layer."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from compressor.examples import digits_cnn, digits_splits

    torch.manual_seed(0)
    model = digits_cnn().eval()
    torch.save(model, tmp_path / "cnn.pt")
    x, y = digits_splits(0)["train"]
    torch.save({"inputs": x[:128], "targets": y[:128]}, tmp_path / "train.pt")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "compressor", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    plain = cli("heal", "cnn.pt", "--data", "train.pt", "--steps", "2", "--out", "nope")
    assert plain.returncode != 0 and "--train lora" in plain.stderr and not (tmp_path / "nope").exists()
    ok = cli("heal", "cnn.pt", "--data", "train.pt", "--train", "lora", "--lora-rank", "2", "--lora-init", "pissa",
             "--lr", "0.01", "--steps", "4", "--save-adapter", "ad", "--out", "tuned", "--quiet")
    assert ok.returncode == 0, ok.stderr
    adapted = set(Adapter.load(tmp_path / "ad").layers)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n in adapted}
    assert {"Conv2d", "Linear"} <= kinds  # every layer kind of the CNN, not only factors
    import compressor

    tuned = compressor.load(tmp_path / "tuned")
    again = torch.load(tmp_path / "cnn.pt", weights_only=False)
    load_adapter(again, tmp_path / "ad")
    xs = x[:64]
    with torch.no_grad():
        assert (tuned(xs) - model(xs)).abs().max() > 1e-4  # it trained
        torch.testing.assert_close(again(xs), tuned(xs), atol=1e-4, rtol=1e-4)
