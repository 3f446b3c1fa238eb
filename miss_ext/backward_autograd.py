"""Autograd of the backward ops, so that double backward works.

``create_graph=True`` (gradient penalties, Hessian-vector products, ``gradgradcheck``) runs a
backward with grad mode on and differentiates it again. The first backward of every MiSS
forward calls custom ops (miss_ext/forward_autograd.py); each of them gets here the formula
of its own derivative, written with differentiable torch ops and with the custom ops that have autograd
themselves (fold, tile-add, bat_weight, bat_weight_grad, bat_block_grad), so a third order
works too. These formulas run only when a graph of the backward is asked for; the normal
backward does not touch them. Speed is not their point: they follow the math of docs/spec.md
plainly, in the accumulation dtype.

Notation as in docs/spec.md: F is the (masked) fold [N, in] -> [N, r], its adjoint the tile;
P folds dy along out to [N, mini_r] for mini (identity for standard), P^T tiles it back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .fake_kernels import _accumulate_dtype as _acc


def _used(cotangent, computed: bool):
    """A cotangent that carries something: None for outputs that were not computed (empty)."""
    return cotangent if computed and cotangent is not None else None


def _total(terms: list):
    return None if not terms else sum(terms[1:], terms[0])


# -- standard / mini: shard_linear_backward -------------------------------------------------
# grad_x = dy W + T(P(dy) B^T + grad_fold), grad_block = fold^T P(dy).


def _shard_backward_setup(ctx, inputs, output):
    grad_out, fold, weight, block, in_features, p, seed, grad_fold, output_mask = inputs
    ctx.set_materialize_grads(False)
    ctx.in_features, ctx.p, ctx.output_mask = in_features, p, tuple(output_mask)
    ctx.grad_fold_dtype = None if grad_fold is None else grad_fold.dtype
    ctx.save_for_backward(grad_out, fold, weight, block, seed)


def _shard_backward_backward(ctx, u_x, u_block):
    grad_out, fold, weight, block, seed = ctx.saved_tensors
    u_x = _used(u_x, ctx.output_mask[0])
    u_block = _used(u_block, ctx.output_mask[1])
    needs = ctx.needs_input_grad
    acc = _acc(grad_out.dtype)
    rows, out, in_features = math.prod(grad_out.shape[:-1]), grad_out.shape[-1], ctx.in_features
    r, m = block.shape
    dy = grad_out.reshape(rows, out).to(acc)
    b = block.to(acc)

    def out_fold(t: Tensor) -> Tensor:  # P: [N, out] -> [N, m]
        return t if m == out else t.reshape(rows, out // m, m).sum(1)

    def out_tile(t: Tensor) -> Tensor:  # P^T: [N, m] -> [N, out]
        return t if m == out else t.repeat(1, out // m)

    ux = None if u_x is None else u_x.reshape(rows, in_features)
    folded_u = None if ux is None else torch.ops.miss.shard_fold(ux, r, ctx.p, seed).to(acc)  # F(u_x)

    d_grad_out = d_fold = d_weight = d_block = d_grad_fold = None
    if needs[0]:
        terms = []
        if ux is not None:
            if weight is not None:
                terms.append(ux.to(acc) @ weight.to(acc).t())
            terms.append(out_tile(folded_u @ b))
        if u_block is not None:
            terms.append(out_tile(fold.to(acc) @ u_block.to(acc)))
        total = _total(terms)
        d_grad_out = None if total is None else total.reshape(grad_out.shape).to(grad_out.dtype)
    if needs[1] and u_block is not None:
        d_fold = (out_fold(dy) @ u_block.to(acc).t()).to(fold.dtype)
    if needs[2] and ux is not None and weight is not None:
        d_weight = (dy.t() @ ux.to(acc)).to(weight.dtype)
    if needs[3] and ux is not None:
        d_block = (folded_u.t() @ out_fold(dy)).to(block.dtype)
    if needs[7] and ux is not None:
        d_grad_fold = folded_u.to(ctx.grad_fold_dtype)
    return d_grad_out, d_fold, d_weight, d_block, None, None, None, d_grad_fold, None


torch.library.register_autograd(
    "miss::shard_linear_backward", _shard_backward_backward, setup_context=_shard_backward_setup
)


# -- bat: tiles -----------------------------------------------------------------------------
# A [out, in] matrix seen as its r x r tiles: [K, r, J, r], index (k, a, j, b).


def _tiles(t: Tensor, r: int) -> Tensor:
    return t.reshape(t.shape[0] // r, r, t.shape[1] // r, r)


def _tiles_times_block(t4: Tensor, block: Tensor) -> Tensor:
    """Every tile T_kj @ B_k."""
    return torch.einsum("kajb,kbc->kajc", t4, block)


def _tiles_transposed_times(t4: Tensor, g4: Tensor) -> Tensor:
    """sum_j T_kj^T @ G_kj, [K, r, r]."""
    return torch.einsum("kajb,kajc->kbc", t4, g4)


def _tiles_times_block_transposed(g4: Tensor, block: Tensor) -> Tensor:
    """Every tile G_kj @ V_k^T."""
    return torch.einsum("kajc,kbc->kajb", g4, block)


# bat_weight_grad(G, B) = G_kj (I + B_k)^T for every tile.


def _bat_weight_grad_setup(ctx, inputs, output):
    grad_weight, block = inputs
    ctx.save_for_backward(grad_weight, block)


def _bat_weight_grad_backward(ctx, u):
    grad_weight, block = ctx.saved_tensors
    r, acc = block.shape[-1], _acc(grad_weight.dtype)
    u4, b = _tiles(u.to(acc), r), block.to(acc)
    d_grad_weight = d_block = None
    if ctx.needs_input_grad[0]:
        d_grad_weight = (u4 + _tiles_times_block(u4, b)).reshape(u.shape).to(grad_weight.dtype)
    if ctx.needs_input_grad[1]:
        d_block = _tiles_transposed_times(u4, _tiles(grad_weight.to(acc), r)).to(block.dtype)
    return d_grad_weight, d_block


torch.library.register_autograd(
    "miss::bat_weight_grad", _bat_weight_grad_backward, setup_context=_bat_weight_grad_setup
)


# bat_block_grad(G, W, r) = sum_j W_kj^T G_kj + G_kj.


def _block_grad_partials(grad_weight: Tensor, weight: Tensor, v: Tensor, need_g: bool, need_w: bool):
    """(dG, dW) of <V, bat_block_grad(G, W)>, as [out, in] in the accumulation dtype."""
    r = v.shape[-1]
    d_g = d_w = None
    if need_g:
        w4 = _tiles(weight.to(v.dtype), r)
        d_g = (_tiles_times_block(w4, v) + v[:, :, None, :]).reshape(weight.shape)
    if need_w:
        d_w = _tiles_times_block_transposed(_tiles(grad_weight.to(v.dtype), r), v).reshape(weight.shape)
    return d_g, d_w


def _bat_block_grad_setup(ctx, inputs, output):
    grad_weight, weight, r = inputs
    ctx.save_for_backward(grad_weight, weight)


def _bat_block_grad_backward(ctx, v):
    grad_weight, weight = ctx.saved_tensors
    need_g, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d_g, d_w = _block_grad_partials(grad_weight, weight, v.to(_acc(weight.dtype)), need_g, need_w)
    return (None if d_g is None else d_g.to(grad_weight.dtype),
            None if d_w is None else d_w.to(weight.dtype), None)


torch.library.register_autograd(
    "miss::bat_block_grad", _bat_block_grad_backward, setup_context=_bat_block_grad_setup
)


# bat_linear_backward: grad_x = dy W', grad_weight = bat_weight_grad(G, B),
# grad_block = bat_block_grad(G, W), with W' = bat_weight(W, B) and G = dy^T x.


def _bat_backward_setup(ctx, inputs, output):
    grad_out, x, weight, block, output_mask = inputs
    ctx.set_materialize_grads(False)
    ctx.output_mask = tuple(output_mask)
    ctx.save_for_backward(grad_out, x, weight, block)


def _bat_backward_backward(ctx, u_x, u_weight, u_block):
    grad_out, x, weight, block = ctx.saved_tensors
    u_x = _used(u_x, ctx.output_mask[0])
    u_weight = _used(u_weight, ctx.output_mask[1])
    u_block = _used(u_block, ctx.output_mask[2])
    acc = _acc(x.dtype)
    rows, out, in_features, r = math.prod(x.shape[:-1]), weight.shape[0], weight.shape[1], block.shape[-1]
    dy = grad_out.reshape(rows, out).to(acc)
    x2 = x.reshape(rows, in_features).to(acc)
    w, b = weight.to(acc), block.to(acc)
    d_dy, d_x, d_w, d_b = [], [], [], []

    if u_x is not None:  # grad_x = dy @ W'
        ux = u_x.reshape(rows, in_features).to(acc)
        d_dy.append(ux @ torch.ops.miss.bat_weight(w, b).t())
        d_transformed = dy.t() @ ux
        d_w.append(torch.ops.miss.bat_weight_grad(d_transformed, b))
        d_b.append(torch.ops.miss.bat_block_grad(d_transformed, w, r))
    if u_weight is not None or u_block is not None:
        g = dy.t() @ x2
        d_g = []
        if u_weight is not None:  # grad_weight = G (I + B)^T per tile
            uw4 = _tiles(u_weight.to(acc), r)
            d_g.append((uw4 + _tiles_times_block(uw4, b)).reshape(g.shape))
            d_b.append(_tiles_transposed_times(uw4, _tiles(g, r)))
        if u_block is not None:  # grad_block = sum_j W^T G + G per tile row
            dg_block, dw_block = _block_grad_partials(g, w, u_block.to(acc), True, True)
            d_g.append(dg_block)
            d_w.append(dw_block)
        dg = _total(d_g)
        d_dy.append(x2 @ dg.t())
        d_x.append(dy @ dg)

    needs = ctx.needs_input_grad

    def result(terms, need, like):
        total = _total(terms)
        return None if not need or total is None else total.reshape(like.shape).to(like.dtype)

    return (result(d_dy, needs[0], grad_out), result(d_x, needs[1], x), result(d_w, needs[2], weight),
            result(d_b, needs[3], block), None)


torch.library.register_autograd(
    "miss::bat_linear_backward", _bat_backward_backward, setup_context=_bat_backward_setup
)
