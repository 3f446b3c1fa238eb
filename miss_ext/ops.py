"""Typed wrappers over torch.ops.miss.*; importing this module registers their fake kernels
and autograd.

The schemas live in csrc/registration.cpp. What Python adds to them lives in one module per
kind, imported here in this order: the fake kernels (fake_kernels.py), the autograd of the
forward ops (forward_autograd.py: their backward calls custom ops, so torch.compile can
trace training), the autocast kernels of the layer ops (autocast.py), the autograd of the
backward ops (backward_autograd.py: double backward) and of the in-place ops
(inplace_autograd.py). Dropout is driven by a one-element int64 ``seed`` tensor drawn with
:func:`dropout_seed` from torch's generator for the data's device: the ops stay pure, and
backward regenerates the forward's mask from the same seed instead of storing it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library registers torch.ops.miss)
from . import fake_kernels  # noqa: F401,I001  (registration order: see above)
from . import forward_autograd  # noqa: F401
from . import autocast  # noqa: F401
from . import backward_autograd  # noqa: F401
from . import inplace_autograd  # noqa: F401
from .autocast import autocast_cast, autocast_dtype  # noqa: F401  (used by the layers)
from .fake_kernels import _accumulate_dtype, _check_devices, _rows  # noqa: F401  (helpers that lived here)

__all__ = [
    "dropout_seed",
    "shard_fold",
    "shard_tile_add",
    "shard_linear",
    "shard_delta_add",
    "bat_weight",
    "bat_block_grad",
    "bat_weight_grad",
    "bat_linear",
    "merge_",
    "unmerge_",
    "autocast_dtype",
    "autocast_cast",
]


def dropout_seed(device: torch.device | str) -> Tensor:
    """A one-element int64 seed tensor drawn from torch's default generator for ``device``.

    So ``torch.manual_seed`` makes dropout reproducible; on CUDA the seed stays on the device
    (no host sync) and the kernels read it there.
    """
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------
# Python entry points. Each returns what a user wants; extra outputs (the fold kept for
# backward) stay internal.


def shard_fold(x: Tensor, r: int, p: float = 0.0, seed: Optional[Tensor] = None) -> Tensor:
    """``fold[n, c] = sum over i % r == c of drop(x)[n, i]``: ``[..., in] -> [N, r]`` float32."""
    return torch.ops.miss.shard_fold(x, r, p, seed)


def shard_tile_add(grad_x: Tensor, g: Tensor, p: float = 0.0, seed: Optional[Tensor] = None) -> Tensor:
    """``grad_x + drop(n, i) * g[n, i % r]``: the adjoint of :func:`shard_fold`, added to grad_x."""
    return torch.ops.miss.shard_tile_add(grad_x, g, p, seed)


def shard_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    block: Tensor,
    p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """The layer adapted by a standard (block ``[r, out]``) or mini (``[r, mini_r]``) adapter."""
    return torch.ops.miss.shard_linear(x, weight, bias, block, p, seed)[0]


def shard_delta_add(
    y: Tensor, x: Tensor, block: Tensor, p: float = 0.0, seed: Optional[Tensor] = None
) -> Tensor:
    """``y`` plus the contribution of one more standard/mini adapter on input ``x``."""
    return torch.ops.miss.shard_delta_add(y, x, block, p, seed)[0]


def bat_weight(weight: Tensor, block: Tensor) -> Tensor:
    """``W'_kj = W_kj + W_kj @ B_k + B_k`` for every r x r tile (block ``[out/r, r, r]``)."""
    return torch.ops.miss.bat_weight(weight, block)


def bat_block_grad(grad_weight: Tensor, weight: Tensor, r: int) -> Tensor:
    """``dB_k = sum_j W_kj^T G_kj + G_kj`` (float32), G the gradient with respect to W'."""
    return torch.ops.miss.bat_block_grad(grad_weight, weight, r)


def bat_weight_grad(grad_weight: Tensor, block: Tensor) -> Tensor:
    """``dW_kj = G_kj (I + B_k)^T``, G the gradient with respect to W'."""
    return torch.ops.miss.bat_weight_grad(grad_weight, block)


def bat_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor) -> Tensor:
    """The layer adapted by a BAT adapter; W' is rebuilt in backward, never kept."""
    return torch.ops.miss.bat_linear(x, weight, bias, block)


def merge_(weight: Tensor, block: Tensor, check_finite: bool = False) -> None:
    """Adds the adapter's delta to ``weight`` in place (variant read from the block's rank)."""
    torch.ops.miss.merge_(weight, block, check_finite)


def unmerge_(weight: Tensor, block: Tensor) -> None:
    """Undoes :func:`merge_` in place; a bat unmerge refuses an ill-conditioned ``I + B_k``."""
    torch.ops.miss.unmerge_(weight, block)


def op_names() -> Sequence[str]:
    """Every op of the registry, for tests and docs."""
    return (
        "shard_fold",
        "shard_tile_add",
        "shard_linear",
        "shard_delta_add",
        "shard_linear_backward",
        "bat_weight",
        "bat_block_grad",
        "bat_weight_grad",
        "bat_linear",
        "bat_linear_backward",
        "merge_",
        "unmerge_",
    )
