"""Data-aware compression: calibration inputs, activation-aware (whitened) factors, sequential correction
and output-error rank budgets.

    plan = compressor.analyze(model, target=0.4, calibration=batches)   # batches: tensors, tuples or dicts

What is computed, per factorizable layer, from forward hooks (activations are streamed, never stored):

* the input second moment ``C = X^T X`` (rows of ``X`` are tokens / conv patches; padding tokens are left
  out when a batch is a dict with an ``attention_mask``);
* a whitening ``S`` with ``C + damping = S S^T`` (Cholesky; growing damping, then an eigen-decomposition
  with clamped eigenvalues when ``C`` is singular or not positive definite, e.g. dead or duplicated
  features); then ``||(W - W') X|| = ||(W - W') S||``, so the truncated SVD of ``W S`` mapped back by
  ``S^-1`` is the rank-r ``W'`` with the least output error (SVD-LLM);
* sequential correction: layers are refit in execution order on the inputs ``X^`` produced by the
  already-compressed layers before them, against the ORIGINAL outputs ``W X``: the best rank-r ``W'`` for
  ``||W X - W' X^||`` is the whitened truncation (by ``X^``) of the least-squares map
  ``W* = W (X^T X^)(X^^T X^)^-1``, so later layers absorb part of the earlier truncation error;
* sensitivity: each layer is truncated alone and the change of the model's output measured, which scales
  its whitened error curve, so a parameter ``target`` is spent where the model's output loses least.

Embeddings take token ids, whose "second moment" is a token count. Their rows are weighted by how
often text uses each token (calibration frequencies mixed with a uniform share, since held-out text
uses tokens calibration never saw): the SVD of the weighted table picks the rank-r subspace, and every
row, rare ones included, is projected onto it (:func:`embedding_decomposition`). A plain SVD spends
rank on the thousands of tokens real text hardly uses.

The loaders (:func:`load_calibration`) read calibration tensors from ``.pt`` (weights only), ``.npz`` and
``.safetensors`` files, or a text file with one sentence per line tokenized with the model's tokenizer.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from compressor.core.errors import CompressorError
from compressor.core.svd import Decomposition, compute_dtype, layer_kind, svd, weight_matrix

Batch = torch.Tensor | tuple | list | dict
# Ridge added to C, relative to its mean diagonal, tried in order. 1% (not a bare jitter) regularises the
# whitening and the sequential least-squares refits against over-fitting a few thousand calibration
# tokens: on all-MiniLM-L6-v2 at 40% removal it raised held-out embedding cosine from 0.879 (1e-6) to 0.898.
DAMPING = (1e-2, 1e-1)
# Share of an embedding's row weights spread evenly over the vocabulary: every token keeps some weight
# (a few hundred sentences never see most of a 30k vocabulary), while the subspace is chosen mostly by
# the tokens text uses. On all-MiniLM-L6-v2 any share from 0.2% to 50% did about equally well on held-out
# sentences, and far better than the plain SVD (share 1): benchmarks/results/embedding_factoring.md.
UNIFORM_TOKEN_SHARE = 0.1
ORIGINALS_BUDGET = 2 << 30  # bytes of original-model layer inputs kept to halve sequential passes


# ------------------------------------------------------------------------------------ calibration data


def as_batches(calibration: Any) -> list[Batch]:
    """The calibration data as a list of model inputs (one batch: a tensor, tuple or dict of tensors)."""
    if isinstance(calibration, torch.Tensor | dict) or (
            isinstance(calibration, tuple) and all(isinstance(t, torch.Tensor) for t in calibration)):
        batches = [calibration]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, str | bytes):
        batches = list(calibration)
    else:
        raise CompressorError(f"calibration must be model inputs (tensors, tuples or dicts of tensors), got "
                              f"{type(calibration).__name__}", "pass a list of batches, e.g. [x1, x2]")
    if not batches:
        raise CompressorError("calibration data is empty", "pass at least one batch of model inputs")
    for b in batches:
        if not _tensors(b):
            raise CompressorError(f"a calibration batch holds no tensors ({type(b).__name__})",
                                  "pass tensors, tuples of tensors or dicts of named tensors")
    return batches


def check_fits(model: nn.Module, batches: list[Batch], what: str) -> None:
    """Run ``model`` on two samples of the first batch and turn a failure (inputs of the wrong shape or
    dtype for this model) into one :class:`CompressorError` naming ``what`` the inputs were."""
    batch = _slice(batches[0], 2)
    shapes = ", ".join("x".join(map(str, t.shape)) for t in _tensors(batches[0]))
    try:
        with _eval(model):
            run_model(model, batch)
    except Exception as err:  # any failure of the user's model on these inputs
        first = (str(err).strip().splitlines() or [""])[0][:160]
        raise CompressorError(f"{what} (shape {shapes}) do not fit the model ({type(err).__name__}: {first})",
                              "pass inputs shaped and typed like the model's example inputs") from None


def _tensors(batch: Batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [v for _, v in sorted(batch.items()) if isinstance(v, torch.Tensor)]
    if isinstance(batch, tuple | list):
        return [t for t in batch if isinstance(t, torch.Tensor)]
    return []


def describe(batches: list[Batch]) -> dict[str, Any]:
    """Count of samples and tokens, and a sha256 of the calibration data (for the plan)."""
    digest = hashlib.sha256()
    samples = tokens = 0
    for b in batches:
        for t in _tensors(b):
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        first = _tensors(b)[0]
        samples += first.shape[0] if first.dim() else 1
        mask = mask_of(b)
        if mask is not None:
            tokens += int(mask.sum())
        elif not first.is_floating_point():  # token ids
            tokens += first.numel()
    return {"batches": len(batches), "samples": samples, "tokens": tokens or None,
            "sha256": digest.hexdigest()}


def mask_of(batch: Batch) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _to(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return type(batch)(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch)


def run_model(model: nn.Module, batch: Batch) -> Any:
    """``model(batch)``, ``model(*batch)`` or ``model(**batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def first_tensor(out: Any) -> torch.Tensor:
    """The main output of a model: itself, or the first tensor of a tuple / dict / ModelOutput."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise CompressorError("the model's output holds no tensor", "calibrate a model that returns tensors")


# ------------------------------------------------------------------------------ activation statistics


def input_rows(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The rows ``x_i`` with ``y_i = W x_i`` that ``module`` computes on input ``x``, or None
    (embeddings). ``mask`` (batch, tokens) drops padding tokens of a sequence input."""
    kind = layer_kind(module)
    if kind == "linear":
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask.to(torch.bool)]
        return x.reshape(-1, x.shape[-1])
    if kind in ("conv1d", "conv2d"):
        if kind == "conv1d":  # as a 1-row image, so that unfold applies
            x = x.unsqueeze(-2)
            k, s, d, p = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation), module.padding
            p = p if isinstance(p, str) else (0, *p)
        else:
            k, s, d, p = module.kernel_size, module.stride, module.dilation, module.padding
        if isinstance(p, str):  # "valid" / "same" (odd kernels); non-zero padding modes are approximated
            p = (0, 0) if p == "valid" else tuple(di * (ki - 1) // 2 for ki, di in zip(k, d, strict=True))
        patches = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (B, n, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return None


@dataclass
class Moments:
    """Streamed sums over calibration rows: ``X^T X`` (and, for sequential correction, the cross moment
    ``X^T X^`` and ``X^^T X^`` of the compressed model's inputs ``X^``), in float64."""

    xx: torch.Tensor | None = None
    hh: torch.Tensor | None = None
    xh: torch.Tensor | None = None
    rows: int = 0
    tokens: torch.Tensor | None = None  # embeddings: how often each row was looked up

    def add_tokens(self, ids: torch.Tensor, num_embeddings: int) -> None:
        counts = torch.bincount(ids.detach().reshape(-1).long(), minlength=num_embeddings).double()
        self.tokens = counts if self.tokens is None else self.tokens.add_(counts)
        self.rows += ids.numel()

    def add(self, x: torch.Tensor, h: torch.Tensor | None = None) -> None:
        x = x.detach().double()
        self.xx = x.T @ x if self.xx is None else self.xx.addmm_(x.T, x)
        if h is not None:
            h = h.detach().double()
            self.hh = h.T @ h if self.hh is None else self.hh.addmm_(h.T, h)
            self.xh = x.T @ h if self.xh is None else self.xh.addmm_(x.T, h)
        self.rows += x.shape[0]


@dataclass
class Whitening:
    """``S`` with ``C + damping I = S S^T``, its inverse, and how it was obtained."""

    S: torch.Tensor
    S_inv: torch.Tensor
    method: str  # "cholesky", "eigh" or "identity"
    damping: float  # relative to the mean diagonal of C


def whitening(C: torch.Tensor, damping: tuple[float, ...] = DAMPING) -> Whitening:
    """A whitening factor of the second moment ``C``: Cholesky with growing damping, then eigh with
    clamped eigenvalues; identity for an all-zero ``C``. Always finite."""
    C = C.double()
    n = C.shape[0]
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    scale = float(C.diagonal().mean()) if n else 0.0
    if not math.isfinite(scale) or scale <= 0:
        return Whitening(eye, eye, "identity", 0.0)
    C = (C + C.T) / 2
    for d in damping:
        L, info = torch.linalg.cholesky_ex(C + d * scale * eye)
        if int(info) == 0:
            L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
            # A factor that is not finite or too ill-conditioned to invert accurately: damp more.
            if torch.isfinite(L_inv).all() and float(L.diagonal().min()) > 1e-7 * math.sqrt(scale):
                return Whitening(L, L_inv, "cholesky", d)
    e, Q = torch.linalg.eigh(C)
    floor = damping[-1] * scale
    root = e.clamp(min=0).add(floor).sqrt()
    return Whitening(Q * root, (Q / root).T, "eigh", damping[-1])


def whitened_decomposition(W: torch.Tensor, m: Moments, damping: tuple[float, ...] = DAMPING
                           ) -> tuple[Decomposition, dict[str, Any]]:
    """Factors of ``W`` (m x n) minimising output error on the calibration rows.

    Without sequential statistics: SVD of ``W S`` with ``S`` from ``X^T X``. With them (``m.hh``): the
    least-squares map ``W* = W (X^T X^) (X^^T X^)^-1`` whitened by ``X^^T X^``. ``info`` holds the
    whitening method, damping, and the irreducible and total output energy (for error estimates).
    """
    out_dtype = compute_dtype(W.dtype)
    Wd = W.detach().double()
    seq = m.hh is not None
    wh = whitening(m.hh if seq else m.xx, damping)
    # W* S = W C_xh C^-1 S = W C_xh S^-T, since C = S S^T.
    A = Wd @ m.xh @ wh.S_inv.T if seq else Wd @ wh.S
    # Moments and whitening are float64 (sums of many rows, ill-conditioned); the SVD itself runs in
    # the weight's compute dtype, as plain SVD does (float64 SVDs are about 5x slower on CPU).
    U, S, Vh = torch.linalg.svd(A.to(out_dtype), full_matrices=False)
    S = S.double()
    total = float((Wd @ m.xx * Wd).sum())  # ||W X||^2 of the original layer
    floor = max(0.0, total - float(S.square().sum())) if seq else 0.0  # ||W X - W* X^||^2
    dec = Decomposition(U.to(out_dtype), S.to(out_dtype), Vh.to(out_dtype), wh.S_inv.to(out_dtype))
    info = {"whitening": wh.method, "damping": wh.damping, "output_energy": total, "floor": floor,
            "rows": m.rows}
    return dec, info


def embedding_decomposition(E: torch.Tensor, m: Moments, uniform_share: float = UNIFORM_TOKEN_SHARE
                            ) -> tuple[Decomposition, dict[str, Any]]:
    """Factors of an embedding table ``E`` (tokens x dim) minimising the expected error of a looked-up
    row, over tokens drawn from the calibration frequencies mixed with ``uniform_share`` of uniform.

    With ``p`` those token probabilities, the SVD of ``diag(sqrt p) E`` gives the subspace; un-weighting
    the left factor makes every row's approximation its projection onto that subspace, so a token that
    calibration never saw keeps its best approximation in it rather than being dropped.
    """
    if not 0 < uniform_share <= 1:  # 0 would leave unseen tokens weightless: no way back to their rows
        raise CompressorError(f"uniform_share {uniform_share} is outside (0, 1]", "use e.g. 0.1")
    out_dtype = compute_dtype(E.dtype)
    counts = m.tokens.to(E.device)
    p = (1 - uniform_share) * counts / counts.sum().clamp(min=1) + uniform_share / len(counts)
    root = p.sqrt()
    U, S, Vh = torch.linalg.svd((root[:, None] * E.detach().double()).to(out_dtype), full_matrices=False)
    dec = Decomposition(U, S, Vh, left_inv=(1 / root).to(out_dtype))
    info = {"whitening": f"token frequency ({uniform_share:g} uniform share)",
            "output_energy": float(S.double().square().sum()), "floor": 0.0, "rows": m.rows}
    return dec, info


def output_error(dec: Decomposition, info: dict[str, Any], rank: int) -> float:
    """Estimated relative output error ``||W X - W' X^|| / ||W X||`` of the layer at ``rank``."""
    if "output_energy" not in info or info["output_energy"] <= 0:
        return float("nan")
    tail = float(dec.S[rank:].double().square().sum())
    return math.sqrt(min(1.0, (info["floor"] + tail) / info["output_energy"]))


# -------------------------------------------------------------------------------------------- hooks


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the inputs needed are captured."""


@contextmanager
def _hooks(modules: dict[str, nn.Module], pre=None, post=None) -> Iterator[None]:
    handles = []
    try:
        for name, mod in modules.items():
            if pre is not None:
                handles.append(mod.register_forward_pre_hook(lambda _m, args, n=name: pre(n, args)))
            if post is not None:
                handles.append(mod.register_forward_hook(lambda _m, args, out, n=name: post(n, args, out)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in modes.items():
            m.train(t)


def _forward(model: nn.Module, batch: Batch) -> Any:
    try:
        return run_model(model, batch)
    except _Stop:
        return None


@dataclass
class Calibrator:
    """Runs calibration passes over one model with hooks; the model's weights are never changed."""

    model: nn.Module
    modules: dict[str, nn.Module]  # factorizable layers, by name
    batches: list[Batch]
    device: torch.device = field(init=False)
    order: list[list[str]] = field(init=False)  # groups of layers reading the same input, in call order
    repeated: bool = field(init=False)  # a layer is called more than once per forward

    def __post_init__(self) -> None:
        p = next(iter(self.model.parameters()), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.batches = [_to(b, self.device) for b in self.batches]
        self._trace()

    def _trace(self) -> None:
        seen: list[tuple[str, int]] = []
        alive = []  # inputs held during the trace, so that no two share a (freed and reused) address

        def pre(name, args):
            x = args[0] if args else None
            alive.append(x)
            seen.append((name, x.data_ptr() if isinstance(x, torch.Tensor) else id(x)))

        with _eval(self.model), _hooks(self.modules, pre=pre):
            run_model(self.model, self.batches[0])
        names = [n for n, _ in seen]
        self.repeated = len(names) != len(set(names))
        groups: list[list[str]] = []
        key_of: dict[int, int] = {}
        for name, key in seen:
            if any(name in g for g in groups):
                continue
            if key in key_of:
                groups[key_of[key]].append(name)
            else:
                key_of[key] = len(groups)
                groups.append([name])
        never = [n for n in self.modules if not any(n in g for g in groups)]
        self.order = groups + [[n] for n in never]

    def moments(self) -> dict[str, Moments]:
        """``X^T X`` of every layer's input on the unchanged model, in one pass over the data."""
        acc = {name: Moments() for name in self.modules}
        mask = None

        def pre(name, args):
            mod = self.modules[name]
            if layer_kind(mod) == "embedding":
                ids = args[0]
                if mask is not None and tuple(ids.shape) == tuple(mask.shape):
                    ids = ids[mask.to(torch.bool)]
                acc[name].add_tokens(ids, mod.num_embeddings)
                return
            rows = input_rows(mod, args[0], mask)
            if rows is not None:
                acc[name].add(rows)

        with _eval(self.model), _hooks(self.modules, pre=pre):
            for b in self.batches:
                mask = mask_of(b)
                run_model(self.model, b)
        return acc

    def original_inputs(self, budget_bytes: int) -> dict[str, list[torch.Tensor | None]] | None:
        """Every layer group's input rows on the original model, per batch (one pass), or None when
        they would take more than ``budget_bytes``: then each sequential step recomputes them."""
        firsts = {g[0]: g for g in self.order}
        need = 0

        def size(name, args):
            nonlocal need
            rows = input_rows(self.modules[name], args[0], mask)
            need += 0 if rows is None else rows.numel() * 4

        store: dict[str, list[torch.Tensor | None]] = {n: [] for n in firsts}

        def keep(name, args):
            rows = input_rows(self.modules[name], args[0], mask)
            store[name].append(None if rows is None else rows.float())

        mods = {n: self.modules[n] for n in firsts}
        with _eval(self.model), _hooks(mods, pre=size):
            mask = mask_of(self.batches[0])
            run_model(self.model, self.batches[0])
        if self.repeated or need * len(self.batches) > budget_bytes:
            return None
        with _eval(self.model), _hooks(mods, pre=keep):
            for b in self.batches:
                mask = mask_of(b)
                run_model(self.model, b)
        return store

    def paired_moments(self, group: list[str], replaced: dict[str, nn.Module],
                       originals: dict[str, list[torch.Tensor | None]] | None = None) -> dict[str, Moments]:
        """Moments of ``group``'s input on the original model (X) paired with the model whose layers in
        ``replaced`` run compressed (X^), batch by batch. The members of a group read the same input."""
        acc = {name: Moments() for name in group}
        captured: dict[str, torch.Tensor] = {}
        mods = {n: self.modules[n] for n in group}
        first = group[0]

        def capture(name, args):
            captured[name] = args[0]
            if name == first and not self.repeated:
                raise _Stop

        def swap(name, args, out):
            return replaced[name](args[0])

        with _eval(self.model):
            for i, b in enumerate(self.batches):
                mask = mask_of(b)
                if originals is None:
                    with _hooks(mods, pre=capture):
                        _forward(self.model, b)
                    x = input_rows(self.modules[first], captured[first], mask)
                else:
                    x = originals[first][i]
                with _hooks({n: self.modules[n] for n in replaced}, post=swap), _hooks(mods, pre=capture):
                    _forward(self.model, b)
                h = input_rows(self.modules[first], captured[first], mask)
                if x is not None:
                    for name in group:
                        acc[name].add(x, h)
        return acc

    def output_errors(self, replacements: dict[str, nn.Module], limit: int) -> dict[str, float]:
        """Relative change ``||Y' - Y||^2 / ||Y||^2`` of the model's output when each layer alone is
        replaced, over the first ``limit`` calibration batches."""
        batches = self.batches[:limit]
        with _eval(self.model):
            refs = [first_tensor(run_model(self.model, b)) for b in batches]
            out: dict[str, float] = {}
            for name, new in replacements.items():
                with _hooks({name: self.modules[name]}, post=lambda _n, args, _o, new=new: new(args[0])):
                    out[name] = relative_change(self.model, batches, refs)
        return out


def relative_change(model: nn.Module, batches: list[Batch], refs: list[torch.Tensor]) -> float:
    """``||Y' - Y||^2 / ||Y||^2`` of ``model``'s first output over ``batches`` against ``refs`` (``Y``),
    padding positions left out."""
    num = den = 0.0
    for b, ref in zip(batches, refs, strict=True):
        diff, ref = (first_tensor(run_model(model, b)) - ref).double(), ref.double()
        mask = mask_of(b)
        if mask is not None and tuple(ref.shape[:2]) == tuple(mask.shape):
            keep = mask.to(torch.bool)  # padding positions are not part of any output
            diff, ref = diff[keep], ref[keep]
        num, den = num + float(diff.square().sum()), den + float(ref.square().sum())
    return num / den if den > 0 else 0.0


def plain_decomposition(module: nn.Module) -> tuple[Decomposition, dict[str, Any]]:
    return svd(weight_matrix(module)), {"whitening": "none (not reached by the calibration data: plain SVD)"}


# ------------------------------------------------------------------------------------------ loaders


def load_calibration(path: str | Path, *, tokenizer=None, samples: int | None = None, batch_size: int = 32,
                     max_length: int = 128) -> list[Batch]:
    """Calibration batches from a file.

    * ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``), ``.npz``, ``.safetensors``: one batch (a
      tensor, or named tensors as a dict: keyword inputs) or a list of batches (``.pt`` only);
    * with a ``tokenizer`` (Hugging Face), a text file with one sentence per line, tokenized in batches
      of ``batch_size`` (sentences sorted by length to limit padding).

    ``samples`` caps the number of samples (rows of the first dimension) used.
    """
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"calibration file '{path}' does not exist", "check the path")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise CompressorError(f"calibration samples must be a whole number >= 1, got {samples}",
                              "pass e.g. --calibration-samples 256")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth", ".bin"):
            data = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npz":
            import numpy as np
            with np.load(path, allow_pickle=False) as z:
                data = {k: torch.from_numpy(z[k]) for k in z.files}
        elif suffix == ".safetensors":
            from safetensors.torch import load_file
            data = load_file(path)
        elif tokenizer is not None:
            return _text_batches(path, tokenizer, samples, batch_size, max_length)
        else:
            raise CompressorError(f"calibration file '{path}' has an unknown type '{suffix}'",
                                  "use .pt, .npz or .safetensors tensors, or a text file for a text model")
    except CompressorError:
        raise
    except Exception as err:
        raise CompressorError(f"cannot read calibration file '{path}' ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:120] if str(err) else ''})",
                              "write it with torch.save / numpy.savez / safetensors") from None
    if isinstance(data, dict) and len(data) == 1:
        data = next(iter(data.values()))  # a single named tensor: positional input
    batches = as_batches(data if isinstance(data, list) else [data])
    return _cap(batches, samples)


def _cap(batches: list[Batch], samples: int | None) -> list[Batch]:
    if samples is None:
        return batches
    out, left = [], samples
    for b in batches:
        if left <= 0:
            break
        n = _tensors(b)[0].shape[0]
        out.append(b if n <= left else _slice(b, left))
        left -= n
    return out


def _slice(batch: Batch, n: int) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return type(batch)(t[:n] if isinstance(t, torch.Tensor) else t for t in batch)


def _text_batches(path: Path, tokenizer, samples: int | None, batch_size: int, max_length: int
                  ) -> list[Batch]:
    try:
        lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise CompressorError(f"calibration file '{path}' is not UTF-8 text",
                              "pass a text file with one sentence per line") from None
    sentences = [s for s in lines if s][:samples]
    if not sentences:
        raise CompressorError(f"calibration file '{path}' has no sentences", "put one sentence per line")
    return tokenize_batches(tokenizer, sentences, batch_size, max_length)


def tokenize_batches(tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128
                     ) -> list[dict[str, torch.Tensor]]:
    """Sentences tokenized in batches, sorted by length so that batches carry little padding."""
    ordered = sorted(sentences, key=len)
    return [dict(tokenizer(ordered[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt"))
            for i in range(0, len(ordered), batch_size)]


# ------------------------------------------------------------------------------------ the whole pass


@dataclass
class Calibrated:
    """What ``analyze`` needs from a calibrated analysis."""

    decompositions: dict[str, Decomposition]
    spectra: list  # LayerSpectrum per layer, loss = (sensitivity-scaled) output error curve
    ranks: dict[str, int | None]
    errors: dict[str, float]  # estimated relative output error of each factored layer
    info: dict[str, Any]  # for plan.calibration


def calibrated_analysis(model: nn.Module, modules: dict[str, nn.Module], batches: list[Batch], policy,
                        rank_multiple: int, fixed: dict[str, int | None], *, sequential: bool = True,
                        sensitivity: bool = True, sensitivity_batches: int = 2,
                        damping: tuple[float, ...] = DAMPING) -> Calibrated:
    """Whitened decompositions, output-error rank allocation and (optionally) sequential refits."""
    from compressor.core.policies import LayerSpectrum, TargetPolicy, allocate
    from compressor.core.rewrite import factor_module
    from compressor.core.svd import max_saving_rank

    cal = Calibrator(model, modules, batches)
    decs: dict[str, Decomposition] = {}
    infos: dict[str, dict[str, Any]] = {}
    for name, mom in cal.moments().items():
        mod = modules[name]
        if mom.tokens is not None:
            decs[name], infos[name] = embedding_decomposition(weight_matrix(mod), mom)
        elif mom.xx is None:
            decs[name], infos[name] = plain_decomposition(mod)
        else:
            decs[name], infos[name] = whitened_decomposition(weight_matrix(mod), mom, damping)
    shapes = {name: tuple(weight_matrix(mod).shape) for name, mod in modules.items()}
    spectra = [LayerSpectrum.from_singular_values(name, *shapes[name], decs[name].S) for name in modules]

    scales: dict[str, float] = {}
    if sensitivity and isinstance(policy, TargetPolicy):
        # Truncate each layer alone at the rank a uniform cut would give it and measure how much the
        # model's output moves per unit of that layer's own (whitened) output error.
        probes = {}
        for sp in spectra:
            if sp.name in fixed:
                continue
            uniform = int((1 - policy.target) * sp.m * sp.n / (sp.m + sp.n))
            r = max(1, min(max_saving_rank(sp.m, sp.n), uniform))
            probes[sp.name] = (r, factor_module(modules[sp.name], r, decs[sp.name]))
        moved = cal.output_errors({n: new for n, (_, new) in probes.items()}, sensitivity_batches)
        for sp in spectra:
            if sp.name in probes:
                own = float(sp.loss[probes[sp.name][0]])
                scales[sp.name] = moved[sp.name] / own if own > 1e-12 else 0.0
                sp.loss = sp.loss * scales[sp.name]
    ranks = allocate(policy, spectra, rank_multiple, fixed)

    def compressed(name: str) -> bool:
        r = ranks.get(name)
        return r is not None and 1 <= r <= max_saving_rank(*shapes[name])

    refit = 0
    if sequential:
        originals = cal.original_inputs(ORIGINALS_BUDGET)
        replaced: dict[str, nn.Module] = {}
        for group in cal.order:
            # Only whitened layers are refit: embeddings and layers the data never reached keep theirs.
            todo = [n for n in group if compressed(n) and infos[n].get("whitening") in ("cholesky", "eigh", "identity")]
            if todo and replaced:
                paired = cal.paired_moments(group, replaced, originals)
                for name in todo:
                    decs[name], infos[name] = whitened_decomposition(weight_matrix(modules[name]),
                                                                     paired[name], damping)
                    refit += 1
            for name in group:
                if compressed(name):
                    replaced[name] = factor_module(modules[name], ranks[name], decs[name])
    errors = {n: output_error(decs[n], infos[n], ranks[n]) for n in modules if compressed(n)}
    fallbacks = sorted(n for n, i in infos.items() if i.get("whitening") in ("eigh", "identity"))
    info = {**describe(batches), "sequential": sequential, "layers_refit_sequentially": refit,
            "allocation": "output-error x measured sensitivity" if scales else "whitened spectrum",
            "damping": list(damping), "whitening_fallbacks": fallbacks,
            "token_weighted_embeddings": sorted(n for n, i in infos.items()
                                                if i.get("whitening", "").startswith("token frequency")),
            "sensitivity": {n: round(s, 6) for n, s in scales.items()}}
    return Calibrated(decs, spectra, ranks, errors, info)
