"""SPEC sec. 5, "Edge cases that must work", one test per rule, each against the float64
reference (forward and autograd of every op involved), in float32, bfloat16 and float16."""

import math

import pytest
import torch
import torch.nn.functional as F

import miss_ext
from miss_ext import reference

from conftest import (
    BatCase,
    ShardCase,
    assert_close_to_oracle,
    bat_block,
    generator,
    leaf,
    make_shard_layer,
    oracle_and_same,
    rand,
    rand_away_from_zero,
    seed_tensor,
)
from layer_checks import check_bat_layer, check_shard_layer

P_VALUES = pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])


# ---------------------------------------------------------------------------------------
# in % r != 0 (standard, mini); r = 1; r = in


@P_VALUES
def test_in_features_not_multiple_of_r_standard(dtype, p):
    check_shard_layer(ShardCase((7,), 10, 12, 4, 12), dtype=dtype, p=p)
    check_shard_layer(ShardCase((7,), 11, 6, 3, 6), dtype=dtype, p=p)


@P_VALUES
def test_in_features_not_multiple_of_r_mini(dtype, p):
    check_shard_layer(ShardCase((7,), 10, 12, 4, 3), dtype=dtype, p=p)
    check_shard_layer(ShardCase((7,), 11, 6, 3, 2), dtype=dtype, p=p)


def test_in_features_not_multiple_of_r_fold_equals_zero_padded_fold():
    """SPEC sec. 1: the fold equals zero-padding x to ceil(in/r)*r columns and summing shards."""
    x = rand((6, 10), gen=generator(1))
    padded = F.pad(x, (0, 2))  # 12 = 3 shards of 4
    assert torch.equal(miss_ext.shard_fold(x, 4), miss_ext.shard_fold(padded, 4))
    expected = padded.double().reshape(6, 3, 4).sum(1)
    assert_close_to_oracle(miss_ext.shard_fold(x, 4), expected, reference.shard_fold(x, 4))


def test_in_features_not_multiple_of_r_merge_tail_columns_follow_the_rule():
    """dW[o, i] = B[i % r, o] for the tail columns too (exact in float32: one addition)."""
    w = rand((6, 10), gen=generator(2))
    block = rand((4, 6), gen=generator(3))
    merged = w.clone()
    miss_ext.merge_(merged, block)
    for i in range(10):
        assert torch.equal(merged[:, i], w[:, i] + block[i % 4, :]), f"column {i}"


@P_VALUES
def test_r_equals_1(dtype, p):
    check_shard_layer(ShardCase((6,), 9, 8, 1, 8), dtype=dtype, p=p)
    check_shard_layer(ShardCase((6,), 9, 8, 1, 2), dtype=dtype, p=p)
    check_bat_layer(BatCase((6,), 4, 6, 1), dtype=dtype)


def test_r_equals_1_fold_is_the_row_sum():
    x = rand((5, 9), gen=generator(4))
    torch.testing.assert_close(miss_ext.shard_fold(x, 1), x.sum(-1, keepdim=True), rtol=1e-6, atol=1e-6)


@P_VALUES
def test_r_equals_in(dtype, p):
    check_shard_layer(ShardCase((6,), 9, 8, 9, 8), dtype=dtype, p=p)
    check_shard_layer(ShardCase((6,), 9, 8, 9, 4), dtype=dtype, p=p)
    check_bat_layer(BatCase((6,), 6, 12, 6), dtype=dtype)
    # in = r = 1 (a single column, of any layout)
    check_shard_layer(ShardCase((6,), 1, 4, 1, 4), dtype=dtype, p=p)
    check_shard_layer(ShardCase((2, 3), 1, 4, 1, 2, "transposed3d"), dtype=dtype, p=p)
    check_bat_layer(BatCase((6,), 1, 3, 1, "transposed"), dtype=dtype)


def test_r_equals_in_fold_is_the_dropped_x():
    x = rand((5, 9), gen=generator(5))
    assert torch.equal(miss_ext.shard_fold(x, 9), x)
    seed = seed_tensor(6)
    mult = reference.dropout_multipliers(6, 5, 9, 0.5, dtype=torch.float32)
    assert torch.equal(miss_ext.shard_fold(x, 9, 0.5, seed), x * mult)  # scale 2: exact


# ---------------------------------------------------------------------------------------
# N = 0 rows; leading dims of any rank; non-contiguous x


