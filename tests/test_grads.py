"""torch.autograd.gradcheck in float64 through every op that has autograd (miss_ext/ops.py).

The kernels accumulate float64 data in float64, so gradcheck runs with its default
tolerances. Dropout (p = 0.3) uses a fixed seed tensor: the mask is a deterministic function
of (seed, row, column), so the op is a fixed linear map and gradcheck is valid.
"""

import pytest
import torch

import miss_ext

from conftest import bat_block, generator, rand, seed_tensor

GRADCHECK = dict()  # gradcheck's float64 defaults
P_SEEDS = [(0.0, None), (0.3, 20240917)]
P_IDS = ["no_dropout", "dropout"]

def _leaf(shape, gen, scale=1.0, requires_grad=True):
    return rand(shape, gen=gen, scale=scale, dtype=torch.float64).requires_grad_(requires_grad)


def _seed(seed_value):
    return None if seed_value is None else seed_tensor(seed_value)


def gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, tuple(inputs), **GRADCHECK)


@pytest.mark.parametrize("p,seed_value", P_SEEDS, ids=P_IDS)
@pytest.mark.parametrize("shape,r", [((3, 7), 3), ((2, 2, 5), 2), ((5,), 5)], ids=["2d-in%r!=0", "3d", "1d-r=in"])
def test_gradcheck_shard_fold(shape, r, p, seed_value):
    x = _leaf(shape, generator(1))
    seed = _seed(seed_value)
    gradcheck(lambda x: miss_ext.shard_fold(x, r, p, seed), [x])


@pytest.mark.parametrize("p,seed_value", P_SEEDS, ids=P_IDS)
def test_gradcheck_shard_tile_add(p, seed_value):
    gen = generator(2)
    grad_x, g = _leaf((2, 2, 7), gen), _leaf((4, 3), gen)
    seed = _seed(seed_value)
    gradcheck(lambda a, b: miss_ext.shard_tile_add(a, b, p, seed), [grad_x, g])


SHARD_LAYERS = [
    # (x shape, out, r, m): standard with in % r != 0, mini, 3-D mini
    ((3, 7), 6, 3, 6),
    ((3, 7), 6, 3, 2),
    ((2, 2, 5), 4, 2, 1),
]
SHARD_IDS = ["standard", "mini", "mini_r=1-3d"]


@pytest.mark.parametrize("weight_requires_grad", [False, True], ids=["frozen_weight", "trainable_weight"])
@pytest.mark.parametrize("p,seed_value", P_SEEDS, ids=P_IDS)
@pytest.mark.parametrize("x_shape,out,r,m", SHARD_LAYERS, ids=SHARD_IDS)
def test_gradcheck_shard_linear(x_shape, out, r, m, p, seed_value, weight_requires_grad):
    gen = generator(3)
    in_features = x_shape[-1]
    x = _leaf(x_shape, gen)
    weight = _leaf((out, in_features), gen, scale=0.5, requires_grad=weight_requires_grad)
    bias = _leaf((out,), gen)
    block = _leaf((r, m), gen, scale=0.5)
    seed = _seed(seed_value)
    gradcheck(lambda x, w, b, blk: miss_ext.shard_linear(x, w, b, blk, p, seed), [x, weight, bias, block])


@pytest.mark.parametrize("p,seed_value", P_SEEDS, ids=P_IDS)
@pytest.mark.parametrize("x_shape,out,r,m", SHARD_LAYERS[:2], ids=SHARD_IDS[:2])
def test_gradcheck_shard_linear_no_bias(x_shape, out, r, m, p, seed_value):
    gen = generator(4)
    x = _leaf(x_shape, gen)
    weight = _leaf((out, x_shape[-1]), gen, scale=0.5, requires_grad=False)
    block = _leaf((r, m), gen, scale=0.5)
    seed = _seed(seed_value)
    gradcheck(lambda x, blk: miss_ext.shard_linear(x, weight, None, blk, p, seed), [x, block])


@pytest.mark.parametrize("p,seed_value", P_SEEDS, ids=P_IDS)
@pytest.mark.parametrize("x_shape,out,r,m", SHARD_LAYERS[:2], ids=SHARD_IDS[:2])
def test_gradcheck_shard_linear_both_outputs(x_shape, out, r, m, p, seed_value):
    """The raw op returns (y, fold): a gradient reaching the fold output (grad_fold) too."""
    gen = generator(5)
    x = _leaf(x_shape, gen)
    weight = _leaf((out, x_shape[-1]), gen, scale=0.5, requires_grad=False)
    bias = _leaf((out,), gen)
    block = _leaf((r, m), gen, scale=0.5)
    seed = _seed(seed_value)
    gradcheck(lambda x, b, blk: torch.ops.miss.shard_linear(x, weight, b, blk, p, seed), [x, bias, block])


@pytest.mark.parametrize("both_outputs", [False, True], ids=["y", "y_and_fold"])
@pytest.mark.parametrize("p,seed_value", P_SEEDS, ids=P_IDS)
@pytest.mark.parametrize("x_shape,out,r,m", SHARD_LAYERS, ids=SHARD_IDS)
def test_gradcheck_shard_delta_add(x_shape, out, r, m, p, seed_value, both_outputs):
    gen = generator(6)
    y = _leaf((*x_shape[:-1], out), gen)
    x = _leaf(x_shape, gen)
    block = _leaf((r, m), gen, scale=0.5)
    seed = _seed(seed_value)
    if both_outputs:
        fn = lambda y, x, blk: torch.ops.miss.shard_delta_add(y, x, blk, p, seed)  # noqa: E731
    else:
        fn = lambda y, x, blk: miss_ext.shard_delta_add(y, x, blk, p, seed)  # noqa: E731
    gradcheck(fn, [y, x, block])


BAT_LAYERS = [((8, 4), 4), ((4, 6), 2), ((3, 3), 1), ((4, 4), 4)]
BAT_IDS = ["out8-in4-r4", "out4-in6-r2", "r1", "single_tile"]


@pytest.mark.parametrize("weight_shape,r", BAT_LAYERS, ids=BAT_IDS)
def test_gradcheck_bat_weight(weight_shape, r):
    gen = generator(7)
    weight = _leaf(weight_shape, gen)
    block = bat_block(weight_shape[0], r, gen=gen, dtype=torch.float64).requires_grad_()
    gradcheck(miss_ext.bat_weight, [weight, block])


@pytest.mark.parametrize("weight_requires_grad", [False, True], ids=["frozen_weight", "trainable_weight"])
@pytest.mark.parametrize("x_lead", [(3,), (2, 2)], ids=["2d", "3d"])
@pytest.mark.parametrize("weight_shape,r", BAT_LAYERS, ids=BAT_IDS)
def test_gradcheck_bat_linear(weight_shape, r, x_lead, weight_requires_grad):
    gen = generator(8)
    out, in_features = weight_shape
    x = _leaf((*x_lead, in_features), gen)
    weight = _leaf(weight_shape, gen, scale=0.5, requires_grad=weight_requires_grad)
    bias = _leaf((out,), gen)
    block = bat_block(out, r, gen=gen, dtype=torch.float64).requires_grad_()
    gradcheck(miss_ext.bat_linear, [x, weight, bias, block])


def test_gradcheck_bat_linear_no_bias():
    gen = generator(9)
    x = _leaf((3, 4), gen)
    weight = _leaf((8, 4), gen, scale=0.5)
    block = bat_block(8, 2, gen=gen, dtype=torch.float64).requires_grad_()
    gradcheck(lambda x, w, blk: miss_ext.bat_linear(x, w, None, blk), [x, weight, block])
