"""Autograd of the forward ops (torch.library.register_autograd), whose backward calls custom
ops only (plus plain ATen reductions), so torch.compile traces training through them. The
backward ops get their own autograd in backward_autograd.py (double backward).

Only O(1) and [N, r] tensors are saved for standard/mini (the fold and the
seed); BAT saves x and the weight it already references, never W'.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (the schemas must exist before autograd is added to them)


def _linear_base_grads(ctx, grad_out: Tensor, x: Optional[Tensor]):
    """Gradients of the frozen part (weight, bias) when a user trains them."""
    grad_weight = grad_bias = None
    out_features = grad_out.shape[-1]
    if ctx.needs_input_grad[1]:
        grad_weight = grad_out.reshape(-1, out_features).t().mm(x.reshape(-1, x.shape[-1]))
    if ctx.needs_input_grad[2]:
        grad_bias = grad_out.reshape(-1, out_features).sum(0)
    return grad_weight, grad_bias


def _materialize_only_when_used(ctx, output) -> None:
    """Unused outputs get None, not zeros: the fold output is rarely used, and a zero
    grad_fold would cost the backward a pass over grad_x (the weight path) for nothing."""
    ctx.set_materialize_grads(False)
    ctx.y_shape, ctx.y_dtype = output[0].shape, output[0].dtype


def _grad_out_or_zeros(ctx, grad_out, like: Tensor) -> Tensor:
    return like.new_zeros(ctx.y_shape, dtype=ctx.y_dtype) if grad_out is None else grad_out


def _shard_linear_setup(ctx, inputs, output):
    x, weight, bias, block, p, seed = inputs
    _, fold = output
    _materialize_only_when_used(ctx, output)
    ctx.p = p
    ctx.in_features = x.shape[-1]
    ctx.save_for_backward(fold, weight, block, seed, x if weight.requires_grad else None)


def _shard_grads(ctx, grad_out, fold, weight, block, seed, grad_fold, need_x, need_block):
    """(grad_x, grad_block) of a shard forward op; weight None: the delta only (no dy @ W)."""
    return torch.ops.miss.shard_linear_backward(
        grad_out, fold, weight, block, ctx.in_features, ctx.p, seed, grad_fold, [need_x, need_block]
    )


def _shard_linear_backward(ctx, grad_out, grad_fold):
    fold, weight, block, seed, x = ctx.saved_tensors
    grad_out = _grad_out_or_zeros(ctx, grad_out, fold)
    need_x, need_block = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_x = grad_block = None
    if need_x or need_block:
        grad_x, grad_block = _shard_grads(ctx, grad_out, fold, weight, block, seed, grad_fold, need_x, need_block)
    grad_weight, grad_bias = _linear_base_grads(ctx, grad_out, x)
    return (
        grad_x if need_x else None,
        grad_weight,
        grad_bias,
        grad_block if need_block else None,
        None,
        None,
    )


torch.library.register_autograd(
    "miss::shard_linear", _shard_linear_backward, setup_context=_shard_linear_setup
)


def _shard_delta_add_setup(ctx, inputs, output):
    y, x, block, p, seed = inputs
    _, fold = output
    _materialize_only_when_used(ctx, output)
    ctx.p = p
    ctx.in_features = x.shape[-1]
    ctx.save_for_backward(fold, block, seed)


def _shard_delta_add_backward(ctx, grad_out, grad_fold):
    fold, block, seed = ctx.saved_tensors
    grad_out = _grad_out_or_zeros(ctx, grad_out, fold)
    need_x, need_block = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_x = grad_block = None
    if need_x or need_block:
        grad_x, grad_block = _shard_grads(ctx, grad_out, fold, None, block, seed, grad_fold, need_x, need_block)
    return (
        grad_out if ctx.needs_input_grad[0] else None,
        grad_x if need_x else None,
        grad_block if need_block else None,
        None,
        None,
    )


torch.library.register_autograd(
    "miss::shard_delta_add", _shard_delta_add_backward, setup_context=_shard_delta_add_setup
)


def _shard_fold_setup(ctx, inputs, output):
    x, r, p, seed = inputs
    ctx.p = p
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(seed)


def _shard_fold_backward(ctx, grad_fold):
    (seed,) = ctx.saved_tensors
    zeros = grad_fold.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)
    return torch.ops.miss.shard_tile_add(zeros, grad_fold, ctx.p, seed), None, None, None


torch.library.register_autograd("miss::shard_fold", _shard_fold_backward, setup_context=_shard_fold_setup)


def _shard_tile_add_setup(ctx, inputs, output):
    grad_x, g, p, seed = inputs
    ctx.p = p
    ctx.r = g.shape[1]
    ctx.g_dtype = g.dtype
    ctx.save_for_backward(seed)


def _shard_tile_add_backward(ctx, grad_out):
    (seed,) = ctx.saved_tensors
    grad_g = None
    if ctx.needs_input_grad[1]:
        # The adjoint of "tile g across the shards" is the fold, with the same mask.
        grad_g = torch.ops.miss.shard_fold(grad_out, ctx.r, ctx.p, seed).to(ctx.g_dtype)
    return grad_out if ctx.needs_input_grad[0] else None, grad_g, None, None


torch.library.register_autograd(
    "miss::shard_tile_add", _shard_tile_add_backward, setup_context=_shard_tile_add_setup
)


def _bat_weight_setup(ctx, inputs, output):
    weight, block = inputs
    ctx.save_for_backward(weight, block)


def _bat_weight_backward(ctx, grad_out):
    weight, block = ctx.saved_tensors
    grad_weight = grad_block = None
    if ctx.needs_input_grad[0]:
        grad_weight = torch.ops.miss.bat_weight_grad(grad_out, block)
    if ctx.needs_input_grad[1]:
        grad_block = torch.ops.miss.bat_block_grad(grad_out, weight, block.shape[-1]).to(block.dtype)
    return grad_weight, grad_block


torch.library.register_autograd("miss::bat_weight", _bat_weight_backward, setup_context=_bat_weight_setup)


def _bat_linear_setup(ctx, inputs, output):
    x, weight, bias, block = inputs
    ctx.save_for_backward(x, weight, block)


def _bat_linear_backward(ctx, grad_out):
    x, weight, block = ctx.saved_tensors
    need_x, need_weight, need_block = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    grad_x = grad_weight = grad_block = None
    if need_x or need_weight or need_block:
        grad_x, grad_weight, grad_block = torch.ops.miss.bat_linear_backward(
            grad_out, x, weight, block, [need_x, need_weight, need_block]
        )
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
    return (
        grad_x if need_x else None,
        grad_weight if need_weight else None,
        grad_bias,
        grad_block if need_block else None,
    )


torch.library.register_autograd("miss::bat_linear", _bat_linear_backward, setup_context=_bat_linear_setup)
