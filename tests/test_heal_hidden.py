"""distill="hidden": end-to-end distillation that also matches every block's output to the teacher's."""

from __future__ import annotations

import pytest
import torch

from compressor.core.errors import CompressorError
from compressor.train.blockwise import block_error, capture
from compressor.train.heal import HealConfig, heal, hidden_loss
from tests.test_heal_blockwise import _problem


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _block_errors(model, teacher, val) -> list[float]:
    """Each block's output against the teacher's block on the same inputs (those ``model`` gives it)."""
    names = ("layers.0", "layers.1", "layers.2")
    return [block_error(model.get_submodule(n), capture(model, teacher, n, [val])) for n in names]


def test_hidden_distillation_lowers_each_blocks_error_below_output_only():
    teacher, student, x, val = _problem()
    cfg = HealConfig(steps=60, lr=1e-2, batch_size=32, every=20)
    output = heal(student, cfg, teacher=teacher, data=x, val_data=val, progress=False)
    hidden = heal(student, cfg.replace(distill="hidden"), teacher=teacher, data=x, val_data=val, progress=False)
    assert output.note is None and hidden.note is None
    start = _block_errors(student, teacher, val)
    out_err, hid_err = _block_errors(output.model, teacher, val), _block_errors(hidden.model, teacher, val)
    # The head maps 12 features to 4: the output loss leaves the hidden states free, the hidden loss does not.
    for s, o, h in zip(start, out_err, hid_err, strict=True):
        assert h < o and h < s, (start, out_err, hid_err)
    assert sum(hid_err) < 0.7 * sum(out_err), (out_err, hid_err)
    # The monitored (output) loss still improves, and the teacher is left without hooks.
    assert hidden.after["val_loss"] < hidden.before["val_loss"]
    assert not any(m._forward_hooks for m in teacher.modules())
    assert not any(m._forward_hooks for m in hidden.model.modules())
    assert hidden.config.distill == "hidden" and output.config.distill == "output"


def test_hidden_loss_is_relative_and_masked():
    t = [torch.ones(2, 3, 4), 10 * torch.ones(2, 3, 4)]
    s = [1.1 * t[0], 1.1 * t[1]]  # the same relative error at two scales
    assert torch.isclose(hidden_loss(s, t), torch.tensor(0.01))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    s[0][:, 2] = 100.0  # padding: left out
    assert torch.isclose(hidden_loss(s, t, mask), torch.tensor(0.01))
    with pytest.raises(CompressorError, match="blocks ran 1 times but the teacher's 2"):
        hidden_loss(s[:1], t)


def test_hidden_distillation_needs_a_teacher():
    _, student, x, _ = _problem()
    with pytest.raises(CompressorError, match="distill=hidden"):
        heal(student, data=x, targets=torch.zeros(len(x), 4), distill="hidden", steps=2)
