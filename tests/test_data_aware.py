"""Data-aware compression: whitened factors, damping fallbacks, sequential refits, plans, loaders."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import compressor
from compressor.analysis.whitened import Moments, embedding_decomposition, whitened_decomposition, whitening
from compressor.core.errors import CompressorError, PlanError
from compressor.core.svd import svd
from compressor.data.calibration import load_calibration
from compressor.examples import minilm_path


def correlated(n_rows: int, dim: int, seed: int = 0, rank: int = 6) -> torch.Tensor:
    """Inputs with a few strong directions and very different feature scales (as real activations)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=g) * torch.logspace(0, -1, dim)
    return torch.randn(n_rows, rank, generator=g) @ basis * 3 + 0.05 * torch.randn(n_rows, dim, generator=g)


def mlp(seed: int = 0, widths: tuple[int, ...] = (24, 48, 40, 8)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


WIDE = (24, 256, 192, 16)  # rank steps of at most 0.6% of the weights: a target can be met within 1%


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(24 * 6 * 6, 10))


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = nn.functional.avg_pool2d(torch.randn(n, 3, 10, 10, generator=g), 5, stride=1)  # 6x6, correlated
    return smooth * torch.tensor([3.0, 1.0, 0.2]).view(1, 3, 1, 1)


def output_error(model: nn.Module, small: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((small(x) - model(x)).norm() / model(x).norm())


def compressed(model: nn.Module, **options) -> tuple[nn.Module, compressor.Plan]:
    """A compressed copy of ``model`` (analyzed on the copy: data-aware factors are tied to its weights)."""
    small = copy.deepcopy(model)
    plan = compressor.analyze(small, **options)
    return compressor.rewrite(small, plan), plan


def moments_of(x: torch.Tensor) -> Moments:
    m = Moments()
    m.add(x)
    return m


# -------------------------------------------------------------------------------------------- math


def test_full_rank_whitened_factors_reproduce_weight():
    torch.manual_seed(0)
    w = torch.randn(20, 12)
    dec, info = whitened_decomposition(w, moments_of(correlated(200, 12)))
    up, down = dec.factors(12)
    assert info["whitening"] == "cholesky"
    torch.testing.assert_close(up @ down, w, atol=1e-4, rtol=1e-4)


def test_whitened_truncation_is_optimal_in_output_error():
    torch.manual_seed(0)
    w, x = torch.randn(16, 12), correlated(300, 12)
    dec, _ = whitened_decomposition(w, moments_of(x), damping=(1e-9,))  # no ridge: exact output error
    up, down = dec.factors(4)
    plain_up, plain_down = svd(w).factors(4)
    ours = ((w - up @ down) @ x.T).norm()
    assert ours < 0.8 * ((w - plain_up @ plain_down) @ x.T).norm()
    # The whitened singular values measure the output error exactly.
    tail = dec.S[4:].double().square().sum().sqrt()
    assert abs(float(ours) - float(tail)) < 1e-3 * float(ours)


@pytest.mark.parametrize("case", ["dead", "duplicated", "few_rows", "all_zero", "huge_scale"])
def test_damping_fallback_is_finite(case):
    x = correlated(100, 10)
    if case == "dead":
        x[:, [2, 7]] = 0
    elif case == "duplicated":
        x[:, 5] = x[:, 1]
        x[:, 6] = -2 * x[:, 1]
    elif case == "few_rows":
        x = x[:3]
    elif case == "all_zero":
        x = torch.zeros(50, 10)
    else:
        x[:, 0] *= 1e12
    wh = whitening(moments_of(x).xx)
    assert torch.isfinite(wh.S).all() and torch.isfinite(wh.S_inv).all()
    w = torch.randn(8, 10)
    dec, _ = whitened_decomposition(w, moments_of(x))
    for r in (1, 4, 8):
        up, down = dec.factors(r)
        assert torch.isfinite(up).all() and torch.isfinite(down).all()
    up, down = dec.factors(8)
    torch.testing.assert_close(up @ down, w, atol=1e-3, rtol=1e-3)  # full rank still reproduces W


def test_not_positive_definite_moment_uses_eigh():
    c = torch.diag(torch.tensor([1.0, 1.0, -0.5]))  # impossible as X^T X: e.g. a broken accumulator
    wh = whitening(c)
    assert wh.method == "eigh" and torch.isfinite(wh.S_inv).all()


def test_blocked_in_place_whitening_is_the_cholesky_of_the_damped_moment(monkeypatch):
    """Blocks of 8 on a 30-wide moment: the in-place factorization, its undo after a failed damping and the
    eigh fallback give what whole-matrix linear algebra gives, with or without ``overwrite``."""
    from compressor.analysis import whitened

    monkeypatch.setattr(whitened, "CHOLESKY_BLOCK", 8)
    monkeypatch.setattr(whitened, "PRODUCT_BLOCK", 50)
    x = correlated(400, 30).double()
    m = Moments()
    for part in x.split(64):
        m.add(part)
    torch.testing.assert_close(m.xx, x.T @ x)
    C = m.xx.clone()
    C[3, 5] += 1e-9  # not exactly symmetric: the average of both triangles is factored
    # Shifted so that its least eigenvalue is -5% of its mean diagonal: 1% damping fails, 10% does not.
    shift = (float(torch.linalg.eigvalsh((C + C.T) / 2)[0]) + 0.05 * float(C.diagonal().mean())) / 1.05
    bent = C - shift * torch.eye(30, dtype=C.dtype)
    for moment, damping in ((C, 1e-2), (bent, 1e-1)):  # the bent one fails at 1e-2 and is undone, then 1e-1
        sym = (moment + moment.T) / 2
        expected = torch.linalg.cholesky(sym + damping * float(sym.diagonal().mean()) * torch.eye(30))
        own = moment.clone()
        for wh in (whitening(moment), whitening(own, overwrite=True)):
            assert wh.method == "cholesky" and wh.damping == damping
            torch.testing.assert_close(wh.S, expected, rtol=1e-8, atol=1e-8 * float(expected.abs().max()))
            inverse = torch.linalg.inv(expected)
            torch.testing.assert_close(wh.S_inv, inverse, rtol=1e-6, atol=1e-6 * float(inverse.abs().max()))
        assert own.data_ptr() == wh.S.data_ptr()  # in place
    broken = torch.diag(torch.linspace(1.0, 2.0, 30, dtype=torch.float64))
    broken[7, 7] = -20.0  # fails at every damping: eigh of the moment, restored after the failed tries
    wh = whitening(broken.clone(), overwrite=True)
    e, Q = torch.linalg.eigh(broken)
    root = e.clamp(min=0).add(0.1 * float(broken.diagonal().mean())).sqrt()
    assert wh.method == "eigh"
    torch.testing.assert_close(wh.S @ wh.S.T, (Q * root.square()) @ Q.T)


def test_whitened_decomposition_of_a_wide_moment_holds_no_second_moment_sized_buffer(tmp_path):
    """Measured in a child process (the kernel's peak RSS, reset before each step): accumulating an n-wide
    moment takes less memory beyond the moment than 30% of it (the whole product and its float64 copy were
    1.5 moments), and its whitened decomposition in place (``overwrite``: the streamed path) less than one more
    moment (the damped copy, its factor, L^-1 and float32 copies were 3.5: 7 GiB for a 7B model's one layer)."""
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    code = """
import json, torch
from compressor.analysis import whitened
from compressor.analysis.whitened import Moments, whitened_decomposition
whitened.PRODUCT_BLOCK = 2**20  # products of 4 MiB a block: a small share of this moment, as of a 7B one's
def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024
def rss():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmRSS"))
    return int(line.split()[1]) * 1024
def reset():
    open("/proc/self/clear_refs", "w").write("5")
n = 3072
torch.manual_seed(0)
W, xs = torch.randn(64, n), [torch.randn(512, n) * torch.linspace(0.1, 2, n) for _ in range(2)]
m = Moments()
m.add(xs[0])
before = rss(); reset()
m.add(xs[1])
accumulate = peak() - before
before = rss(); reset()
dec, _ = whitened_decomposition(W, m, overwrite=True)
up, down = dec.factors(32)
print(json.dumps({"moment": n * n * 8, "accumulate": accumulate, "decompose": peak() - before,
                  "released": m.xx is None}))
"""
    # Large blocks from their own mmap, returned at free: the RSS then shows what is held, not what malloc kept.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                    check=True).stdout)
    moment = out["moment"]  # 72 MiB
    assert out["released"]  # the moment became the factor, released before the SVD
    assert out["accumulate"] < 0.3 * moment, out  # measured: 0.16 (was 1.5)
    assert out["decompose"] < moment, out  # measured: 0.69 (the factor in float32, products; was 3.65)


# ------------------------------------------------------------------------------- analyze on models


def zipf_tokens(n: int, used: int = 30, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    """``n`` token ids: ``used`` tokens of a ``vocab`` drawn with Zipf frequencies (as real text is)."""
    g = torch.Generator().manual_seed(seed)
    p = 1 / torch.arange(1, used + 1, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=g) * (vocab // used)


def test_embedding_rows_are_projections_on_a_token_weighted_subspace():
    torch.manual_seed(0)
    E = torch.randn(300, 24)
    m = Moments()
    m.add_tokens(zipf_tokens(2000), 300)
    dec, info = embedding_decomposition(E, m)
    up, down = dec.factors(8)
    V = dec.Vh[:8].T
    # Every row, the 270 tokens calibration never saw included, is its projection on the subspace.
    assert torch.allclose(up @ down, E @ V @ V.T, atol=1e-5)
    full_up, full_down = dec.factors(24)
    assert torch.allclose(full_up @ full_down, E, atol=1e-4)
    # The weighted subspace beats the plain SVD's on the tokens text actually uses, weighted by use.
    plain_up, plain_down = svd(E).factors(8)
    freq = m.tokens / m.tokens.sum()
    err = lambda approx: float((freq[:, None] * (approx - E).double().square()).sum())  # noqa: E731
    assert err(up @ down) < 0.7 * err(plain_up @ plain_down)
    assert info["rows"] == 2000 and "token frequency" in info["whitening"]
    with pytest.raises(CompressorError, match="uniform_share"):
        embedding_decomposition(E, m, uniform_share=0.0)


class EmbedBag(nn.Module):
    def __init__(self, vocab: int = 300, dim: int = 24):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, 5)

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_calibrated_embedding_lowers_error_on_held_out_text():
    torch.manual_seed(0)
    model = EmbedBag()
    cal, held_out = zipf_tokens(512, seed=1).reshape(32, 16), zipf_tokens(512, seed=2).reshape(32, 16)
    opts = {"rank": 6, "include": ["emb"]}
    small_plain, _ = compressed(model, **opts)
    small_aware, plan = compressed(model, calibration=cal, **opts)
    assert plan.layer("emb").rank == 6 and plan.calibration["token_weighted_embeddings"] == ["emb"]
    assert output_error(model, small_aware, held_out) < 0.7 * output_error(model, small_plain, held_out)


@pytest.mark.parametrize("make,data", [(mlp, lambda: correlated(256, 24)), (cnn, lambda: images(64))],
                         ids=["mlp", "cnn"])
@pytest.mark.parametrize("sequential", [False, True])
def test_calibration_lowers_output_error_at_the_same_ranks(make, data, sequential):
    model, x = make(), data()
    small_plain, plain = compressed(model, rank_ratio=0.3)
    small_aware, aware = compressed(model, rank_ratio=0.3, calibration=[x[:len(x) // 2], x[len(x) // 2:]],
                                    sequential=sequential)
    assert aware.ranks() == plain.ranks() and aware.factored
    e_plain, e_aware = output_error(model, small_plain, x), output_error(model, small_aware, x)
    assert e_aware < 0.7 * e_plain, (e_aware, e_plain)


def test_sequential_correction_helps_a_deep_stack():
    torch.manual_seed(1)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(4)])
    x = correlated(400, 32, rank=10)
    errs = {}
    for seq in (False, True):
        small, _ = compressed(model, rank=6, calibration=x, sequential=seq, sensitivity=False)
        errs[seq] = output_error(model, small, x)
    assert errs[True] < 0.97 * errs[False], errs


def test_plan_records_method_calibration_and_errors(tmp_path):
    model, x = mlp(widths=WIDE), correlated(128, 24)
    plan = compressor.analyze(model, target=0.4, calibration=[x[:64], x[64:]])
    assert plan.method == "whitened-svd+sequential"
    cal = plan.calibration
    assert cal["samples"] == 128 and cal["batches"] == 2 and len(cal["sha256"]) == 64
    assert abs(plan.totals()["removed_fraction"] - 0.4) <= 0.01
    errs = [lp.estimated_output_error for lp in plan.factored]
    assert errs and all(0 < e < 1 for e in errs)
    plan.to_json(tmp_path / "plan.json")
    back = compressor.Plan.from_json(tmp_path / "plan.json")
    assert back.to_dict() == plan.to_dict()
    with pytest.raises(PlanError, match="calibration"):  # no silent fallback to plain SVD factors
        compressor.rewrite(copy.deepcopy(model), back)
    again = compressor.analyze(model, plan=back, calibration=[x[:64], x[64:]])
    assert again.ranks() == plan.ranks()
    reference = copy.deepcopy(model)
    assert 0 < output_error(reference, compressor.rewrite(model, again), x) < 0.5
    # The same data hashes the same; other data does not.
    assert compressor.analyze(model, target=0.4, calibration=x[:64]).calibration["sha256"] != cal["sha256"]


def test_target_within_one_percent_and_energy_is_whitened():
    model, x = mlp(widths=WIDE), correlated(128, 24)
    for t in (0.2, 0.5):
        plan = compressor.analyze(model, target=t, calibration=x)
        assert abs(plan.totals()["removed_fraction"] - t) <= 0.01
    whitened = compressor.analyze(model, energy=0.9, calibration=x)
    for lp in whitened.layers:
        assert lp.energy_kept >= 0.9 or lp.rank is None


def test_inputs_not_modified_and_dict_batches():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()

        def forward(self, features, scale=1.0):
            return self.body(features * scale)

    model = Keyword().train()
    x = correlated(64, 24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = compressor.analyze(model, rank=4, calibration=[{"features": x, "scale": torch.tensor(2.0)}])
    assert plan.factored and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_calibration_is_a_clear_error():
    with pytest.raises(CompressorError, match="empty"):
        compressor.analyze(mlp(), rank=4, calibration=[])
    with pytest.raises(CompressorError, match="calibration"):
        compressor.analyze(mlp(), rank=4, calibration="sentences.txt")


# ---------------------------------------------------------------------------------------- loaders


def save(path, fmt: str, data) -> None:
    if fmt == "pt":
        torch.save(data, path)
    elif fmt == "npz":
        np.savez(path, **{k: v.numpy() for k, v in data.items()})
    else:
        from safetensors.torch import save_file
        save_file(data, path)


@pytest.mark.parametrize("fmt,data,expect", [
    ("pt", torch.ones(10, 4), 1),
    ("pt", [torch.ones(6, 4), torch.ones(6, 4)], 2),
    ("pt", {"input_ids": torch.ones(10, 5, dtype=torch.long)}, 1),
    ("npz", {"x": torch.ones(10, 4)}, 1),
    ("npz", {"input_ids": torch.ones(10, 5, dtype=torch.long), "attention_mask": torch.ones(10, 5)}, 1),
    ("safetensors", {"x": torch.ones(10, 4)}, 1),
], ids=["pt-tensor", "pt-list", "pt-dict", "npz", "npz-dict", "safetensors"])
def test_load_calibration_formats(tmp_path, fmt, data, expect):
    path = tmp_path / f"cal.{fmt}"
    save(path, fmt, data)
    batches = load_calibration(path)
    assert len(batches) == expect
    capped = load_calibration(path, samples=7)
    first = capped[0] if isinstance(capped[0], torch.Tensor) else next(iter(capped[0].values()))
    assert sum((b if isinstance(b, torch.Tensor) else next(iter(b.values()))).shape[0] for b in capped) == 7
    assert first.shape[0] <= 7


@pytest.mark.parametrize("content,match", [(b"not a tensor file", "cannot read"), (None, "does not exist")])
def test_load_calibration_bad_files(tmp_path, content, match):
    path = tmp_path / "cal.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CompressorError, match=match):
        load_calibration(path)
    txt = tmp_path / "cal.txt"
    txt.write_text("hello\n")
    with pytest.raises(CompressorError, match=r"tokenizer|unknown type"):
        load_calibration(txt)


def test_pt_loader_runs_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "cal.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CompressorError, match="cannot read"):
        load_calibration(path)


@pytest.mark.minilm
@pytest.mark.skipif(minilm_path() is None, reason="all-MiniLM-L6-v2 is not installed")
def test_text_calibration_on_minilm(tmp_path):
    from compressor.examples import load_minilm
    model, tok = load_minilm()
    cal = [f"Sentence number {i} says that {w} is a {'short' if i % 2 else 'rather longer'} example."
           for i, w in enumerate(["the cat", "a parser", "this module", "the queue", "a socket", "it"] * 4)]
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(cal) + "\n\n")
    batches = load_calibration(path, tokenizer=tok, samples=20, batch_size=8)
    assert sorted(b["input_ids"].shape[0] for b in batches) == [4, 8, 8]
    plan = compressor.analyze(model, target=0.3, include=["encoder.layer.0.*"], calibration=batches)
    assert abs(plan.totals()["removed_fraction"] - 0.3) <= 0.01
    assert plan.calibration["tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)
    assert all(math.isfinite(lp.estimated_output_error) for lp in plan.factored)


def test_a_data_aware_plan_is_not_silently_reapplied_by_plain_svd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(64, 16)
    plan = compressor.analyze(model, rank=4, calibration=x)
    assert plan.method != "svd"
    edited = compressor.Plan.from_dict(plan.to_dict())
    with pytest.raises(compressor.CompressorError, match="calibration"):
        compressor.analyze(model, plan=edited)
    refreshed = compressor.analyze(model, plan=edited, calibration=x)
    assert refreshed.method == plan.method and refreshed.ranks() == plan.ranks()


class _WordTokenizer:
    """One token per word, padded to the batch's longest: enough of a tokenizer for batching."""

    def __call__(self, sentences, padding, truncation, max_length, return_tensors):
        ids = [[1 + len(w) for w in s.split()][:max_length] for s in sentences]
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}


def test_tokenize_batches_groups_lengths_in_a_seeded_random_order():
    from compressor.data.calibration import tokenize_batches
    sentences = [" ".join(["word"] * (1 + (7 * i) % 40)) for i in range(100)]
    batches = tokenize_batches(_WordTokenizer(), sentences, batch_size=10, max_length=64)
    mask = torch.cat([b["attention_mask"].flatten() for b in batches])
    assert sum(b["input_ids"].shape[0] for b in batches) == 100
    assert float(mask.float().mean()) > 0.9  # similar lengths together: little padding
    # Calibration measures on its first batches: they must not be the shortest sentences.
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths != sorted(widths)
    assert widths == [b["input_ids"].shape[1] for b in tokenize_batches(_WordTokenizer(), sentences, 10, 64)]
