"""Layer handlers: everything compressor knows about one kind of layer, in one place.

Every stage asks the registry instead of testing ``isinstance`` itself (as peft dispatches layer types):

    handler = handler_for(module)          # the first registered handler that matches, or None
    handler.weight_matrix(module)          # the weight as an (m, n) matrix: y = W x
    handler.factor(module, rank, dec)      # the two-layer replacement
    handler.input_rows(module, x, mask)    # rows of X with y_i = W x_i, for calibration statistics
    handler.lora(module, rank, alpha, 0.0) # a LoRA wrapper

Built in, in dispatch order: ``nn.Linear`` ("linear"), ``nn.Conv1d/2d/3d`` ("conv1d" ... "conv3d",
groups 1), ``nn.Embedding`` ("embedding") and transformers' ``Conv1D`` ("hf-conv1d", GPT-2's layers,
weight stored in x out); and "conv2d-spatial", the spatial decomposition of a 2-D conv, which analyze
chooses per layer over "conv2d" (an alternative: it never matches by itself). A user adds a kind from
their own code in one call::

    register_handler(MyHandler())            # a LayerHandler subclass; first match wins

and nothing else changes: analyze, rewrite, calibration, export checks, LoRA, MACs and int8 sensitivity
all go through the handler.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from compressor.core.errors import CompressorError
from compressor.core.int4 import fake_int4_weight
from compressor.core.layers import (
    LoRAConv,
    LoRAEmbedding,
    LoRALinear,
    LoRAMatrix,
    LowRankConv,
    LowRankEmbedding,
    LowRankLinear,
    LowRankSpatialConv,
    PivotedLowRankLinear,
)
from compressor.core.svd import Decomposition, factored_params, max_saving_rank, pivoted_factors, svd


class LayerHandler:
    """One layer kind. Subclasses set ``kind`` and override what differs from a plain ``y = W x + b``.

    ``statistics`` says what calibration collects for the kind: ``"rows"`` (the second moment of
    :meth:`input_rows`, for whitened factors) or ``"tokens"`` (lookup counts, for embedding tables).
    """

    kind: str = ""
    statistics: str = "rows"
    # Kinds of other handlers that factor the same modules another way (a per-layer choice analyze makes,
    # e.g. a conv's spatial decomposition); those handlers never match a module by themselves.
    alternatives: tuple[str, ...] = ()
    # Kinds that factor the same modules in another stored form, taken by every layer when the user asks
    # for it (``analyze(..., pivoted=True)``), never compared per layer.
    variants: tuple[str, ...] = ()
    # Whether calibration's sequential correction refits this kind on the compressed model's inputs.
    refit: bool = True
    # Whether the factored layer stores a rank-r matrix in r (m + n - r) weights (the pivoted form) instead
    # of r (m + n): what parameter counts and the break-even rank follow.
    pivoted: bool = False
    # How onnxruntime's 4-bit weight-only export stores the kind: "matmul" (MatMulNBits, which a low-rank
    # correction can sit beside), "gather" (GatherBlockQuantized) or "none" (it stays float).
    int4: str = "none"

    # ------------------------------------------------------------------------------ identification
    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def dense_reason(self, module: nn.Module) -> str | None:
        """Why this instance must stay dense although its kind is supported (None: it can be factored)."""
        return None

    def accepts(self, module: nn.Module) -> bool:
        """Whether this handler can factor ``module`` (as a plan layer of its kind)."""
        return self.matches(module) and self.dense_reason(module) is None

    def moments(self, module: nn.Module, xx: torch.Tensor) -> torch.Tensor:
        """The second moment of this kind's matrix columns, from ``xx``, the one of the dispatched handler's
        :meth:`input_rows` (the same thing, except for alternative factorizations)."""
        return xx

    # -------------------------------------------------------------------------------------- weight
    def weight(self, module: nn.Module) -> torch.Tensor:
        """The stored weight parameter (for tying checks, dtype and device)."""
        return module.weight

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        """The weight as an ``(m, n)`` matrix with ``y = W x`` (a view where the storage allows)."""
        w = self.weight(module)
        return w.reshape(w.shape[0], -1)

    def macs(self, m: int, n: int, rank: int | None = None) -> int:
        """Multiply-adds per output position, dense (``rank`` None) or factored at ``rank``."""
        return m * n if rank is None else factored_params(m, n, rank, self.pivoted)

    def params(self, m: int, n: int, rank: int) -> int:
        """Weights of the ``m x n`` matrix factored at ``rank`` (biases aside)."""
        return factored_params(m, n, rank, self.pivoted)

    def max_saving_rank(self, m: int, n: int) -> int:
        """The largest rank at which the factored layer holds fewer weights than the dense one."""
        return max_saving_rank(m, n, self.pivoted)

    def factor_shapes(self, shape: list[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of the (down, up) weights of the factored layer, as the exported graph stores them;
        ``shape`` is the dense weight's own shape."""
        m, n = shape[0], math.prod(shape[1:])
        return (rank, n), (m, rank)

    # ------------------------------------------------------------------------------------ factoring
    def empty_factored(self, module: nn.Module, rank: int) -> nn.Module:
        """The replacement at ``rank`` with freshly initialised factors, on the weight's device/dtype."""
        raise NotImplementedError

    def set_factors(self, new: nn.Module, up: torch.Tensor, down: torch.Tensor) -> None:
        """Copy ``up`` (m, r) and ``down`` (r, n) into ``new``'s two layers."""
        new.down.weight.copy_(down.reshape(new.down.weight.shape))
        new.up.weight.copy_(up.reshape(new.up.weight.shape))

    def set_bias(self, new: nn.Module, bias: torch.Tensor) -> None:
        """Put the original layer's ``bias`` on ``new`` (after :meth:`set_factors`): on its second layer."""
        new.up.bias.copy_(bias)

    def factor(self, module: nn.Module, rank: int, decomposition: Decomposition | None = None) -> nn.Module:
        """The low-rank replacement at ``rank`` from ``decomposition`` (the SVD of the weight matrix,
        computed here when None; a data-aware one gives factors that minimise output error). Any rank up
        to full: the break-even check is the plan's business."""
        new = self.empty_factored(module, rank)
        dec = decomposition if decomposition is not None else svd(self.weight_matrix(module))
        w = self.weight(module)
        up, down = (f.to(device=w.device, dtype=w.dtype) for f in dec.factors(rank))
        with torch.no_grad():
            self.set_factors(new, up, down)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                self.set_bias(new, bias)
        new.train(module.training)
        return new

    # ---------------------------------------------------------------------------------- calibration
    def input_rows(self, module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The rows ``x_i`` with ``y_i = W x_i`` that ``module`` computes on its input ``x``; ``mask``
        (batch, tokens) drops padding tokens of a sequence input. None: no rows (e.g. token ids)."""
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask.to(torch.bool)]
        return x.reshape(-1, x.shape[-1])

    def call_macs(self, module: nn.Module, output: torch.Tensor) -> int:
        """Multiply-adds one call of ``module`` performed, given its output."""
        m, n = self.weight_matrix(module).shape
        return output.numel() // m * m * n

    # ----------------------------------------------------------------------------------- training
    def lora(self, module: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
        """A LoRA wrapper around ``module`` (frozen base, trainable ``lora_A``/``lora_B``)."""
        raise CompressorError(f"{type(module).__name__} ({self.kind}) cannot take a LoRA adapter",
                              "leave this layer out of the adapted layers")

    def int8_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` computed as onnxruntime's dynamic int8 export computes it (weights per output
        channel, inputs per tensor), with straight-through gradients. Kinds the int8 export leaves in float
        do not override it (see :meth:`simulates_int8`)."""
        raise NotImplementedError

    def simulates_int8(self) -> bool:
        """Whether :meth:`int8_forward` is implemented for this kind."""
        return type(self).int8_forward is not LayerHandler.int8_forward

    def int4_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` with its weight as onnxruntime's 4-bit export stores it
        (:func:`fake_int4_weight`), straight-through; for ``int4 == "matmul"`` kinds (others override)."""
        w = self.weight_matrix(module)
        return F.linear(x, w + (fake_int4_weight(w) - w).detach(), getattr(module, "bias", None))


# ------------------------------------------------------------------------------------ int8 rounding


# onnxruntime's dynamic int8 weights are written with reduce_range: symmetric in -64..64, scale max|w| / 64.
# Why not -127..127: on x86 CPUs without VNNI (AVX2 only) onnxruntime multiplies the uint8 inputs by int8
# weights with vpmaddubsw, which adds pairs of products in 16 bits, and 2 x 255 x 127 saturates there. Measured
# on an AMD EPYC (AVX2): the int8 file of a 30%-factored all-MiniLM-L6-v2 kept cosine 0.25 to its fp32 file
# (0.67 for `make demo`'s data-aware one), 0.979 with reduce_range. 2 x 255 x 64 fits in 16 bits, so AVX2-only
# CPUs compute what VNNI ones do, and this simulation matches both (tests/test_handlers.py, run on the AVX2 one).
DYNAMIC_INT8_LEVELS = 64


def fake_int8_weight(w: torch.Tensor, per_channel: bool = True, levels: int = 127) -> torch.Tensor:
    """Symmetric int8, scale max|w| / ``levels`` per output channel (dim 0 of ``w``) or per tensor, values in
    -levels..levels, straight-through: 127 as static int8 (QDQ) stores weights, :data:`DYNAMIC_INT8_LEVELS`
    as dynamic int8 does."""
    rows = w.reshape(w.shape[0] if per_channel else 1, -1)
    scale = rows.detach().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / levels
    q = (rows / scale).round().clamp(-levels, levels) * scale
    return w + (q.reshape(w.shape) - w).detach()


def simulate_quantization(module: nn.Module, quant: str) -> bool:
    """Make ``module`` (itself, not its children) compute as the ``quant`` export of it will (its handler's
    ``int8_forward`` or ``int4_forward``, straight-through gradients); False when that export leaves its
    kind in float. Undone by ``module.__dict__.pop("forward", None)``."""
    h = handler_for(module)
    if h is None or not (h.simulates_int8() if quant == "int8" else h.int4 != "none"):
        return False
    module.forward = partial(h.int8_forward if quant == "int8" else h.int4_forward, module)
    return True


def fake_uint8_input(x: torch.Tensor) -> torch.Tensor:
    """Asymmetric uint8 per tensor with a range including 0 (DynamicQuantizeLinear), straight-through."""
    lo, hi = x.detach().min().clamp(max=0), x.detach().max().clamp(min=0)
    s = ((hi - lo) / 255).clamp(min=1e-12)
    zp = (-lo / s).round().clamp(0, 255)
    return x + ((((x / s).round() + zp).clamp(0, 255) - zp) * s - x).detach()


# -------------------------------------------------------------------------------------- built-ins


class LinearHandler(LayerHandler):
    kind = "linear"
    int4 = "matmul"
    variants = ("linear-pivoted",)

    def matches(self, module: nn.Module) -> bool:
        # isinstance keeps user subclasses of Linear, as peft does.
        return isinstance(module, nn.Linear)

    def empty_factored(self, module: nn.Module, rank: int) -> nn.Module:
        w = module.weight
        return LowRankLinear(module.in_features, module.out_features, rank, bias=module.bias is not None,
                             device=w.device, dtype=w.dtype)

    def lora(self, module: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
        return LoRALinear(module, rank, alpha, dropout)

    def int8_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_uint8_input(x), fake_int8_weight(module.weight, levels=DYNAMIC_INT8_LEVELS),
                        module.bias)


class PivotedLinearHandler(LinearHandler):
    """``nn.Linear`` factored in the pivoted form (:class:`PivotedLowRankLinear`): ``r (m + n - r)`` weights
    for a rank-``r`` map instead of ``r (m + n)``, so it saves at every rank below ``min(m, n)``. Never
    dispatched by itself: ``analyze(..., pivoted=True)`` (``compress --pivoted``) gives it to every linear
    layer it factors. Its factors are those of "linear" (the same matrix, the same data-aware
    decomposition), re-expressed by :func:`compressor.core.svd.pivoted_factors`."""

    kind = "linear-pivoted"
    pivoted = True
    variants = ()

    def matches(self, module: nn.Module) -> bool:
        return False

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def factor_shapes(self, shape: list[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, shape[1]), (shape[0] - rank, rank)

    def empty_factored(self, module: nn.Module, rank: int) -> nn.Module:
        w = module.weight
        return PivotedLowRankLinear(module.in_features, module.out_features, rank, bias=module.bias is not None,
                                    device=w.device, dtype=w.dtype)

    def set_factors(self, new: nn.Module, up: torch.Tensor, down: torch.Tensor) -> None:
        rows, coeffs, positions = pivoted_factors(up, down)
        new.down.weight.copy_(rows)
        new.up.weight.copy_(coeffs)
        new.positions.copy_(positions)

    def set_bias(self, new: nn.Module, bias: torch.Tensor) -> None:
        first, rest = bias[new.positions[: new.rank]], bias[new.positions[new.rank:]]
        new.down.bias.copy_(first)
        new.up.bias.copy_(rest - new.up.weight @ first)


_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class ConvHandler(LayerHandler):
    """``nn.Conv1d/2d/3d``: ``W`` is ``(out, in * prod(kernel))``; factored as a conv with the original
    kernel to ``rank`` channels, then a 1x1 conv to the outputs (the channel decomposition)."""

    def __init__(self, dims: int):
        self.dims = dims
        self.kind = f"conv{dims}d"
        self.alternatives = ("conv2d-spatial",) if dims == 2 else ()
        # Measured on MobileNetV2 and EfficientNet-Lite0 (160 px, 54 photos, 40% removed): refitting convs
        # on the compressed model's inputs lowered held-out logit cosine (0.75 -> 0.67, 0.55 -> 0.41).
        self.refit = False

    def matches(self, module: nn.Module) -> bool:
        # ConvTranspose does not derive from Conv*d: its weight maps outputs to inputs.
        return isinstance(module, _CONV_TYPES[self.dims])

    def dense_reason(self, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"grouped/depthwise conv (groups={module.groups}) has no single weight matrix to factor"
        return None

    def factor_shapes(self, shape: list[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (rank, *shape[1:]), (shape[0], rank, *([1] * (len(shape) - 2)))

    def empty_factored(self, module: nn.Module, rank: int) -> nn.Module:
        return LowRankConv(module, rank)

    def input_rows(self, module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return conv_patches(module, x)

    def call_macs(self, module: nn.Module, output: torch.Tensor) -> int:
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)

    def lora(self, module: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
        return LoRAConv(module, rank, alpha, dropout)

    def int8_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # onnxruntime's ConvInteger takes one weight scale for the whole kernel (measured: its int8 export
        # stores a scalar weight_scale for Conv, a per-channel one for MatMul).
        w = fake_int8_weight(module.weight, per_channel=False, levels=DYNAMIC_INT8_LEVELS)
        return module._conv_forward(fake_uint8_input(x), w, module.bias)


class SpatialConvHandler(ConvHandler):
    """The spatial decomposition of a ``kh x kw`` ``nn.Conv2d`` (``kh, kw > 1``, groups 1) into a ``kh x 1``
    and a ``1 x kw`` conv (:class:`LowRankSpatialConv`). Its matrix is the kernel regrouped as
    ``(out * kw, in * kh)``, ``A[(o, j), (c, i)] = W[o, c, i, j]``, whose rank-``r`` truncation is the best
    such pair. Never dispatched by itself: analyze picks it per layer, over the channel decomposition, where
    it loses less per parameter saved.

    Data-aware factors whiten by the second moment of the ``(channel, row)`` taps summed over the kernel's
    columns (:meth:`moments`): exact when patches at different horizontal offsets are uncorrelated, an
    approximation otherwise, so analyze measures the true output error before choosing it.
    """

    def __init__(self):
        super().__init__(2)
        self.kind, self.alternatives = "conv2d-spatial", ()

    def matches(self, module: nn.Module) -> bool:
        return False

    def accepts(self, module: nn.Module) -> bool:
        return (isinstance(module, nn.Conv2d) and module.groups == 1 and min(module.kernel_size) > 1
                and module.padding_mode == "zeros")

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        w = module.weight
        out, cin, kh, kw = w.shape
        return w.permute(0, 3, 1, 2).reshape(out * kw, cin * kh)

    def kernel(self, matrix: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
        """The ``(out, in, kh, kw)`` kernel of a matrix laid out as :meth:`weight_matrix`'s."""
        out, cin, kh, kw = shape
        return matrix.reshape(out, kw, cin, kh).permute(0, 2, 3, 1)

    def moments(self, module: nn.Module, xx: torch.Tensor) -> torch.Tensor:
        cin, kh, kw = module.weight.shape[1:]
        return torch.einsum("cijdkj->cidk", xx.reshape(cin, kh, kw, cin, kh, kw)).reshape(cin * kh, cin * kh)

    def factor_shapes(self, shape: list[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out, cin, kh, kw = shape
        return (rank, cin, kh, 1), (out, rank, 1, kw)

    def empty_factored(self, module: nn.Module, rank: int) -> nn.Module:
        return LowRankSpatialConv(module, rank)

    def set_factors(self, new: nn.Module, up: torch.Tensor, down: torch.Tensor) -> None:
        out, kw = new.up.out_channels, new.up.kernel_size[1]
        new.up.weight.copy_(up.reshape(out, kw, -1).permute(0, 2, 1).unsqueeze(2))
        new.down.weight.copy_(down.reshape(new.down.weight.shape))


def conv_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patches a conv multiplies by its weight matrix, one row per output position, in the order
    (batch, *positions), each row ordered like ``weight.reshape(out, -1)`` (channel, then kernel).
    Works for any number of spatial dims; non-zero padding modes are approximated by zeros."""
    dims = x.dim() - 2
    k, s, d, p = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    if isinstance(p, str):  # "valid", or "same" (stride 1): the total padding split as torch splits it
        total = [0 if p == "valid" else di * (ki - 1) for ki, di in zip(k, d, strict=True)]
        pads = [(t // 2, t - t // 2) for t in total]
    else:
        pads = [(pi, pi) for pi in p]
    x = F.pad(x, [v for pair in reversed(pads) for v in pair])
    for i in range(dims):  # each spatial axis becomes (positions, kernel taps)
        x = x.unfold(2 + i, d[i] * (k[i] - 1) + 1, s[i])[..., ::d[i]]
    # (B, C, L1..Ld, k1..kd) -> (B, L1..Ld, C, k1..kd) -> rows
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    x = x.permute(order)
    return x.reshape(-1, math.prod(x.shape[1 + dims:]))


class EmbeddingHandler(LayerHandler):
    """``nn.Embedding``: the table ``(num, dim)`` as stored; factored as a ``(num, rank)`` table and a
    ``Linear(rank, dim)``. A lookup costs no multiply-adds; the factored one costs ``rank * dim``."""

    kind = "embedding"
    statistics = "tokens"
    int4 = "gather"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def dense_reason(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "embedding with max_norm renormalizes rows at lookup; a factored table cannot"
        return None

    def macs(self, m: int, n: int, rank: int | None = None) -> int:
        return 0 if rank is None else rank * n

    def factor_shapes(self, shape: list[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (shape[0], rank), (shape[1], rank)  # table (num, rank); Linear(rank, dim) weight (dim, rank)

    def empty_factored(self, module: nn.Module, rank: int) -> nn.Module:
        return LowRankEmbedding(module, rank)

    def set_factors(self, new: nn.Module, up: torch.Tensor, down: torch.Tensor) -> None:
        new.down.weight.copy_(up)  # the (num, rank) table
        new.up.weight.copy_(down.T)  # (dim, rank): maps a table row to the embedding

    def input_rows(self, module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        return None  # token ids: calibration counts lookups instead

    def call_macs(self, module: nn.Module, output: torch.Tensor) -> int:
        return 0

    def lora(self, module: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
        return LoRAEmbedding(module, rank, alpha, dropout)

    def int8_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # onnxruntime quantizes a Gather's table as it quantizes activations: uint8, per tensor.
        m = module
        return F.embedding(x, fake_uint8_input(m.weight), m.padding_idx, m.max_norm, m.norm_type,
                           m.scale_grad_by_freq, m.sparse)

    def int4_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # GatherBlockQuantized blocks the table's rows along the embedding dimension, as a MatMul's rows.
        m, w = module, module.weight
        return F.embedding(x, w + (fake_int4_weight(w) - w).detach(), m.padding_idx, m.max_norm, m.norm_type,
                           m.scale_grad_by_freq, m.sparse)


class HFConv1DHandler(LayerHandler):
    """transformers' ``Conv1D`` (GPT-2, GPT, ...): ``y = x @ W + b`` with ``W`` stored ``(in, out)``. Its
    matrix is the transpose; it is factored into a :class:`LowRankLinear`, which computes the same."""

    kind = "hf-conv1d"
    int4 = "matmul"

    def matches(self, module: nn.Module) -> bool:
        # By name, so that transformers is never imported to ask.
        cls = type(module)
        return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        return module.weight.T

    def factor_shapes(self, shape: list[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        n, m = shape
        return (rank, n), (m, rank)

    def empty_factored(self, module: nn.Module, rank: int) -> nn.Module:
        n, m = module.weight.shape
        return LowRankLinear(n, m, rank, bias=module.bias is not None, device=module.weight.device,
                             dtype=module.weight.dtype)

    def lora(self, module: nn.Module, rank: int, alpha: float, dropout: float) -> nn.Module:
        return LoRAMatrix(module, rank, alpha, dropout, transposed=True)

    def int8_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w = fake_int8_weight(module.weight.T, levels=DYNAMIC_INT8_LEVELS)
        return F.linear(fake_uint8_input(x), w, module.bias)


# --------------------------------------------------------------------------------------- registry

_HANDLERS: list[LayerHandler] = [LinearHandler(), ConvHandler(1), ConvHandler(2), ConvHandler(3),
                                 EmbeddingHandler(), HFConv1DHandler(), SpatialConvHandler(),
                                 PivotedLinearHandler()]


def handlers() -> tuple[LayerHandler, ...]:
    """The registered handlers, in dispatch order."""
    return tuple(_HANDLERS)


def register_handler(handler: LayerHandler, *, before: str | None = None) -> LayerHandler:
    """Add ``handler`` to the registry: last by default, or just before the handler of kind ``before``
    (so that it wins over it for modules both match, e.g. a Linear subclass of your own). A handler of
    the same kind is replaced. Returns ``handler``."""
    if not handler.kind or not isinstance(handler, LayerHandler):
        raise CompressorError("a layer handler needs a non-empty kind and must subclass LayerHandler",
                              "subclass compressor.core.handlers.LayerHandler and set kind")
    unregister_handler(handler.kind)
    at = len(_HANDLERS)
    if before is not None:
        kinds = [h.kind for h in _HANDLERS]
        if before not in kinds:
            raise CompressorError(f"no layer handler of kind '{before}'", f"use one of {', '.join(kinds)}")
        at = kinds.index(before)
    _HANDLERS.insert(at, handler)
    return handler


def unregister_handler(kind: str) -> None:
    """Remove the handler of ``kind`` (nothing happens when there is none)."""
    _HANDLERS[:] = [h for h in _HANDLERS if h.kind != kind]


@contextmanager
def registered(handler: LayerHandler, *, before: str | None = None) -> Iterator[LayerHandler]:
    """``with registered(MyHandler()):`` the handler is registered inside the block only."""
    previous = list(_HANDLERS)
    register_handler(handler, before=before)
    try:
        yield handler
    finally:
        _HANDLERS[:] = previous


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The first registered handler that matches ``module`` (None: not a layer kind compressor knows)."""
    for h in _HANDLERS:
        if h.matches(module):
            return h
    return None


def handler_for_kind(module: nn.Module, kind: str) -> LayerHandler | None:
    """The handler that factors ``module`` as a plan layer of ``kind``: the dispatched one, or one of its
    alternatives or variants that accepts the module (None: neither)."""
    h = handler_for(module)
    if h is None or h.kind == kind:
        return h
    if kind in h.alternatives or kind in h.variants:
        alt = handler_of_kind(kind)
        return alt if alt.accepts(module) else None
    return None


def handler_of_kind(kind: str) -> LayerHandler:
    """The handler registered for ``kind`` (as a plan names it)."""
    for h in _HANDLERS:
        if h.kind == kind:
            return h
    raise CompressorError(f"no layer handler of kind '{kind}' is registered",
                          "register the handler the plan was made with (register_handler)")


def kinds() -> list[str]:
    return [h.kind for h in _HANDLERS]


def weight_fingerprint(module: nn.Module) -> tuple:
    """Identifies a weight's current values (storage, in-place version, shape) to validate caches."""
    w = handler_for(module).weight(module)
    return (w.data_ptr(), w._version, tuple(w.shape))
