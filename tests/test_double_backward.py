"""Double backward (create_graph=True): gradgradcheck in float64 for every differentiable op
and every MissLinear variant, and gradcheck of the backward ops themselves.

Before miss_ext/backward_autograd.py every one of these failed with "mm(): functions with
out=... arguments don't support automatic differentiation". Dropout uses a fixed seed: the
mask is a function of (seed, row, column), so the op is a fixed linear map.
"""

import pytest
import torch
from torch import nn

import miss_ext
from miss_ext import MissLinear

from conftest import bat_block, generator, rand, seed_tensor

P_SEEDS = [(0.0, None), (0.3, 20240917)]
P_IDS = ["no_dropout", "dropout"]


def _leaf(shape, gen, scale=1.0):
    return rand(shape, gen=gen, scale=scale, dtype=torch.float64).requires_grad_(True)


def _seed(seed_value):
    return None if seed_value is None else seed_tensor(seed_value)


def check_both_orders(fn, inputs):
    inputs = tuple(inputs)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("p,seed_value", P_SEEDS, ids=P_IDS)
def test_gradgradcheck_shard_fold_and_tile_add(p, seed_value):
    gen, seed = generator(1), _seed(seed_value)
    check_both_orders(lambda x: miss_ext.shard_fold(x, 3, p, seed), [_leaf((2, 2, 7), gen)])
    check_both_orders(lambda a, g: miss_ext.shard_tile_add(a, g, p, seed), [_leaf((4, 7), gen), _leaf((4, 3), gen)])


@pytest.mark.parametrize("p,seed_value", P_SEEDS, ids=P_IDS)
@pytest.mark.parametrize("m", [6, 2], ids=["standard", "mini"])
def test_gradgradcheck_shard_linear_and_delta_add(m, p, seed_value):
    """All of x, weight, bias and block trainable, so every partial of the backward is used."""
    gen, seed = generator(2), _seed(seed_value)
    x, weight, bias, block = _leaf((2, 2, 7), gen), _leaf((6, 7), gen), _leaf((6,), gen), _leaf((3, m), gen)
    check_both_orders(lambda *a: miss_ext.shard_linear(*a, p, seed), [x, weight, bias, block])
    y = _leaf((2, 2, 6), gen)
    check_both_orders(lambda *a: miss_ext.shard_delta_add(*a, p, seed), [y, x, block])


def test_gradgradcheck_bat_ops():
    gen = generator(3)
    x, weight, bias = _leaf((2, 3, 8), gen), _leaf((12, 8), gen), _leaf((12,), gen)
    block = bat_block(12, 4, gen=gen, dtype=torch.float64).requires_grad_(True)
    check_both_orders(miss_ext.bat_linear, [x, weight, bias, block])
    check_both_orders(miss_ext.bat_weight, [weight, block])
    grad_weight = _leaf((12, 8), gen)
    check_both_orders(miss_ext.bat_weight_grad, [grad_weight, block])
    check_both_orders(lambda g, w: miss_ext.bat_block_grad(g, w, 4), [grad_weight, weight])


@pytest.mark.parametrize("p,seed_value", P_SEEDS, ids=P_IDS)
@pytest.mark.parametrize("with_weight", [True, False], ids=["linear", "delta_only"])
def test_gradcheck_shard_linear_backward_op(with_weight, p, seed_value):
    """The backward op as a function of all its tensor inputs, grad_fold included."""
    gen, seed = generator(4), _seed(seed_value)
    grad_out, fold, block, grad_fold = _leaf((2, 3, 6), gen), _leaf((6, 3), gen), _leaf((3, 2), gen), _leaf((6, 3), gen)
    weight = _leaf((6, 7), gen) if with_weight else None

    def backward(grad_out, fold, block, grad_fold, *weight_or_none):
        w = weight_or_none[0] if weight_or_none else None
        return torch.ops.miss.shard_linear_backward(grad_out, fold, w, block, 7, p, seed, grad_fold, [True, True])

    inputs = [grad_out, fold, block, grad_fold] + ([weight] if with_weight else [])
    check_both_orders(backward, inputs)


def test_gradcheck_bat_linear_backward_op():
    gen = generator(5)
    grad_out, x, weight = _leaf((2, 3, 12), gen), _leaf((2, 3, 8), gen), _leaf((12, 8), gen)
    block = bat_block(12, 4, gen=gen, dtype=torch.float64).requires_grad_(True)
    check_both_orders(lambda *a: torch.ops.miss.bat_linear_backward(*a, [True, True, True]),
                      [grad_out, x, weight, block])


@pytest.mark.parametrize("init_weights,dropout", [(True, 0.0), (True, 0.25), ("mini", 0.0), ("mini", 0.25), ("bat", 0.0)],
                         ids=["standard", "standard-dropout", "mini", "mini-dropout", "bat"])
def test_gradgradcheck_miss_linear(init_weights, dropout):
    """The layer users train, in training mode; the seed is fixed per call so dropout draws
    the same mask each time gradgradcheck evaluates the layer."""
    torch.manual_seed(6)
    layer = MissLinear(nn.Linear(8, 12).double(), r=4, mini_r=3, miss_dropout=dropout, init_weights=init_weights)
    layer.train()
    with torch.no_grad():
        block = layer.miss_block["default"]
        block.copy_(torch.randn(block.shape, dtype=torch.float64) * 0.2)
    x = _leaf((3, 8), generator(7))
    block = layer.miss_block["default"].detach().clone().requires_grad_(True)

    def layer_fn(x, block):
        torch.manual_seed(8)
        return torch.func.functional_call(layer, {"miss_block.default": block}, (x,))

    check_both_orders(layer_fn, [x, block])


def test_gradient_penalty_training_step():
    """A user's WGAN-GP style step: penalise |d loss / d x| and step on the blocks."""
    torch.manual_seed(9)
    layer = MissLinear(nn.Linear(8, 8), r=4, init_weights=False)
    x = torch.randn(5, 8, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    penalty = grad_x.norm(dim=1).sub(1).square().mean()
    penalty.backward()
    block_grad = layer.miss_block["default"].grad
    assert block_grad is not None and torch.isfinite(block_grad).all() and block_grad.abs().sum() > 0
