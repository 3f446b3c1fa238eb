"""The shard ops of torch.ops.miss (standard and mini) against the float64 oracle
(miss_ext.reference), in every dtype, and autograd through the Python entry points of both
variants.

Forward ops are compared value by value; shard_linear_backward against torch.autograd.grad of
the float64 reference. The accuracy rule is conftest.assert_close_to_oracle. The bat ops and
the many-row paths have their own files: tests/test_ops_bat.py, test_ops_many_rows.py.
"""

import itertools

import pytest
import torch

import miss_ext
from miss_ext import reference

from conftest import (
    BAT_CASES,
    MIXED_DTYPES,
    MIXED_IDS,
    SHARD_CASES,
    SHARD_CASES_CORE,
    assert_close_to_oracle,
    assert_empty_output,
    dtype_id,
    generator,
    grads_oracle_and_same,
    ids,
    leaf,
    make_bat_layer,
    make_shard_layer,
    make_x,
    oracle_and_same,
    rand,
    ref_shard_delta_add_outputs,
    ref_shard_linear_outputs,
    ref_shard_tile_add,
    seed_tensor,
)

DEVICE = "cpu"
P_VALUES = (0.0, 0.3)


def _seed(p, value=977):
    return seed_tensor(value, DEVICE) if p > 0 else None


# ---------------------------------------------------------------------------------------
# shard_fold


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("case", SHARD_CASES, ids=ids(SHARD_CASES))
def test_shard_fold(case, p, dtype):
    layer = make_shard_layer(case, dtype=dtype, device=DEVICE)
    seed = _seed(p)
    ours = miss_ext.shard_fold(layer.x, case.r, p, seed)
    oracle, same = oracle_and_same(lambda x: reference.shard_fold(x, case.r, p, seed), layer.x)
    assert_close_to_oracle(ours, oracle, same, dtype=torch.float32, what="fold")


def test_shard_fold_dropout_uses_reference_mask_exactly():
    # With dyadic inputs (small integers) every product and sum is exact in float32, so the
    # fold with dropout p=0.5 (scale exactly 2) must equal the reference bit for bit: this
    # pins the mask itself, not only its statistics.
    gen = generator(5)
    x = torch.randint(1, 9, (33, 37), generator=gen).to(torch.float32)
    seed = seed_tensor(-123456789012345)
    ours = miss_ext.shard_fold(x, 5, 0.5, seed)
    mult = reference.dropout_multipliers(int(seed.item()), 33, 37, 0.5)
    expected = reference.shard_fold(x.double() * mult, 5)
    assert torch.equal(ours.double(), expected)


# ---------------------------------------------------------------------------------------
# shard_tile_add


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("case", SHARD_CASES, ids=ids(SHARD_CASES))
def test_shard_tile_add(case, p, dtype):
    gen = generator(3)
    grad_x = make_x(case.lead, case.in_features, layout=case.layout, dtype=dtype, gen=gen, device=DEVICE)
    g = rand((case.rows, case.r), gen=gen, device=DEVICE)
    seed = _seed(p)
    ours = miss_ext.shard_tile_add(grad_x, g, p, seed)
    oracle, same = oracle_and_same(lambda a, b: ref_shard_tile_add(a, b, p, seed), grad_x, g)
    assert_close_to_oracle(ours, oracle, same, dtype=dtype, what="tile_add")