@P_VALUES
def test_zero_rows(dtype, p):
    for lead in [(0,), (0, 3), (2, 0, 3)]:
        check_shard_layer(ShardCase(lead, 10, 12, 4, 12), dtype=dtype, p=p)
        check_shard_layer(ShardCase(lead, 10, 12, 4, 3), dtype=dtype, p=p)
    check_bat_layer(BatCase((0,), 8, 12, 4), dtype=dtype)


def test_zero_rows_block_gradient_is_zero():
    """No rows, no signal: the block's gradient is an all-zero [r, m] tensor, not garbage."""
    layer = make_shard_layer(ShardCase((0,), 10, 12, 4, 3))
    block = leaf(layer.block)
    y = miss_ext.shard_linear(layer.x, layer.weight, layer.bias, block, 0.3, seed_tensor(1))
    assert y.shape == (0, 12)
    (grad_block,) = torch.autograd.grad(y, block, torch.empty_like(y))
    assert grad_block.shape == block.shape and torch.equal(grad_block, torch.zeros_like(grad_block))
    bat = leaf(bat_block(12, 4))
    y = miss_ext.bat_linear(torch.empty(0, 8), rand((12, 8)), None, bat)
    (grad_bat,) = torch.autograd.grad(y, bat, torch.empty_like(y))
    assert torch.equal(grad_bat, torch.zeros_like(grad_bat))


@pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 2, 3)], ids=["1d", "2d", "3d", "4d"])
def test_leading_dims_of_any_rank(lead, dtype):
    check_shard_layer(ShardCase(lead, 10, 12, 4, 12), dtype=dtype, p=0.3)
    check_shard_layer(ShardCase(lead, 10, 12, 4, 3), dtype=dtype)
    check_bat_layer(BatCase(lead, 8, 12, 4), dtype=dtype)


def test_leading_dims_of_any_rank_output_shapes():
    for lead in [(), (5,), (2, 3), (2, 2, 3), (1, 1, 1, 2)]:
        x = rand((*lead, 10))
        assert miss_ext.shard_linear(x, rand((12, 10)), None, rand((4, 6))).shape == (*lead, 12)
        assert miss_ext.shard_fold(x, 4).shape == (math.prod(lead), 4)
        assert miss_ext.bat_linear(rand((*lead, 8)), rand((12, 8)), None, bat_block(12, 4)).shape == (*lead, 12)


@pytest.mark.parametrize("layout,lead", [("transposed", (7,)), ("transposed3d", (3, 4))],
                         ids=["2d_t", "3d_transpose01"])
def test_non_contiguous_x_transposed(layout, lead, dtype):
    check_shard_layer(ShardCase(lead, 10, 12, 4, 12, layout), dtype=dtype, p=0.3)
    check_shard_layer(ShardCase(lead, 10, 12, 4, 3, layout), dtype=dtype)
    check_bat_layer(BatCase(lead, 8, 12, 4, layout), dtype=dtype)


@pytest.mark.parametrize("layout,lead", [("step2", (5,)), ("step2", (2, 3)), ("col_offset", (5,)),
                                         ("col_offset", (2, 3)), ("row_offset", (5,))],
                         ids=["every_2nd_col", "every_2nd_col_3d", "cols_1:", "cols_1:_3d", "rows_1:"])
def test_non_contiguous_x_sliced(layout, lead, dtype):
    check_shard_layer(ShardCase(lead, 10, 12, 4, 12, layout), dtype=dtype, p=0.3)
    check_shard_layer(ShardCase(lead, 10, 12, 3, 4, layout), dtype=dtype)
    check_bat_layer(BatCase(lead, 8, 12, 4, layout), dtype=dtype)


def test_non_contiguous_x_gives_the_result_of_its_contiguous_copy():
    for layout, lead in [("transposed", (7,)), ("transposed3d", (3, 4)), ("step2", (2, 3)), ("col_offset", (5,))]:
        layer = make_shard_layer(ShardCase(lead, 10, 12, 4, 3, layout))
        seed = seed_tensor(3)
        a = miss_ext.shard_fold(layer.x, 4, 0.3, seed)
        b = miss_ext.shard_fold(layer.x.contiguous(), 4, 0.3, seed)
        assert torch.equal(a, b), layout
        ya = miss_ext.shard_linear(layer.x, layer.weight, layer.bias, layer.block, 0.3, seed)
        yb = miss_ext.shard_linear(layer.x.contiguous(), layer.weight, layer.bias, layer.block, 0.3, seed)
        torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# mini_r = 1, mini_r = out


