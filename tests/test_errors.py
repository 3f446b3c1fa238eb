"""SPEC sec. 6 at op level: every bad input raises a clear error naming the argument, and a
failing merge_/unmerge_ leaves the weight bit-identical.

The second device is 'meta' (present on every machine): a kernel must refuse tensors that
live on different devices rather than compute on some of them.
"""

import math

import pytest
import torch

import miss_ext

from conftest import bat_block, generator, rand, seed_tensor

ERRORS = (RuntimeError, ValueError, TypeError)
N, IN, OUT, R, MINI = 5, 10, 12, 4, 3


def _names(*words):
    """A regex that needs every word (in any order): the message must name all of them."""
    return "(?s)" + "".join(f"(?=.*{w})" for w in words)


@pytest.fixture
def t():
    """Fresh valid inputs of one layer: x [N, IN], weight [OUT, IN], ..."""
    gen = generator(0)

    class Inputs:
        x = rand((N, IN), gen=gen)
        x3 = rand((2, 3, IN), gen=gen)
        weight = rand((OUT, IN), gen=gen)
        bias = rand((OUT,), gen=gen)
        block = rand((R, OUT), gen=gen)
        mini = rand((R, MINI), gen=gen)
        y = rand((N, OUT), gen=gen)
        grad_out = rand((N, OUT), gen=gen)
        fold = rand((N, R), gen=gen)
        g = rand((N, R), gen=gen)
        bat_weight = rand((OUT, 8), gen=gen)
        bat_x = rand((N, 8), gen=gen)
        bat = bat_block(OUT, R, gen=gen)
        seed = seed_tensor(7)

    return Inputs


def raises(fn, *words):
    with pytest.raises(ERRORS, match=_names(*words)):
        fn()


# ---------------------------------------------------------------------------------------
# r <= 0, r > in_features


@pytest.mark.parametrize("r", [0, -1])
def test_r_not_positive(t, r):
    raises(lambda: miss_ext.shard_fold(t.x, r), "'r'", "got " + str(r))
    raises(lambda: miss_ext.bat_block_grad(t.bat_weight, t.bat_weight, r), "'r'")


def test_block_with_zero_rows_is_r_not_positive(t):
    empty = torch.empty(0, OUT)
    raises(lambda: miss_ext.shard_linear(t.x, t.weight, t.bias, empty), "block", "r")
    raises(lambda: miss_ext.shard_delta_add(t.y, t.x, empty), "block", "r")
    raises(lambda: miss_ext.merge_(t.weight.clone(), empty), "block", "r")
    raises(lambda: miss_ext.shard_tile_add(t.x, torch.empty(N, 0)), "'g", "r")
    raises(lambda: miss_ext.bat_linear(t.bat_x, t.bat_weight, None, torch.empty(0, 0, 0)), "block")


def test_r_greater_than_in_features(t):
    raises(lambda: miss_ext.shard_fold(t.x, IN + 1), "'r'", "in_features=10", "got 11")
    big = rand((IN + 1, OUT))
    raises(lambda: miss_ext.shard_linear(t.x, t.weight, t.bias, big), "block", "in_features=10", "11")
    raises(lambda: miss_ext.shard_delta_add(t.y, t.x, big), "block", "in_features=10", "11")
    raises(lambda: miss_ext.shard_tile_add(t.x, rand((N, IN + 1))), "'g", "in_features=10", "11")
    raises(lambda: torch.ops.miss.shard_linear_backward(t.grad_out, rand((N, IN + 1)), t.weight, big, IN, 0.0,
                                                        None, None, [True, True]), "block", "in_features=10")
    raises(lambda: miss_ext.merge_(t.weight.clone(), big), "block", "in_features=10", "11")


# ---------------------------------------------------------------------------------------
# mini: the second dim of the block must divide out; mini_r <= 0


@pytest.mark.parametrize("mini_r", [5, 0, 13], ids=["5_does_not_divide_12", "mini_r=0", "13>out"])
def test_mini_block_second_dim_must_divide_out(t, mini_r):
    bad = torch.randn(R, mini_r) + 2.0
    raises(lambda: miss_ext.shard_linear(t.x, t.weight, t.bias, bad), "block", "out_features=12")
    raises(lambda: miss_ext.shard_delta_add(t.y, t.x, bad), "block", "out_features=12")
    raises(lambda: torch.ops.miss.shard_linear_backward(t.grad_out, t.fold, t.weight, bad, IN, 0.0, None, None,
                                                        [True, True]), "block", "out_features=12")
    raises(lambda: miss_ext.merge_(t.weight.clone(), bad), "block", "out_features=12")
    raises(lambda: miss_ext.unmerge_(t.weight.clone(), bad), "block", "out_features=12")


