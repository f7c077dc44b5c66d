"""4-bit weights with a low-rank correction of their rounding error (as in LQER, QERA, EoRA):

    corr = int4_correction(model, budget=0.05, calibration=batches)    # or rank=16, energy=0.5
    export_int4("model.onnx", "model.int4.onnx", corrections=corr.factors)

Each layer that onnxruntime's 4-bit export turns into a MatMulNBits node (``handler.int4 == "matmul"``)
is rounded as that export rounds it (:func:`compressor.core.int4.fake_int4_weight`, equal to
onnxruntime's own dequantized weight), and its error ``E = W - deq(Q(W))`` is approximated at rank ``r``
by ``B A``, so the layer computes ``deq(Q(W)) + B A``. Without calibration ``B A`` is the truncated SVD of
``E``: the weight error left is exactly the discarded part of ``E``'s spectrum. With calibration it is the
truncated SVD of ``E S`` mapped back by ``S^-1`` (``S S^T = X^T X``, the whitening of data-aware
factoring), which minimises the layer's output error ``||(E - B A) X||`` on the calibration rows.

Ranks come from one of three rules: ``rank`` (the same for every layer), ``energy`` (per layer, the
smallest rank keeping that fraction of the error's (whitened) spectral energy), or ``budget`` (correction
parameters worth that fraction of the corrected layers' weights, spent greedily where a parameter removes
the most error: relative output error scaled by each layer's measured effect on the model's output when
calibration is given, relative weight error otherwise).
"""

from __future__ import annotations

import copy
import heapq
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compressor.analysis.decoder import BlockPasses, is_decoder
from compressor.analysis.tracing import Calibrator
from compressor.analysis.whitened import Moments, accumulate, whitened_decomposition
from compressor.core.errors import CompressorError
from compressor.core.gptq import gptq
from compressor.core.handlers import handler_for
from compressor.core.int4 import INT4_BLOCK_SIZE, INT4_SYMMETRIC, fake_int4_weight, int4_grid, round_half_away
from compressor.core.policies import EnergyPolicy, LayerSpectrum, RankPolicy, allocate, policy_from_options
from compressor.core.progress import Progress
from compressor.core.svd import Decomposition, svd
from compressor.data.inputs import as_batches

CORRECTION_RULES = ("rank", "energy", "budget")
# How the int4 export rounds weights when it has calibration inputs; the first is the default. Without them it
# rounds to nearest. Blocks of 128: perplexity on held-out text SmolLM2-135M 1.34x -> 1.13x dense, Gemma 3 270M
# 1.72x -> 1.19x (benchmarks/results/int4_gptq.md); all-MiniLM-L6-v2 at low rank 0.2, held-out sentence cosine
# 0.942 -> 0.972 (edge_minilm_maxsize.md).
INT4_ROUNDINGS = ("gptq", "nearest")


@dataclass
class Int4Correction:
    """Low-rank corrections of 4-bit rounding errors, per layer (module name)."""

    block_size: int
    rule: dict[str, float]  # {"rank": 16}, {"energy": 0.5} or {"budget": 0.05}
    data_aware: bool
    ranks: dict[str, int]  # every int4 MatMul layer; 0: uncorrected
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # (up (m, r), down (r, n)) of corrected layers
    weight_error: dict[str, tuple[float, float]]  # ||W - W'||_F / ||W||_F without and with the correction
    info: dict[str, Any] = field(default_factory=dict)

    def parameters(self) -> int:
        """Weights the corrections add."""
        return sum(up.numel() + down.numel() for up, down in self.factors.values())

    def to_dict(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "rule": self.rule, "data_aware": self.data_aware,
                "parameters": self.parameters(), "ranks": self.ranks,
                "weight_error": {n: {"int4": a, "corrected": b} for n, (a, b) in self.weight_error.items()},
                **self.info}