@P_VALUES
def test_mini_r_equals_1(dtype, p):
    check_shard_layer(ShardCase((6,), 10, 12, 4, 1), dtype=dtype, p=p)


@P_VALUES
def test_mini_r_equals_out_is_standard(dtype, p):
    """mini_r == out is the standard variant; any mini block gives what its B.repeat(1, out //
    mini_r) standard block gives (PEFT's B_full)."""
    check_shard_layer(ShardCase((6,), 10, 12, 4, 12), dtype=dtype, p=p)
    seed = seed_tensor(7) if p else None
    for mini_r in (1, 3, 6, 12):
        layer = make_shard_layer(ShardCase((6,), 10, 12, 4, mini_r), dtype=dtype)
        full = layer.block.repeat(1, 12 // mini_r)
        y_mini = miss_ext.shard_linear(layer.x, layer.weight, layer.bias, layer.block, p, seed)
        y_full = miss_ext.shard_linear(layer.x, layer.weight, layer.bias, full, p, seed)
        oracle, same = oracle_and_same(lambda *a: reference.shard_linear(*a, p, seed),
                                       layer.x, layer.weight, layer.bias, layer.block)
        assert_close_to_oracle(y_mini, oracle, same, what=f"mini_r={mini_r}")
        assert_close_to_oracle(y_full, oracle, same, what=f"repeated to out, mini_r={mini_r}")
        if mini_r == 12:
            assert torch.equal(y_mini, y_full)


# ---------------------------------------------------------------------------------------
# merge then unmerge returns W; merged forward equals unmerged forward


@pytest.mark.parametrize("block_shape", [(4, 12), (4, 3)], ids=["standard", "mini"])
def test_merge_then_unmerge_returns_weight(block_shape, dtype):
    """fp32: ~1e-6 relative; bf16/fp16: within one ulp (standard/mini). The bat bound is in
    test_merge.py::test_bat_merge_unmerge_round_trip."""
    w = rand_away_from_zero((12, 10), dtype=dtype, gen=generator(8))
    block = rand(block_shape, gen=generator(9), scale=0.03)
    original = w.clone()
    miss_ext.merge_(w, block)
    miss_ext.unmerge_(w, block)
    err = (w.double() - original.double()).abs()
    if dtype == torch.float32:
        assert torch.all(err <= 1e-6 * original.double().abs())
    else:
        mag = original.double().abs()
        one_ulp = torch.exp2(torch.floor(torch.log2(mag))) * torch.finfo(dtype).eps
        assert torch.all(err <= one_ulp)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_merged_forward_equals_unmerged_forward(variant, dtype):
    gen = generator(10)
    x = rand((2, 3, 8), dtype=dtype, gen=gen)
    w = rand((12, 8), dtype=dtype, gen=gen, scale=0.35)
    b = rand((12,), dtype=dtype, gen=gen)
    if variant == "bat":
        block, layer_fn, ref_fn = bat_block(12, 4, gen=gen), miss_ext.bat_linear, reference.bat_linear
    else:
        block = rand((3, 12 if variant == "standard" else 4), gen=gen, scale=0.3)
        layer_fn, ref_fn = miss_ext.shard_linear, reference.shard_linear
    block = block.to(dtype)
    merged_w = w.clone()
    miss_ext.merge_(merged_w, block)
    oracle = ref_fn(x.double(), w.double(), b.double(), block.double())
    # The merged forward rounds W + dW to W's dtype once more; its same-precision reference
    # (F.linear with the reference's merged weight rounded to W's dtype) carries that too.
    same_merged = F.linear(x, reference.merged(w, block).to(dtype), b)
    assert_close_to_oracle(F.linear(x, merged_w, b), oracle, same_merged, dtype=dtype, what="merged")
    assert_close_to_oracle(layer_fn(x, w, b, block), oracle, ref_fn(x, w, b, block), dtype=dtype, what="unmerged")


# ---------------------------------------------------------------------------------------
# The oracle itself must handle the edge cases it is used for.


def test_reference_fold_of_zero_rows():
    """The oracle itself handles N = 0 rows: an empty [0, r] fold."""
    x = torch.empty(0, 10, dtype=torch.float64)
    fold = reference.shard_fold(x, 4)
    assert fold.shape == (0, 4)