# ---------------------------------------------------------------------------------------
# bat: r must divide in and out


def test_bat_r_must_divide_in_features(t):
    weight = rand((OUT, 10))  # 10 % 4 != 0
    raises(lambda: miss_ext.bat_weight(weight, t.bat), "r \\(4\\)", "in_features \\(10\\)")
    raises(lambda: miss_ext.bat_linear(t.x, weight, None, t.bat), "r \\(4\\)", "in_features \\(10\\)")
    raises(lambda: miss_ext.bat_weight_grad(weight, t.bat), "r \\(4\\)", "in_features \\(10\\)")
    raises(lambda: torch.ops.miss.bat_linear_backward(t.grad_out, t.x, weight, t.bat, [True, True, True]),
           "r \\(4\\)", "in_features \\(10\\)")
    raises(lambda: miss_ext.bat_block_grad(weight, weight, 4), "'r' \\(4\\)", "in_features \\(10\\)")
    raises(lambda: miss_ext.merge_(weight.clone(), t.bat), "r \\(4\\)", "in_features \\(10\\)")
    raises(lambda: miss_ext.unmerge_(weight.clone(), t.bat), "r \\(4\\)", "in_features \\(10\\)")


def test_bat_r_must_divide_out_features(t):
    weight = rand((10, 8))  # 10 % 4 != 0
    block = bat_block(8, 4)  # [2, 4, 4]
    raises(lambda: miss_ext.bat_weight(weight, block), "r \\(4\\)", "out_features \\(10\\)")
    raises(lambda: miss_ext.bat_linear(t.bat_x, weight, None, block), "r \\(4\\)", "out_features \\(10\\)")
    raises(lambda: miss_ext.bat_block_grad(weight, weight, 4), "'r' \\(4\\)", "out_features \\(10\\)")
    raises(lambda: miss_ext.merge_(weight.clone(), block), "r \\(4\\)", "out_features \\(10\\)")


# ---------------------------------------------------------------------------------------
# block of the wrong shape or rank


@pytest.mark.parametrize("shape", [(R,), (R, OUT, 1), ()], ids=["1d", "3d", "0d"])
def test_shard_block_of_wrong_rank(t, shape):
    bad = torch.randn(shape) + 2.0
    raises(lambda: miss_ext.shard_linear(t.x, t.weight, t.bias, bad), "'block'", "2-D")
    raises(lambda: miss_ext.shard_delta_add(t.y, t.x, bad), "'block'", "2-D")
    raises(lambda: torch.ops.miss.shard_linear_backward(t.grad_out, t.fold, t.weight, bad, IN, 0.0, None, None,
                                                        [True, True]), "'block'", "2-D")


@pytest.mark.parametrize("shape", [(OUT, 8), (3, 4, 2), (2, 4, 4), (4, 4, 4), (3, 4, 4, 1)],
                         ids=["2d", "not_square", "too_few_tiles", "too_many_tiles", "4d"])
def test_bat_block_of_wrong_shape(t, shape):
    bad = torch.randn(shape) * 0.1
    raises(lambda: miss_ext.bat_weight(t.bat_weight, bad), "'block'")
    raises(lambda: miss_ext.bat_linear(t.bat_x, t.bat_weight, None, bad), "'block'")
    raises(lambda: miss_ext.bat_weight_grad(t.bat_weight, bad), "'block'")
    raises(lambda: torch.ops.miss.bat_linear_backward(t.grad_out, t.bat_x, t.bat_weight, bad, [True, True, True]),
           "'block'")


@pytest.mark.parametrize("shape", [(R,), (1, R, R, R), (OUT,)], ids=["1d", "4d", "1d_out"])
def test_merge_block_of_wrong_rank(t, shape):
    bad = torch.randn(shape) + 2.0
    raises(lambda: miss_ext.merge_(t.weight.clone(), bad), "'block'", "2-D", "3-D")
    raises(lambda: miss_ext.unmerge_(t.weight.clone(), bad), "'block'", "2-D", "3-D")