def int4_layers(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The modules onnxruntime's 4-bit export stores as MatMulNBits, by name (less ``exclude``)."""
    out = {}
    for name, mod in model.named_modules():
        h = handler_for(mod)
        if h is not None and h.int4 == "matmul" and name not in exclude and h.weight(mod).is_floating_point():
            out[name] = mod
    return out


def correction_rule(rank: int | None = None, energy: float | None = None, budget: float | None = None
                    ) -> dict[str, float]:
    """Exactly one rank rule, checked: ``{"rank": r}``, ``{"energy": e}`` or ``{"budget": b}``."""
    given = {k: v for k, v in (("rank", rank), ("energy", energy), ("budget", budget)) if v is not None}
    if len(given) != 1:
        raise CompressorError(f"an int4 correction needs exactly one of rank, energy or budget, got "
                              f"{', '.join(given) or 'none'}", "pass e.g. rank=16, energy=0.5 or budget=0.05",
                              cli_fix="pass e.g. --int4-correction rank=16 (or energy=0.5, budget=0.05)")
    (key, value), = given.items()
    if key == "budget":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise CompressorError(f"int4 correction budget must be in (0, 1), the correction's parameters as a "
                                  f"fraction of the corrected layers' weights, got {value!r}", "pass e.g. 0.05")
        return {"budget": float(value)}
    policy_from_options(**{key: value})  # the same checks as a factoring rank policy
    return {key: value}


def parse_correction(text: str) -> dict[str, float]:
    """``"rank=16"``, ``"energy=0.5"`` or ``"budget=0.05"`` as a checked rule."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in CORRECTION_RULES:
        raise CompressorError(f"int4 correction '{text}' is not RULE=VALUE with RULE one of "
                              f"{', '.join(CORRECTION_RULES)}", "pass e.g. rank=16, energy=0.5 or budget=0.05",
                              cli_fix="pass e.g. --int4-correction rank=16")
    try:
        number: float = int(value) if key == "rank" else float(value)
    except ValueError:
        raise CompressorError(f"int4 correction '{text}': '{value}' is not a number",
                              "pass e.g. rank=16, energy=0.5 or budget=0.05") from None
    return correction_rule(**{key: number})


@torch.no_grad()
def int4_correction(model: nn.Module, *, rank: int | None = None, energy: float | None = None,
                    budget: float | None = None, block_size: int = INT4_BLOCK_SIZE,
                    calibration: Any = None, outputs: Sequence[str] | None = None, sensitivity: bool = True,
                    exclude: Sequence[str] = (), weights: Mapping[str, torch.Tensor] | None = None
                    ) -> Int4Correction:
    """Low-rank corrections of every int4 MatMul layer's rounding error (see the module docstring).

    ``calibration`` (batches as for ``analyze``) makes them data-aware and, with ``budget``, scales each
    layer's error by its measured effect on the model's ``outputs`` (``sensitivity``). ``weights``: the
    matrices the export is given instead of some layers' own (:func:`gptq_int4`'s), whose rounding the
    correction then corrects. ``model`` is not changed."""
    rule = correction_rule(rank, energy, budget)
    layers = int4_layers(model, exclude)
    if not layers:
        raise CompressorError(f"{type(model).__name__} has no layer the int4 export stores as MatMulNBits",
                              "int4 corrections apply to Linear layers (and transformers' Conv1D)")
    rounded = {n: fake_int4_weight((weights or {}).get(n, handler_for(m).weight_matrix(m)), block_size)
               for n, m in layers.items()}
    errors = {n: handler_for(m).weight_matrix(m).detach().float() - rounded[n] for n, m in layers.items()}
    decs: dict[str, Decomposition] = {}
    scale: dict[str, float] = {}  # gain of a unit of S^2, comparable across layers
    info: dict[str, Any] = {}
    cal = None
    if calibration is not None:
        cal = Calibrator(model, layers, as_batches(calibration), outputs)
        for name, mom in cal.moments()[0].items():
            W = handler_for(layers[name]).weight_matrix(layers[name]).double()
            if mom.xx is None:  # never reached by the calibration data
                decs[name] = svd(errors[name])
                scale[name] = 1 / max(float(W.square().sum()), 1e-30)
            else:
                decs[name], _ = whitened_decomposition(errors[name], mom)
                scale[name] = 1 / max(float((W @ mom.xx * W).sum()), 1e-30)  # ||W X||^2
    else:
        for name, E in errors.items():
            decs[name] = svd(E)
            W = handler_for(layers[name]).weight_matrix(layers[name]).double()
            scale[name] = 1 / max(float(W.square().sum()), 1e-30)
    if cal is not None and sensitivity and "budget" in rule:
        # How much the model's outputs move with each layer alone at int4, per unit of that layer's own
        # whitened error energy: the error a correction removes is worth that much more or less.
        moved = cal.output_errors({n: _with_weight(m, rounded[n]) for n, m in layers.items()}, limit=2)
        for name in layers:
            total = float(decs[name].S.double().square().sum())
            scale[name] = moved[name] / total if total > 0 else 0.0
        info["sensitivity"] = {n: round(v, 8) for n, v in moved.items()}
    ranks = _ranks(rule, layers, decs, scale)
    factors, weight_error = {}, {}
    for name, mod in layers.items():
        W = handler_for(mod).weight_matrix(mod).detach().float()
        E = errors[name]
        r = ranks[name]
        before = float(E.norm() / W.norm().clamp(min=1e-30))
        if r:
            up, down = decs[name].factors(r)
            factors[name] = (up.float(), down.float())
            after = float((E - up.float() @ down.float()).norm() / W.norm().clamp(min=1e-30))
        else:
            after = before
        weight_error[name] = (before, after)
    info["whitening"] = "calibration X^T X" if cal is not None else "none (plain SVD of the error)"
    info["rounding"] = {"gptq": sorted(set(weights or {}) & set(layers))} if weights else "nearest"
    return Int4Correction(block_size, rule, cal is not None, ranks, factors, weight_error, info)


@torch.no_grad()
def gptq_int4(model: nn.Module, calibration: Any, *, block_size: int = INT4_BLOCK_SIZE,
              exclude: Sequence[str] = (), progress: bool | None = None) -> dict[str, torch.Tensor]:
    """Per int4 MatMul layer reached by ``calibration``, the weight matrix to export instead of its own so that
    onnxruntime's 4-bit rounding of it is GPTQ's (:func:`gptq_int4_weight`), fitted to that layer's inputs on
    the calibration batches; ``model`` is not changed. Layers the calibration never reaches are left out.
    A decoder, rounded block by block, prints one line per block with ``progress`` (None: on a terminal)."""
    # A weight several modules share (an LM head tied to the embedding) is also a lookup table: left as it is.
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    layers = {n: m for n, m in int4_layers(model, exclude).items() if uses[id(handler_for(m).weight(m))] == 1}
    if not layers:
        return {}
    batches = as_batches(calibration)
    if is_decoder(model):
        return _gptq_by_block(model, layers, batches, block_size, progress)
    moments = Calibrator(model, layers, batches).moments()[0]
    return {name: gptq_int4_weight(handler_for(layers[name]).weight_matrix(layers[name]), mom.xx, block_size)
            for name, mom in moments.items() if mom.xx is not None}


def _gptq_by_block(model: nn.Module, layers: dict[str, nn.Module], batches: list, block_size: int,
                   progress: bool | None) -> dict[str, torch.Tensor]:
    """:func:`gptq_int4` for a decoder, one transformer block at a time as GPTQ itself goes: only one block's
    ``X^T X`` are held (a 7B-shaped block's are about 1 GB, the whole model's 30 times that), and block
    ``i + 1`` is fitted to the outputs of block ``i`` with its weights already at their 4-bit values, so each
    block's rounding also answers the errors of the blocks before it. The layers after the last block (an
    untied output head) are fitted last, on the rounded blocks' outputs."""
    passes = BlockPasses(model, batches)
    count = len(passes.blocks)
    out: dict[str, torch.Tensor] = {}
    carried = None
    show = Progress("int4 gptq", count, progress)
    for i in range(count + 1):
        inside = f"{passes.name}.{i}." if i < count else None
        mine = {n: m for n, m in layers.items()
                if (n.startswith(inside) if inside else not n.startswith(f"{passes.name}."))}
        if mine:
            acc = {n: Moments() for n in mine}
            passes.run(i, carried, hooked=mine,
                       pre=lambda n, _b, x, mask, acc=acc, mine=mine: accumulate(acc[n], mine[n], x, mask))
            for n, mom in acc.items():
                if mom.xx is not None:
                    out[n] = gptq_int4_weight(handler_for(mine[n]).weight_matrix(mine[n]), mom.xx, block_size)
            del acc
        if i < count:
            block = None
            if any(n in out for n in mine):  # the block as the int4 file computes it
                block = copy.deepcopy(passes.blocks[i])
                for n in mine:
                    if n in out:
                        sub = block.get_submodule(n.removeprefix(inside))
                        handler_for(sub).weight_matrix(sub).copy_(fake_int4_weight(out[n], block_size))
            carried = passes.run(i, carried, block=block)
            show.step(f"block {i + 1}/{count} rounded")
    return out


