"""Pure-PyTorch MiSS, written straight from docs/spec.md: the oracle of the tests and the baseline
of the benchmarks. Never used by the layers unless asked for (``backend="reference"``).

Every function computes in the dtypes it is given, so the same code is the float64 oracle
(pass float64 tensors) and the same-precision reference of the low-precision tests (pass the
original tensors). Mixed dtypes follow PEFT: x is cast to the block's dtype before the fold,
the base layer runs in the weight's dtype, and the result is cast back to x's dtype.

Dropout masks are reproduced bit for bit from the seed with a NumPy Philox4x32-10, written
independently of csrc/philox_dropout.h, so that dropout runs can be compared exactly.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_MASK32 = np.uint64(0xFFFFFFFF)


def _philox4x32_10(counter, key):
    """Philox4x32-10 on arrays: counter is four uint64 arrays of 32-bit values, key two."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.uint64(k) for k in key)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = (hi1 ^ c1 ^ k0), lo1, (hi0 ^ c3 ^ k1), lo0
        k0 = (k0 + np.uint64(0x9E3779B9)) & _MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _MASK32
    return c0, c1, c2, c3


def dropout_multipliers(seed: int, rows: int, columns: int, p: float, dtype=torch.float64) -> Tensor:
    """The ``[rows, columns]`` dropout multipliers (``1/(1-p)`` kept, 0 dropped) of a seed.

    Element (n, i) takes 16 bits of the Philox call with counter (i // 8, n_lo, n_hi, 0) and
    key (seed_lo, seed_hi); it is kept when those bits are >= round(p * 65536).
    """
    if p == 0.0:
        return torch.ones(rows, columns, dtype=dtype)
    threshold = 65536 if p >= 1.0 else int(p * 65536.0 + 0.5)
    seed_u = int(seed) & 0xFFFFFFFFFFFFFFFF
    groups = (columns + 7) // 8
    n = np.repeat(np.arange(rows, dtype=np.uint64), groups)
    q = np.tile(np.arange(groups, dtype=np.uint64), rows)
    words = _philox4x32_10(
        (q, n & _MASK32, n >> np.uint64(32), np.zeros_like(n)), (seed_u & 0xFFFFFFFF, seed_u >> 32)
    )
    halves = []
    for w in words:
        halves += [w & np.uint64(0xFFFF), w >> np.uint64(16)]
    uniforms = np.stack(halves, axis=-1).reshape(rows, groups * 8)[:, :columns]
    keep = torch.from_numpy((uniforms >= threshold).astype(np.float64))
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return (keep * scale).to(dtype)