def test_bat_block_rows_must_be_out_over_r(t):
    bad = bat_block(8, R)  # [2, 4, 4] for a weight with out = 12: needs [3, 4, 4]
    raises(lambda: miss_ext.bat_weight(t.bat_weight, bad), "'block'", "size 3", "out_features / r")
    raises(lambda: miss_ext.merge_(t.bat_weight.clone(), bad), "'block'", "size 3", "out_features / r")


# ---------------------------------------------------------------------------------------
# x whose last dim != in, other mismatched shapes


@pytest.mark.parametrize("in_x", [IN - 1, IN + 1])
def test_x_last_dim_must_be_in_features(t, in_x):
    x = rand((N, in_x))
    raises(lambda: miss_ext.shard_linear(x, t.weight, t.bias, t.block), "'x'", f"size {IN}", "in_features")
    raises(lambda: miss_ext.shard_linear(x, t.weight, t.bias, t.mini), "'x'", f"size {IN}", "in_features")
    bx = rand((N, 8 + in_x - IN))
    raises(lambda: miss_ext.bat_linear(bx, t.bat_weight, None, t.bat), "'x'", "size 8", "in_features")
    raises(lambda: torch.ops.miss.bat_linear_backward(t.grad_out, bx, t.bat_weight, t.bat, [True, True, True]),
           "'x'", "size 8", "in_features")


def test_shard_delta_add_y_must_have_the_leading_dims_of_x(t):
    raises(lambda: miss_ext.shard_delta_add(rand((N + 1, OUT)), t.x, t.block), "'y'", "leading dims")
    raises(lambda: miss_ext.shard_delta_add(rand((1, N, OUT)), t.x, t.block), "'y'", "leading dims")


def test_shard_delta_add_block_must_match_y_out(t):
    raises(lambda: miss_ext.shard_delta_add(rand((N, OUT + 1)), t.x, t.block), "'block'", "out_features=13")


def test_shard_tile_add_g_must_have_the_rows_of_grad_x(t):
    raises(lambda: miss_ext.shard_tile_add(t.x, rand((N + 1, R))), "'g'", "rows of grad_x")
    raises(lambda: miss_ext.shard_tile_add(t.x, rand((N, R, 1))), "'g'", "2-D")


def test_bias_of_wrong_shape_or_dtype(t):
    raises(lambda: miss_ext.shard_linear(t.x, t.weight, rand((OUT + 1,)), t.block), "'bias'", "out_features")
    raises(lambda: miss_ext.shard_linear(t.x, t.weight, rand((1, OUT)), t.block), "'bias'", "1-D")
    raises(lambda: miss_ext.shard_linear(t.x, t.weight, t.bias.half(), t.block), "'bias'", "dtype")
    raises(lambda: miss_ext.bat_linear(t.bat_x, t.bat_weight, rand((OUT - 1,)), t.bat), "'bias'", "out_features")


def test_weight_dtype_must_match_x(t):
    raises(lambda: miss_ext.shard_linear(t.x, t.weight.bfloat16(), t.bias, t.block), "'weight'", "dtype")
    raises(lambda: miss_ext.bat_linear(t.bat_x, t.bat_weight.half(), None, t.bat), "'x'", "dtype")


def test_shard_linear_backward_shapes_are_checked(t):
    def bwd(grad_out=t.grad_out, fold=t.fold, weight=t.weight, block=t.block, in_features=IN, grad_fold=None):
        return torch.ops.miss.shard_linear_backward(grad_out, fold, weight, block, in_features, 0.0, None,
                                                    grad_fold, [True, True])

    raises(lambda: bwd(fold=rand((N + 1, R))), "'fold'", "rows of grad_out")
    raises(lambda: bwd(fold=rand((N, R + 1))), "'fold'", "r of block")
    raises(lambda: bwd(weight=rand((OUT, IN + 1))), "'weight'", "in_features")
    raises(lambda: bwd(weight=rand((OUT + 1, IN))), "'weight'", "out_features")
    raises(lambda: bwd(grad_fold=rand((N, R + 1))), "'grad_fold'", "shape")


def test_bat_linear_backward_grad_out_shape_is_checked(t):
    raises(lambda: torch.ops.miss.bat_linear_backward(rand((N, OUT + 4)), t.bat_x, t.bat_weight, t.bat,
                                                      [True, True, True]), "'grad_out'")
    raises(lambda: torch.ops.miss.bat_linear_backward(rand((N + 1, OUT)), t.bat_x, t.bat_weight, t.bat,
                                                      [True, True, True]), "'grad_out'")


