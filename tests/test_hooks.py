"""compressor.core.hooks: what each hook sees, that a pass stops where asked, and that nothing is left on the
module afterwards, even when the pass raises."""

from __future__ import annotations

from contextlib import suppress

import pytest
import torch
from torch import nn

from compressor.core.hooks import (
    StopForward,
    captured_inputs,
    captured_outputs,
    patched_forward,
    stop_after,
    stop_before,
)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def _no_hooks(net: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
               for m in net.modules())


def test_captured_inputs_and_outputs_see_each_call_by_key():
    net, x = _net(), torch.randn(3, 4)
    ins, outs = [], []
    with captured_inputs({"a": net[0], "b": net[2]}, lambda k, args: ins.append((k, args[0]))), \
            captured_outputs({"a": net[0]}, lambda k, _a, out: outs.append((k, out))):
        y = net(x)
    assert [k for k, _ in ins] == ["a", "b"] and [k for k, _ in outs] == ["a"]
    assert torch.equal(ins[0][1], x) and torch.equal(outs[0][1], net[0](x))
    assert torch.equal(ins[1][1], torch.relu(net[0](x))) and torch.equal(y, net(x))
    assert _no_hooks(net)


def test_returned_value_replaces_the_output_and_kwargs_are_seen():
    net, x = _net(), torch.randn(3, 4)
    seen = []
    with captured_outputs({0: net[2]}, lambda _k, _a, out: out * 0):
        assert torch.equal(net(x), torch.zeros(3, 2))
    with captured_inputs({0: net[0]}, lambda _k, args, kwargs: seen.append(kwargs), with_kwargs=True):
        net[0](input=x)
    assert list(seen[0]) == ["input"]
    assert _no_hooks(net)


def test_hooks_are_removed_when_the_pass_raises():
    net = _net()

    def boom(*_):
        raise RuntimeError("in a hook")

    with pytest.raises(RuntimeError), captured_inputs({0: net[0]}, boom), captured_outputs({1: net[1]}, boom), \
            patched_forward([net[2]], boom), stop_before(net[0]), stop_after(net[1]):
        net(torch.randn(1, 4))
    assert _no_hooks(net)
    net(torch.randn(1, 4))  # runs as before


def test_stop_after_ends_the_pass_after_the_module_and_stop_before_before_it():
    net, x = _net(), torch.randn(2, 4)
    ran = []
    with captured_inputs({i: m for i, m in enumerate(net)}, lambda i, _a: ran.append(i)):
        with stop_after(net[1]), pytest.raises(StopForward):
            net(x)
        assert ran == [0, 1]
        ran.clear()
        with stop_before(net[1]), suppress(StopForward):
            net(x)
        assert ran == [0, 1]  # the capture entered first still sees the call; the module itself does not run
    outs = []
    with captured_outputs({1: net[1]}, lambda _k, _a, out: outs.append(out)), stop_before(net[1]), \
            suppress(StopForward):
        net(x)
    assert outs == [] and _no_hooks(net)


def test_patched_forward_replaces_and_restores_the_forward():
    net, x = _net(), torch.randn(2, 4)
    before = net(x)
    with patched_forward([net[0], net[2]], lambda m, inp: torch.full((inp.shape[0], m.out_features), 7.0)):
        assert torch.equal(net(x), torch.full((2, 2), 7.0))
    assert _no_hooks(net) and torch.equal(net(x), before)
    # A forward the module already had of its own (a quantized layer's) is put back, not deleted.
    own = net[2].forward = lambda inp: torch.ones(inp.shape[0], 2)
    with patched_forward([net[2]], lambda _m, inp: torch.zeros(inp.shape[0], 2)):
        assert torch.equal(net(x), torch.zeros(2, 2))
    assert net[2].__dict__["forward"] is own and torch.equal(net(x), torch.ones(2, 2))