def _rows_view(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _dropped(x: Tensor, p: float, seed: Optional[Tensor]) -> Tensor:
    if p == 0.0:
        return x
    rows = _rows_view(x)
    mask = dropout_multipliers(int(seed.item()), rows.shape[0], rows.shape[1], p, dtype=torch.float64)
    return (rows.to(torch.float64) * mask.to(x.device)).to(x.dtype).reshape(x.shape)


def shard_fold(x: Tensor, r: int, p: float = 0.0, seed: Optional[Tensor] = None) -> Tensor:
    """``[..., in] -> [N, r]``: zero-pad in to a multiple of r and sum the shards."""
    rows = _rows_view(_dropped(x, p, seed))
    shards = -(-rows.shape[1] // r)
    return F.pad(rows, (0, shards * r - rows.shape[1])).reshape(rows.shape[0], shards, r).sum(dim=1)


def shard_tile(g: Tensor, in_features: int, p: float = 0.0, seed: Optional[Tensor] = None) -> Tensor:
    """``[N, r] -> [N, in]``: ``t[n, i] = drop(n, i) * g[n, i % r]``, the adjoint of the fold."""
    r = g.shape[1]
    tiled = g.repeat(1, -(-in_features // r))[:, :in_features]
    if p == 0.0:
        return tiled
    mask = dropout_multipliers(int(seed.item()), g.shape[0], in_features, p, dtype=torch.float64)
    return (tiled.to(torch.float64) * mask.to(g.device)).to(g.dtype)


def full_block(block: Tensor, out_features: int) -> Tensor:
    """The ``[r, out]`` block of a standard (unchanged) or mini (repeated along out) adapter."""
    return block.repeat(1, out_features // block.shape[1])


def shard_delta(x: Tensor, block: Tensor, out_features: int, p: float = 0.0, seed=None) -> Tensor:
    """The standard/mini contribution ``fold(drop(x)) @ B_full``, shape ``[..., out]``."""
    fold = shard_fold(x.to(block.dtype), block.shape[0], p, seed)
    return (fold @ full_block(block, out_features)).reshape(*x.shape[:-1], out_features)


def shard_linear(x, weight, bias, block, p: float = 0.0, seed=None) -> Tensor:
    y = F.linear(x, weight, bias)
    return (y + shard_delta(x, block, weight.shape[0], p, seed)).to(x.dtype)


def delta_weight(block: Tensor, in_features: int, out_features: int) -> Tensor:
    """``dW[o, i] = B_full[i % r, o]`` (standard / mini), shape ``[out, in]``."""
    return shard_tile(full_block(block, out_features).t(), in_features)


def _tiles(weight: Tensor, r: int) -> Tensor:
    """``W[o, i] -> T[k, j, a, b]`` with ``o = k*r + a``, ``i = j*r + b``."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features // r, r, in_features // r, r).permute(0, 2, 1, 3)


def _untile(tiles: Tensor) -> Tensor:
    k, j, r, _ = tiles.shape
    return tiles.permute(0, 2, 1, 3).reshape(k * r, j * r)


def bat_weight(weight: Tensor, block: Tensor) -> Tensor:
    """``W'_kj = W_kj + W_kj @ B_k + B_k``."""
    w = _tiles(weight.to(block.dtype), block.shape[-1])
    b = block[:, None]
    return _untile(w + w @ b + b).to(weight.dtype)


def bat_block_grad(grad_weight: Tensor, weight: Tensor, r: int) -> Tensor:
    """``dB_k = sum_j W_kj^T G_kj + G_kj``."""
    g = _tiles(grad_weight, r)
    w = _tiles(weight.to(grad_weight.dtype), r)
    return (w.transpose(-1, -2) @ g + g).sum(dim=1)


def bat_weight_grad(grad_weight: Tensor, block: Tensor) -> Tensor:
    """``dW_kj = G_kj (I + B_k)^T``."""
    g = _tiles(grad_weight, block.shape[-1])
    return _untile(g + g @ block.to(grad_weight.dtype)[:, None].transpose(-1, -2))


def bat_linear(x, weight, bias, block) -> Tensor:
    w = bat_weight(weight, block)
    return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype)).to(x.dtype)


def merged(weight: Tensor, block: Tensor) -> Tensor:
    """The weight after merging the adapter (any variant), computed in float64."""
    w = weight.to(torch.float64)
    b = block.to(torch.float64)
    if block.dim() == 3:
        return bat_weight(w, b)
    return w + delta_weight(b, weight.shape[1], weight.shape[0])


def unmerged(weight: Tensor, block: Tensor) -> Tensor:
    """The weight after unmerging the adapter (any variant), computed in float64."""
    w = weight.to(torch.float64)
    b = block.to(torch.float64)
    if block.dim() == 3:
        r = block.shape[-1]
        inverse = torch.linalg.inv(torch.eye(r, dtype=torch.float64) + b)
        return _untile((_tiles(w, r) - b[:, None]) @ inverse[:, None])
    return w - delta_weight(b, weight.shape[1], weight.shape[0])


def shard_delta_add(y, x, block, p: float = 0.0, seed=None) -> Tensor:
    return (y + shard_delta(x, block, y.shape[-1], p, seed)).to(y.dtype)

