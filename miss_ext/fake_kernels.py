"""Fake kernels of the miss ops (torch.library.register_fake): shapes and dtypes only, for
torch.compile, meta tensors and torch.library.opcheck. A call that mixes meta tensors with
real ones is dispatched here too, so the device rule of the kernels is repeated: otherwise
such a call would return uninitialised real tensors.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (the schemas must exist before fake kernels are added to them)


def _rows(t: Tensor) -> int:
    """N: the rows of ``t`` with its leading dims flattened."""
    return math.prod(t.shape[:-1])


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate in (csrc/checks.h accumulate_dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_devices(op: str, reference: tuple, *others: tuple, seed: Optional[Tensor] = None):
    ref_name, ref = reference
    for name, t in others:
        if t is not None:
            torch._check(
                t.device == ref.device,
                lambda: f"miss.{op}: argument '{name}' must be on the same device as "
                f"'{ref_name}' ({ref.device}), got {t.device}",
            )
    if seed is not None:
        torch._check(
            seed.device == ref.device or seed.device.type == "cpu",
            lambda: f"miss.{op}: argument 'seed' must be on {ref.device} or the CPU, got {seed.device}",
        )


def _fold_like(x: Tensor, r) -> Tensor:
    return x.new_empty((_rows(x), r), dtype=_accumulate_dtype(x.dtype))


@torch.library.register_fake("miss::shard_fold")
def _(x, r, p=0.0, seed=None):
    _check_devices("shard_fold", ("x", x), seed=seed)
    return _fold_like(x, r)


@torch.library.register_fake("miss::shard_tile_add")
def _(grad_x, g, p=0.0, seed=None):
    _check_devices("shard_tile_add", ("grad_x", grad_x), ("g", g), seed=seed)
    return torch.empty_like(grad_x, memory_format=torch.contiguous_format)


@torch.library.register_fake("miss::shard_linear")
def _(x, weight, bias, block, p=0.0, seed=None):
    _check_devices("shard_linear", ("x", x), ("weight", weight), ("bias", bias), ("block", block), seed=seed)
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, _fold_like(x, block.shape[0])


@torch.library.register_fake("miss::shard_delta_add")
def _(y, x, block, p=0.0, seed=None):
    _check_devices("shard_delta_add", ("x", x), ("y", y), ("block", block), seed=seed)
    out = torch.empty_like(y, memory_format=torch.contiguous_format)
    return out, _fold_like(x, block.shape[0])


@torch.library.register_fake("miss::shard_linear_backward")
def _(grad_out, fold, weight, block, in_features, p, seed, grad_fold, output_mask):
    _check_devices(
        "shard_linear_backward",
        ("grad_out", grad_out),
        ("fold", fold),
        ("weight", weight),
        ("block", block),
        ("grad_fold", grad_fold),
        seed=seed,
    )
    need_x, need_block = output_mask
    grad_x = grad_out.new_empty((*grad_out.shape[:-1], in_features) if need_x else (0,))
    grad_block = block.new_empty(block.shape if need_block else (0,))
    return grad_x, grad_block


@torch.library.register_fake("miss::bat_weight")
def _(weight, block):
    _check_devices("bat_weight", ("weight", weight), ("block", block))
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("miss::bat_block_grad")
def _(grad_weight, weight, r):
    _check_devices("bat_block_grad", ("weight", weight), ("grad_weight", grad_weight))
    return weight.new_empty((weight.shape[0] // r, r, r), dtype=_accumulate_dtype(weight.dtype))


@torch.library.register_fake("miss::bat_weight_grad")
def _(grad_weight, block):
    _check_devices("bat_weight_grad", ("grad_weight", grad_weight), ("block", block))
    return torch.empty_like(grad_weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("miss::bat_linear")
def _(x, weight, bias, block):
    _check_devices("bat_linear", ("weight", weight), ("x", x), ("bias", bias), ("block", block))
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("miss::bat_linear_backward")
def _(grad_out, x, weight, block, output_mask):
    _check_devices("bat_linear_backward", ("weight", weight), ("x", x), ("grad_out", grad_out), ("block", block))
    need_x, need_weight, need_block = output_mask
    return (
        x.new_empty(x.shape if need_x else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        block.new_empty(block.shape if need_block else (0,)),
    )


@torch.library.register_fake("miss::merge_")
def _(weight, block, check_finite=False):
    _check_devices("merge_", ("weight", weight), ("block", block))
    return None


@torch.library.register_fake("miss::unmerge_")
def _(weight, block):
    _check_devices("unmerge_", ("weight", weight), ("block", block))
    return None