@pytest.mark.parametrize("g_dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_shard_tile_add_low_precision_g(g_dtype):
    gen = generator(4)
    grad_x = rand((6, 10), gen=gen)
    g = rand((6, 4), dtype=g_dtype, gen=gen)
    ours = miss_ext.shard_tile_add(grad_x, g)
    oracle, same = oracle_and_same(ref_shard_tile_add, grad_x, g)
    assert_close_to_oracle(ours, oracle, same, dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# shard_linear


def _check_shard_linear(layer, p, seed):
    y, fold = torch.ops.miss.shard_linear(layer.x, layer.weight, layer.bias, layer.block, p, seed)
    (oy, ofold), (sy, sfold) = oracle_and_same(
        lambda x, w, b, blk: ref_shard_linear_outputs(x, w, b, blk, p, seed),
        layer.x, layer.weight, layer.bias, layer.block,
    )
    assert_close_to_oracle(y, oy, sy, dtype=layer.x.dtype, what="y")
    assert_close_to_oracle(fold, ofold, sfold, dtype=torch.float32, what="fold")
    # The Python wrapper returns the layer output only.
    assert torch.equal(miss_ext.shard_linear(layer.x, layer.weight, layer.bias, layer.block, p, seed), y)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("case", SHARD_CASES, ids=ids(SHARD_CASES))
def test_shard_linear(case, p, dtype):
    _check_shard_linear(make_shard_layer(case, dtype=dtype, device=DEVICE), p, _seed(p))


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("case", SHARD_CASES_CORE, ids=ids(SHARD_CASES_CORE))
def test_shard_linear_no_bias(case, p, dtype):
    _check_shard_linear(make_shard_layer(case, dtype=dtype, bias=False, device=DEVICE), p, _seed(p))


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=MIXED_IDS)
@pytest.mark.parametrize("case", SHARD_CASES_CORE, ids=ids(SHARD_CASES_CORE))
def test_shard_linear_mixed_block_dtype(case, dtypes, p):
    x_dtype, block_dtype = dtypes
    layer = make_shard_layer(case, dtype=x_dtype, block_dtype=block_dtype, device=DEVICE)
    _check_shard_linear(layer, p, _seed(p))


# ---------------------------------------------------------------------------------------
# shard_delta_add


def _check_shard_delta_add(layer, y, p, seed):
    out, fold = torch.ops.miss.shard_delta_add(y, layer.x, layer.block, p, seed)
    (oy, ofold), (sy, sfold) = oracle_and_same(
        lambda yy, x, blk: ref_shard_delta_add_outputs(yy, x, blk, p, seed), y, layer.x, layer.block
    )
    assert_close_to_oracle(out, oy, sy, dtype=y.dtype, what="y + delta")
    assert_close_to_oracle(fold, ofold, sfold, dtype=torch.float32, what="fold")
    assert torch.equal(miss_ext.shard_delta_add(y, layer.x, layer.block, p, seed), out)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("case", SHARD_CASES, ids=ids(SHARD_CASES))
def test_shard_delta_add(case, p, dtype):
    layer = make_shard_layer(case, dtype=dtype, device=DEVICE)
    y = rand((*case.lead, case.out_features), dtype=dtype, gen=generator(9), device=DEVICE)
    _check_shard_delta_add(layer, y, p, _seed(p))


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=MIXED_IDS)
@pytest.mark.parametrize("case", SHARD_CASES_CORE, ids=ids(SHARD_CASES_CORE))
def test_shard_delta_add_mixed_block_dtype(case, dtypes, p):
    x_dtype, block_dtype = dtypes
    layer = make_shard_layer(case, dtype=x_dtype, block_dtype=block_dtype, device=DEVICE)
    y = rand((*case.lead, case.out_features), dtype=x_dtype, gen=generator(9), device=DEVICE)
    _check_shard_delta_add(layer, y, p, _seed(p))


def test_shard_delta_add_non_contiguous_y():
    case = SHARD_CASES[0]
    layer = make_shard_layer(case, device=DEVICE)
    y = rand((case.out_features, case.rows), gen=generator(9), device=DEVICE).t()
    _check_shard_delta_add(layer, y, 0.3, seed_tensor(5))


# ---------------------------------------------------------------------------------------
# shard_linear_backward


def _shard_backward_inputs(case, dtype, block_dtype, with_weight, p, seed, grad_seed=11):
    layer = make_shard_layer(case, dtype=dtype, block_dtype=block_dtype, device=DEVICE)
    gen = generator(grad_seed)
    grad_out = rand((*case.lead, case.out_features), dtype=dtype, gen=gen, device=DEVICE)
    grad_fold = rand((case.rows, case.r), gen=gen, device=DEVICE)
    if with_weight:
        fold = torch.ops.miss.shard_linear(layer.x, layer.weight, layer.bias, layer.block, p, seed)[1]
    else:
        y = rand((*case.lead, case.out_features), dtype=dtype, gen=gen, device=DEVICE)
        fold = torch.ops.miss.shard_delta_add(y, layer.x, layer.block, p, seed)[1]
    return layer, grad_out, grad_fold, fold


