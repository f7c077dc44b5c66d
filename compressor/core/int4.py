"""onnxruntime's 4-bit weight grid (MatMulNBits, GatherBlockQuantized), reproduced in torch: what the int4
export stores, so that simulations, corrections and GPTQ round exactly as the file does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# onnxruntime's MatMulNBitsQuantizer defaults: 4 bits, asymmetric (a zero point per block), blocks of
# 128 weights along the input dimension. Smaller blocks: more scales, lower error.
INT4_BLOCK_SIZE = 128
INT4_SYMMETRIC = False


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    # C's roundf, which onnxruntime's block quantizer uses (torch.round rounds half to even).
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def int4_grid(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero point onnxruntime's asymmetric MatMulNBitsQuantizer gives each block of ``blocks``
    (..., block size; float32), each (..., 1): the block's range widened to include 0, in 15 steps; a weight
    ``w`` is stored as ``q = round(w / scale + zp)`` in 0..15 and read back as ``(q - zp) * scale``."""
    lo, hi = blocks.amin(-1, keepdim=True).clamp(max=0), blocks.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
    zp = torch.where(scale == 0, torch.zeros_like(lo), -lo * inv)
    return scale, round_half_away(zp).clamp(0, 15)


def fake_int4_weight(w: torch.Tensor, block_size: int = INT4_BLOCK_SIZE,
                     symmetric: bool = INT4_SYMMETRIC) -> torch.Tensor:
    """``w`` (m, n) rounded as onnxruntime's MatMulNBitsQuantizer stores it (4 bits per weight, a float
    scale and, asymmetric, a 4-bit zero point per block of ``block_size`` consecutive weights of a row,
    i.e. along the input dimension ``n``: :func:`int4_grid`) and dequantized back, in float32; not
    differentiable."""
    m, n = w.shape
    blocks = -(-n // block_size)
    x = F.pad(w.detach().float(), (0, blocks * block_size - n)).reshape(m, blocks, block_size)
    if symmetric:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        # The value of largest magnitude maps to -8, so the other sign reaches at most +7.
        scale = torch.where(hi.abs() > lo.abs(), hi, lo) / -8
        inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
        q = (round_half_away(x * inv) + 8).clamp(0, 15) - 8
    else:
        scale, zp = int4_grid(x)
        inv = torch.where(scale == 0, torch.zeros_like(scale), 1 / scale)
        q = (round_half_away(x * inv + zp)).clamp(0, 15) - zp
    return (q * scale).reshape(m, blocks * block_size)[:, :n].to(w.dtype)