def test_bat_block_grad_shapes_are_checked(t):
    raises(lambda: miss_ext.bat_block_grad(rand((OUT, 4)), t.bat_weight, R), "'grad_weight'", "shape")


# ---------------------------------------------------------------------------------------
# unsupported dtypes


@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.int32, torch.bool, torch.complex64],
                         ids=["int64", "int32", "bool", "complex64"])
def test_x_of_unsupported_dtype(t, bad_dtype):
    x = t.x.to(bad_dtype)
    raises(lambda: miss_ext.shard_fold(x, R), "'x'", "dtype")
    raises(lambda: miss_ext.shard_linear(x, t.weight, t.bias, t.block), "'x'", "dtype")
    raises(lambda: miss_ext.shard_delta_add(t.y, x, t.block), "'x'", "dtype")
    raises(lambda: miss_ext.bat_linear(t.bat_x.to(bad_dtype), t.bat_weight, None, t.bat), "'x'", "dtype")


@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.complex64], ids=["int64", "complex64"])
def test_gradient_of_unsupported_dtype_is_named(t, bad_dtype):
    """The message names the op's own argument (grad_x, grad_out), not a generic 'x'."""
    raises(lambda: miss_ext.shard_tile_add(t.x.to(bad_dtype), t.g), "'grad_x'", "dtype")
    raises(lambda: torch.ops.miss.shard_linear_backward(t.grad_out.to(bad_dtype), t.fold, t.weight, t.block, IN,
                                                        0.0, None, None, [True, True]), "'grad_out'", "dtype")


@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_block_of_integer_dtype(t, bad_dtype):
    block = (t.block * 10).to(bad_dtype) + 1
    mini = (t.mini * 10).to(bad_dtype) + 1
    bat = torch.ones(3, R, R, dtype=bad_dtype)
    raises(lambda: miss_ext.shard_linear(t.x, t.weight, t.bias, block), "'block'", "dtype")
    raises(lambda: miss_ext.shard_linear(t.x, t.weight, t.bias, mini), "'block'", "dtype")
    raises(lambda: miss_ext.shard_delta_add(t.y, t.x, block), "'block'", "dtype")
    raises(lambda: miss_ext.bat_linear(t.bat_x, t.bat_weight, None, bat), "'block'", "dtype")
    raises(lambda: miss_ext.bat_weight(t.bat_weight, bat), "'block'", "dtype")
    raises(lambda: miss_ext.merge_(t.weight.clone(), block), "'block'", "dtype")
    raises(lambda: miss_ext.shard_tile_add(t.x, t.g.to(bad_dtype)), "'g'", "dtype")


def test_other_tensors_of_integer_dtype(t):
    raises(lambda: miss_ext.shard_linear(t.x, t.weight.long(), t.bias, t.block), "'weight'", "dtype")
    raises(lambda: miss_ext.shard_delta_add(t.y.long(), t.x, t.block), "'y'", "dtype")
    raises(lambda: miss_ext.merge_(t.weight.long(), t.block), "'weight'", "dtype")
    raises(lambda: miss_ext.bat_weight(t.bat_weight.long(), t.bat), "'weight'", "dtype")
    raises(lambda: miss_ext.bat_block_grad(t.bat_weight.long(), t.bat_weight, R), "'grad_weight'", "dtype")


# ---------------------------------------------------------------------------------------
# tensors on different devices


def _meta(tensor):
    return tensor.to("meta")