def _shard_backward_oracle(layer, grad_out, grad_fold, with_weight, p, seed):
    """(grad_x, grad_block) of the float64 reference and of the same-precision reference."""
    if with_weight:
        fn = lambda x, w, b, blk: ref_shard_linear_outputs(x, w, b, blk, p, seed)  # noqa: E731
        inputs, wrt = [layer.x, layer.weight, layer.bias, layer.block], [0, 3]
    else:
        y = torch.zeros(*layer.x.shape[:-1], grad_out.shape[-1], dtype=grad_out.dtype, device=DEVICE)
        fn = lambda yy, x, blk: ref_shard_delta_add_outputs(yy, x, blk, p, seed)  # noqa: E731
        inputs, wrt = [y, layer.x, layer.block], [1, 2]
    return grads_oracle_and_same(fn, inputs, [grad_out, grad_fold], wrt)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("use_grad_fold", [False, True], ids=["no_grad_fold", "grad_fold"])
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "weight_None"])
@pytest.mark.parametrize("case", SHARD_CASES_CORE, ids=ids(SHARD_CASES_CORE))
def test_shard_linear_backward(case, with_weight, use_grad_fold, p, dtype):
    seed = _seed(p)
    layer, grad_out, grad_fold, fold = _shard_backward_inputs(case, dtype, None, with_weight, p, seed)
    grad_x, grad_block = torch.ops.miss.shard_linear_backward(
        grad_out, fold, layer.weight if with_weight else None, layer.block, case.in_features, p, seed,
        grad_fold if use_grad_fold else None, [True, True],
    )
    (ox, oblock), (sx, sblock) = _shard_backward_oracle(
        layer, grad_out, grad_fold if use_grad_fold else None, with_weight, p, seed
    )
    assert_close_to_oracle(grad_x, ox, sx, dtype=dtype, what="grad_x")
    assert_close_to_oracle(grad_block, oblock, sblock, dtype=layer.block.dtype, what="grad_block")


@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=MIXED_IDS)
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "weight_None"])
@pytest.mark.parametrize("case", SHARD_CASES_CORE[:2], ids=ids(SHARD_CASES_CORE[:2]))
def test_shard_linear_backward_mixed_block_dtype(case, with_weight, dtypes):
    x_dtype, block_dtype = dtypes
    p, seed = 0.3, seed_tensor(31)
    layer, grad_out, grad_fold, fold = _shard_backward_inputs(case, x_dtype, block_dtype, with_weight, p, seed)
    grad_x, grad_block = torch.ops.miss.shard_linear_backward(
        grad_out, fold, layer.weight if with_weight else None, layer.block, case.in_features, p, seed,
        grad_fold, [True, True],
    )
    (ox, oblock), (sx, sblock) = _shard_backward_oracle(layer, grad_out, grad_fold, with_weight, p, seed)
    assert_close_to_oracle(grad_x, ox, sx, dtype=x_dtype, what="grad_x")
    assert_close_to_oracle(grad_block, oblock, sblock, dtype=block_dtype, what="grad_block")


@pytest.mark.parametrize("output_mask", list(itertools.product([True, False], repeat=2)),
                         ids=lambda m: "mask_" + "".join("1" if b else "0" for b in m))
