"""Sensitivity probes replay the reference outputs of the modules before the probed layer
(compressor.analysis.tracing._Prefix): the measured output changes must equal full forward passes."""

import copy

import pytest
import torch
from torch import nn

from compressor.analysis.tracing import Calibrator, _Prefix


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.conv2 = nn.Conv2d(c, c, 1)
        self.act = nn.ReLU(inplace=True)  # modifies what the conv returned: replayed outputs must be copies

    def forward(self, x):
        return x + self.conv2(self.act(self.conv(x)))


class Net(nn.Module):
    def __init__(self, shared: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(Block(8) for _ in range(3))  # never called itself
        self.head = nn.Linear(8, 5)
        self.shared = shared

    def forward(self, x):
        x = self.stem(x).mul_(0.5)  # in place on a replayed output: the cache must hold, and hand out, copies
        for b in self.blocks:
            x = b(x)
        if self.shared:  # a module called twice: no replay, full passes
            x = self.blocks[0](x)
        return self.head(x.mean((2, 3)))


def _probes(model):
    torch.manual_seed(1)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    replacements = {}
    for name, mod in layers.items():
        new = copy.deepcopy(mod)
        with torch.no_grad():
            new.weight.mul_(0.8)
        replacements[name] = new
    return layers, replacements


@pytest.mark.parametrize("shared", [False, True])
def test_replayed_prefix_matches_full_passes(shared, monkeypatch):
    torch.manual_seed(0)
    model = Net(shared).eval()
    layers, replacements = _probes(model)
    cal = Calibrator(model, layers, [torch.randn(4, 3, 6, 6) for _ in range(2)])
    fast = cal.output_errors(replacements, 2)
    monkeypatch.setattr(_Prefix, "_before", lambda self, layer: [])
    full = Calibrator(model, layers, cal.batches).output_errors(replacements, 2)  # its own prefix: nothing replayed
    assert fast.keys() == full.keys()
    for name in full:
        assert full[name] > 0
        assert fast[name] == pytest.approx(full[name], rel=1e-9, abs=0)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the replay left no patch behind


def test_prefix_replays_only_modules_finished_before_the_layer():
    model = Net().eval()
    layer = model.blocks[2].conv2
    prefix = _Prefix(model, torch.randn(2, 3, 6, 6), [layer])
    before = prefix.before[layer]
    assert set(before) == {model.stem, model.blocks[0], model.blocks[1], model.blocks[2].conv, model.blocks[2].act}
    assert set(prefix.cache) == set(before)  # only what a probe replays is recorded
    shared = Net(shared=True).eval()
    assert _Prefix(shared, torch.randn(2, 3, 6, 6), [shared.head]).usable == set()


@pytest.mark.parametrize("shared", [False, True])
def test_moments_pass_traces_the_order_and_records_the_references(shared):
    # The moments pass with held-out batches leaves the call order and the probes' references behind: probes and
    # joint errors then run no pass of their own, and measure what a calibrator that records its own does.
    torch.manual_seed(0)
    model = Net(shared).eval()
    layers, replacements = _probes(model)
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    cal = Calibrator(model, layers, batches)
    passes = []
    model.register_forward_pre_hook(lambda *_: passes.append(1))
    cal.moments(hold_out=2)
    assert len(passes) == 3
    order = cal.order
    probed = cal.output_errors(replacements, 2)
    joint = cal.joint_errors({"two": {n: replacements[n] for n in ("blocks.1.conv", "head")}}, 2)
    assert len(passes) == 3 + 2 * len(replacements) + 2  # probes and joint passes only
    fresh = Calibrator(model, layers, batches)
    assert fresh.order == order
    assert fresh.output_errors(replacements, 2) == probed
    assert fresh.joint_errors({"two": {n: replacements[n] for n in ("blocks.1.conv", "head")}}, 2) == joint