def _device_cases():
    """(id, call(t), words): one tensor moved to 'meta' while the others stay on the CPU."""
    def bwd(t, **kw):
        a = dict(grad_out=t.grad_out, fold=t.fold, weight=t.weight, block=t.block)
        a.update(kw)
        return torch.ops.miss.shard_linear_backward(a["grad_out"], a["fold"], a["weight"], a["block"], IN, 0.0,
                                                    None, None, [True, True])

    return [
        ("shard_linear-weight", lambda t: miss_ext.shard_linear(t.x, _meta(t.weight), t.bias, t.block),
         ("'weight'", "device")),
        ("shard_linear-bias", lambda t: miss_ext.shard_linear(t.x, t.weight, _meta(t.bias), t.block),
         ("'bias'", "device")),
        ("shard_linear-block", lambda t: miss_ext.shard_linear(t.x, t.weight, t.bias, _meta(t.block)),
         ("'block'", "device")),
        ("shard_linear-x", lambda t: miss_ext.shard_linear(_meta(t.x), t.weight, t.bias, t.block), ("device",)),
        ("shard_linear-seed", lambda t: miss_ext.shard_linear(t.x, t.weight, t.bias, t.block, 0.5, _meta(t.seed)),
         ("'seed'",)),
        ("shard_fold-seed", lambda t: miss_ext.shard_fold(t.x, R, 0.5, _meta(t.seed)), ("'seed'",)),
        ("shard_delta_add-y", lambda t: miss_ext.shard_delta_add(_meta(t.y), t.x, t.block), ("'y'", "device")),
        ("shard_delta_add-block", lambda t: miss_ext.shard_delta_add(t.y, t.x, _meta(t.block)),
         ("'block'", "device")),
        ("shard_tile_add-g", lambda t: miss_ext.shard_tile_add(t.x, _meta(t.g)), ("'g'", "device")),
        ("shard_linear_backward-fold", lambda t: bwd(t, fold=_meta(t.fold)), ("'fold'", "device")),
        ("shard_linear_backward-weight", lambda t: bwd(t, weight=_meta(t.weight)), ("'weight'", "device")),
        ("shard_linear_backward-block", lambda t: bwd(t, block=_meta(t.block)), ("'block'", "device")),
        ("bat_weight-block", lambda t: miss_ext.bat_weight(t.bat_weight, _meta(t.bat)), ("'block'", "device")),
        ("bat_linear-x", lambda t: miss_ext.bat_linear(_meta(t.bat_x), t.bat_weight, None, t.bat),
         ("'x'", "device")),
        ("bat_linear-block", lambda t: miss_ext.bat_linear(t.bat_x, t.bat_weight, None, _meta(t.bat)),
         ("'block'", "device")),
        ("bat_block_grad-grad_weight", lambda t: miss_ext.bat_block_grad(_meta(t.bat_weight), t.bat_weight, R),
         ("'grad_weight'", "device")),
        ("bat_weight_grad-block", lambda t: miss_ext.bat_weight_grad(t.bat_weight, _meta(t.bat)),
         ("'block'", "device")),
        ("bat_linear_backward-x", lambda t: torch.ops.miss.bat_linear_backward(
            t.grad_out, _meta(t.bat_x), t.bat_weight, t.bat, [True, True, True]), ("'x'", "device")),
    ]


@pytest.mark.parametrize("call,words", [c[1:] for c in _device_cases()], ids=[c[0] for c in _device_cases()])
def test_tensors_on_different_devices(t, call, words):
    raises(lambda: call(t), *words)


@pytest.mark.parametrize("variant", ["standard", "bat"])
@pytest.mark.parametrize("op", ["merge_", "unmerge_"])
def test_merge_with_block_on_another_device_keeps_weight(t, op, variant):
    block = t.block if variant == "standard" else t.bat
    weight = (t.weight if variant == "standard" else t.bat_weight).clone()
    before = weight.clone()
    raises(lambda: getattr(miss_ext, op)(weight, _meta(block)), "'block'", "device")
    assert torch.equal(weight, before)


# ---------------------------------------------------------------------------------------
# dropout arguments


@pytest.mark.parametrize("p", [-0.1, 1.5, math.nan, math.inf], ids=["-0.1", "1.5", "nan", "inf"])
def test_p_outside_zero_one(t, p):
    s = t.seed
    raises(lambda: miss_ext.shard_fold(t.x, R, p, s), "'p'", "\\[0, 1\\]")
    raises(lambda: miss_ext.shard_tile_add(t.x, t.g, p, s), "'p'", "\\[0, 1\\]")
    raises(lambda: miss_ext.shard_linear(t.x, t.weight, t.bias, t.block, p, s), "'p'", "\\[0, 1\\]")
    raises(lambda: miss_ext.shard_delta_add(t.y, t.x, t.block, p, s), "'p'", "\\[0, 1\\]")
    raises(lambda: torch.ops.miss.shard_linear_backward(t.grad_out, t.fold, t.weight, t.block, IN, p, s, None,
                                                        [True, True]), "'p'", "\\[0, 1\\]")