def gptq_int4_weight(weight: torch.Tensor, xx: torch.Tensor, block_size: int = INT4_BLOCK_SIZE) -> torch.Tensor:
    """``weight`` (m, n) rounded by GPTQ (:func:`compressor.core.gptq.gptq`, ``xx`` the (n, n) ``X^T X`` of
    its inputs) onto the grid onnxruntime's asymmetric 4-bit export gives it: a scale and zero point per block
    of ``block_size`` weights of a row, from the block's smallest and largest weight. Returned as the float32
    matrix to give that export: each block's smallest and largest weights stay as they are (they set its scale
    and zero point, and round as before), every other weight sits on its GPTQ grid value, or at the block's
    extreme where GPTQ chose the extreme's level, so that onnxruntime's rounding, and
    :func:`compressor.core.int4.fake_int4_weight`, give back exactly GPTQ's values."""
    if INT4_SYMMETRIC:
        raise NotImplementedError("GPTQ follows the asymmetric int4 grid only")
    m, n = weight.shape
    blocks = -(-n // block_size)
    x = F.pad(weight.detach().float(), (0, blocks * block_size - n)).reshape(m, blocks, block_size)
    scale, zp = int4_grid(x)  # (m, blocks, 1) each, float32 as onnxruntime computes them
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    q_lo, q_hi = (round_half_away(v * inv + zp).clamp(0, 15) for v in (lo, hi))  # the levels lo and hi take
    offset = torch.arange(blocks)[None, :, None] * block_size
    at_lo = torch.where(lo < 0, x.argmin(-1, keepdim=True) + offset, -1)[..., 0]  # the weights that set the grid
    at_hi = torch.where(hi > 0, x.argmax(-1, keepdim=True) + offset, -1)[..., 0]
    scale, zp, inv, q_lo, q_hi = (t[..., 0].double() for t in (scale, zp, inv, q_lo, q_hi))
    levels = torch.empty(m, n, dtype=torch.float64)

    def round_column(column: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        j = int(column[0])
        b = j // block_size
        q = (values[0] * inv[:, b] + zp[:, b]).round().clamp(q_lo[:, b], q_hi[:, b])
        q = torch.where(at_lo[:, b] == j, q_lo[:, b], torch.where(at_hi[:, b] == j, q_hi[:, b], q))
        levels[:, j] = q
        return ((q.float() - zp[:, b].float()) * scale[:, b].float())[None]

    gptq(weight.detach()[None], xx[None], round_column)
    block = torch.arange(n) // block_size
    out = ((levels - zp[:, block]).float() * scale[:, block].float())
    out = torch.where(levels == q_lo[:, block], lo[..., 0][:, block], out)
    return torch.where(levels == q_hi[:, block], hi[..., 0][:, block], out).to(weight.dtype)


def _ranks(rule: dict[str, float], layers: dict[str, nn.Module], decs: dict[str, Decomposition],
           scale: dict[str, float]) -> dict[str, int]:
    shapes = {n: tuple(handler_for(m).weight_matrix(m).shape) for n, m in layers.items()}
    if "budget" not in rule:
        policy = RankPolicy(int(rule["rank"])) if "rank" in rule else EnergyPolicy(float(rule["energy"]))
        spectra = [LayerSpectrum.from_singular_values(n, *shapes[n], decs[n].S) for n in layers]
        return {n: int(r or 0) for n, r in allocate(policy, spectra).items()}
    # Greedy by error removed per correction parameter: within a layer the gains S_j^2 only decrease,
    # so taking the best next rank of any layer until the budget is spent is optimal (up to the last step).
    allowed = rule["budget"] * sum(m * n for m, n in shapes.values())
    ranks = dict.fromkeys(layers, 0)
    heap = [(-scale[n] * float(decs[n].S[0]) ** 2 / sum(shapes[n]), n) for n in layers if len(decs[n].S)]
    heapq.heapify(heap)
    spent = 0
    while heap:
        _, name = heapq.heappop(heap)
        cost = sum(shapes[name])
        if spent + cost > allowed:
            continue  # a smaller layer's next rank may still fit
        spent += cost
        ranks[name] += 1
        r = ranks[name]
        if r < len(decs[name].S):
            heapq.heappush(heap, (-scale[name] * float(decs[name].S[r]) ** 2 / cost, name))
    return ranks


def _with_weight(module: nn.Module, matrix: torch.Tensor) -> nn.Module:
    """A copy of ``module`` whose weight matrix is ``matrix``."""
    new = copy.deepcopy(module)
    handler_for(new).weight_matrix(new).copy_(matrix)
    return new


@torch.no_grad()
def simulate_int4(model: nn.Module, block_size: int = INT4_BLOCK_SIZE,
                  correction: Int4Correction | None = None,
                  weights: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``model`` with the weights the int4 export stores: every MatMul and embedding layer
    rounded as onnxruntime rounds it (given ``weights`` instead of their own where named, plus its correction,
    if any); other layers unchanged."""
    new = copy.deepcopy(model)
    factors = correction.factors if correction is not None else {}
    done: set[int] = set()  # a tied weight (embedding and LM head) is rounded once
    for name, mod in new.named_modules():
        h = handler_for(mod)
        if h is None or h.int4 == "none" or not h.weight(mod).is_floating_point() or id(h.weight(mod)) in done:
            continue
        done.add(id(h.weight(mod)))
        W = h.weight_matrix(mod)
        W2 = fake_int4_weight((weights or {}).get(name, W), block_size)
        if name in factors:
            up, down = factors[name]
            W2 = W2 + (up @ down).to(W2)
        W.copy_(W2)
    return new