@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "weight_None"])
@pytest.mark.parametrize("dtype_", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_shard_linear_backward_output_mask(output_mask, with_weight, dtype_):
    case = SHARD_CASES[1]  # mini, in % r != 0
    p, seed = 0.3, seed_tensor(8)
    layer, grad_out, grad_fold, fold = _shard_backward_inputs(case, dtype_, None, with_weight, p, seed)
    grad_x, grad_block = torch.ops.miss.shard_linear_backward(
        grad_out, fold, layer.weight if with_weight else None, layer.block, case.in_features, p, seed,
        grad_fold, list(output_mask),
    )
    (ox, oblock), (sx, sblock) = _shard_backward_oracle(layer, grad_out, grad_fold, with_weight, p, seed)
    if output_mask[0]:
        assert_close_to_oracle(grad_x, ox, sx, dtype=dtype_, what="grad_x")
    else:
        assert_empty_output(grad_x, "grad_x")
    if output_mask[1]:
        assert_close_to_oracle(grad_block, oblock, sblock, dtype=layer.block.dtype, what="grad_block")
    else:
        assert_empty_output(grad_block, "grad_block")


@pytest.mark.parametrize("case", SHARD_CASES, ids=ids(SHARD_CASES))
def test_shard_linear_backward_shapes(case):
    """Every shape rule (in % r != 0, r = 1, r = in, N = 0, 1-4 dims, strided x) in float32."""
    p, seed = 0.3, seed_tensor(12)
    layer, grad_out, grad_fold, fold = _shard_backward_inputs(case, torch.float32, None, True, p, seed)
    grad_x, grad_block = torch.ops.miss.shard_linear_backward(
        grad_out, fold, layer.weight, layer.block, case.in_features, p, seed, grad_fold, [True, True]
    )
    (ox, oblock), (sx, sblock) = _shard_backward_oracle(layer, grad_out, grad_fold, True, p, seed)
    assert_close_to_oracle(grad_x, ox, sx, dtype=torch.float32, what="grad_x")
    assert_close_to_oracle(grad_block, oblock, sblock, dtype=torch.float32, what="grad_block")


def test_shard_linear_backward_non_contiguous_grad_out():
    case = SHARD_CASES[1]
    p, seed = 0.3, seed_tensor(13)
    layer, _, grad_fold, fold = _shard_backward_inputs(case, torch.float32, None, True, p, seed)
    grad_out = rand((case.out_features, case.rows), gen=generator(14)).t()
    grad_x, grad_block = torch.ops.miss.shard_linear_backward(
        grad_out, fold, layer.weight, layer.block, case.in_features, p, seed, grad_fold, [True, True]
    )
    (ox, oblock), (sx, sblock) = _shard_backward_oracle(layer, grad_out, grad_fold, True, p, seed)
    assert_close_to_oracle(grad_x, ox, sx, what="grad_x")
    assert_close_to_oracle(grad_block, oblock, sblock, what="grad_block")


# ---------------------------------------------------------------------------------------
# Autograd through the Python entry points, in every dtype (gradcheck is float32-only).


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("case", SHARD_CASES_CORE, ids=ids(SHARD_CASES_CORE))
def test_shard_linear_autograd(case, p, dtype):
    seed = _seed(p)
    layer = make_shard_layer(case, dtype=dtype, device=DEVICE)
    inputs = [layer.x, layer.weight, layer.bias, layer.block]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = miss_ext.shard_linear(*leaves, p, seed)
    grad_out = rand(y.shape, dtype=dtype, gen=generator(21), device=DEVICE)
    ours = torch.autograd.grad(y, leaves, grad_out)
    oracle, same = grads_oracle_and_same(
        lambda x, w, b, blk: reference.shard_linear(x, w, b, blk, p, seed), inputs, [grad_out], [0, 1, 2, 3]
    )
    for name, g, o, s, t in zip(("x", "weight", "bias", "block"), ours, oracle, same, inputs):
        assert_close_to_oracle(g, o, s, dtype=t.dtype, what=f"grad_{name}")


@pytest.mark.parametrize("case", BAT_CASES[:4], ids=ids(BAT_CASES[:4]))
def test_bat_linear_autograd(case, dtype):
    layer = make_bat_layer(case, dtype=dtype, device=DEVICE)
    inputs = [layer.x, layer.weight, layer.bias, layer.block]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = miss_ext.bat_linear(*leaves)
    grad_out = rand(y.shape, dtype=dtype, gen=generator(22), device=DEVICE)
    ours = torch.autograd.grad(y, leaves, grad_out)
    oracle, same = grads_oracle_and_same(reference.bat_linear, inputs, [grad_out], [0, 1, 2, 3])
    for name, g, o, s, t in zip(("x", "weight", "bias", "block"), ours, oracle, same, inputs):
        assert_close_to_oracle(g, o, s, dtype=t.dtype, what=f"grad_{name}")


# ---------------------------------------------------------------------------------------
# x in odd layouts (strided, expanded) and y in another dtype: read in place, as the oracle says


def test_x_with_many_unmergeable_leading_dims():
    """A permuted 5-D x (4 leading dims whose strides cannot be merged) is read in place."""
    base = rand((3, 2, 4, 2, 10), gen=generator(65))
    x = base.permute(3, 1, 0, 2, 4)  # [2, 2, 3, 4, 10]
    layer = make_shard_layer(SHARD_CASES[0])
    seed = seed_tensor(66)
    _check_shard_linear(type(layer)(x, layer.weight, layer.bias, layer.block), 0.3, seed)
    ours = miss_ext.shard_fold(x, 4, 0.3, seed)
    assert torch.equal(ours, miss_ext.shard_fold(x.contiguous(), 4, 0.3, seed))


def test_expanded_x_with_zero_stride():
    row = rand((1, 10), gen=generator(67))
    x = row.expand(6, 10)
    layer = make_shard_layer(SHARD_CASES[0])
    _check_shard_linear(type(layer)(x, layer.weight, layer.bias, layer.block), 0.3, seed_tensor(68))


def test_shard_delta_add_y_dtype_differs_from_x():
    """A float32 running output with a bfloat16 x: result in y's dtype, grads in their inputs'."""
    case = SHARD_CASES[1]
    layer = make_shard_layer(case, dtype=torch.bfloat16, block_dtype=torch.float32)
    y = rand((*case.lead, case.out_features), gen=generator(69))
    _check_shard_delta_add(layer, y, 0.3, seed_tensor(70))
    leaves = [leaf(t) for t in (y, layer.x, layer.block)]
    out = miss_ext.shard_delta_add(*leaves, 0.3, seed_tensor(70))
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert [g.dtype for g in grads] == [torch.float32, torch.bfloat16, torch.float32]