@pytest.mark.parametrize("p", [0.3, 1.0])
def test_p_positive_without_seed(t, p):
    raises(lambda: miss_ext.shard_fold(t.x, R, p, None), "'seed'", "p > 0")
    raises(lambda: miss_ext.shard_tile_add(t.x, t.g, p, None), "'seed'", "p > 0")
    raises(lambda: miss_ext.shard_linear(t.x, t.weight, t.bias, t.block, p, None), "'seed'", "p > 0")
    raises(lambda: miss_ext.shard_delta_add(t.y, t.x, t.block, p, None), "'seed'", "p > 0")
    raises(lambda: torch.ops.miss.shard_linear_backward(t.grad_out, t.fold, t.weight, t.block, IN, p, None, None,
                                                        [True, True]), "'seed'", "p > 0")


@pytest.mark.parametrize(
    "seed",
    [torch.tensor([7], dtype=torch.int32), torch.tensor([7.0]), torch.tensor([7, 8]),
     torch.empty(0, dtype=torch.int64), torch.tensor([[7, 8]])],
    ids=["int32", "float", "two_elements", "empty", "2d"],
)
def test_seed_of_wrong_dtype_or_shape(t, seed):
    raises(lambda: miss_ext.shard_fold(t.x, R, 0.3, seed), "'seed'", "int64")
    raises(lambda: miss_ext.shard_linear(t.x, t.weight, t.bias, t.block, 0.3, seed), "'seed'", "int64")
    raises(lambda: miss_ext.shard_delta_add(t.y, t.x, t.block, 0.3, seed), "'seed'", "int64")
    raises(lambda: miss_ext.shard_tile_add(t.x, t.g, 0.3, seed), "'seed'", "int64")


# ---------------------------------------------------------------------------------------
# failing merge_/unmerge_ leave the weight bit-identical


def _bad_merges():
    """(id, weight shape, bad block, expected words): every refused merge."""
    return [
        ("r=0", (OUT, IN), torch.empty(0, OUT), ("block", "r")),
        ("r>in", (OUT, IN), torch.ones(IN + 1, OUT), ("block", "in_features")),
        ("mini_not_dividing", (OUT, IN), torch.ones(R, 5), ("block", "out_features")),
        ("mini_r=0", (OUT, IN), torch.ones(R, 0), ("block", "out_features")),
        ("block_1d", (OUT, IN), torch.ones(R), ("block",)),
        ("integer_block", (OUT, IN), torch.ones(R, OUT, dtype=torch.int64), ("block", "dtype")),
        ("complex_block", (OUT, IN), torch.ones(R, OUT, dtype=torch.complex64), ("block", "dtype")),
        ("bat_r_not_dividing_in", (OUT, IN), torch.full((3, 4, 4), 0.1), ("r \\(4\\)", "in_features")),
        ("bat_wrong_tiles", (OUT, 8), torch.full((2, 4, 4), 0.1), ("block", "out_features / r")),
        ("bat_not_square", (OUT, 8), torch.full((3, 4, 2), 0.1), ("block",)),
    ]


@pytest.mark.parametrize("op", ["merge_", "unmerge_"])
@pytest.mark.parametrize("case", _bad_merges(), ids=[c[0] for c in _bad_merges()])
def test_failing_merge_leaves_weight_unchanged(op, case):
    _, weight_shape, block, words = case
    weight = rand(weight_shape, gen=generator(3))
    before = weight.clone()
    raises(lambda: getattr(miss_ext, op)(weight, block), *words)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("op", ["merge_", "unmerge_"])
def test_merge_into_non_contiguous_weight_is_refused(op):
    base = rand((IN, OUT), gen=generator(4))
    weight = base.t()
    before = weight.clone()
    raises(lambda: getattr(miss_ext, op)(weight, rand((R, OUT))), "'weight'", "contiguous")
    assert torch.equal(weight, before)


@pytest.mark.parametrize("op", ["merge_", "unmerge_"])
def test_merge_into_integer_weight_is_refused(op):
    weight = torch.arange(OUT * IN).reshape(OUT, IN)
    before = weight.clone()
    raises(lambda: getattr(miss_ext, op)(weight, rand((R, OUT))), "'weight'", "dtype")
    assert torch.equal(weight, before)


def test_x_of_rank_zero(t):
    x = torch.tensor(1.5)
    raises(lambda: miss_ext.shard_fold(x, 1), "'x'", "at least 1")
    raises(lambda: miss_ext.shard_linear(x, t.weight, t.bias, t.block), "'x'")
    raises(lambda: miss_ext.bat_linear(x, t.bat_weight, None, t.bat), "'x'")
