"""The shard ops on many rows, where the CPU kernels' float32 temporaries are built in chunks
and rows are split over threads, and on the weight path (dx from the adapted weight, taken
past WEIGHT_PATH_ROWS rows): against the float64 oracle, gradcheck, and the same bits
whatever the number of threads.
"""


import pytest
import torch

import miss_ext
from miss_ext import reference

from conftest import (
    assert_close_to_oracle,
    bat_block,
    dtype_id,
    generator,
    grads_oracle_and_same,
    oracle_and_same,
    rand,
    ref_shard_linear_outputs,
    seed_tensor,
)


# ---------------------------------------------------------------------------------------
# Many rows: the float32 temporaries are built in chunks of 2^20 / width rows and rows are
# split across threads; results must not depend on where the cuts fall.


@pytest.mark.parametrize("dtype_", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("m", [16, 8], ids=["standard", "mini"])
def test_many_rows_cross_chunk_and_thread_boundaries(m, dtype_):
    out, in_features, r = 16, 8, 3
    rows = (1 << 20) // m + 5  # two chunks of the out-tiled add (and of the bf16 backward)
    gen = generator(61)
    x = rand((rows, in_features), dtype=dtype_, gen=gen)
    weight = rand((out, in_features), dtype=dtype_, gen=gen, scale=0.35)
    bias = rand((out,), dtype=dtype_, gen=gen)
    block = rand((r, m), gen=gen, scale=0.5)
    seed = seed_tensor(62)
    y, fold = torch.ops.miss.shard_linear(x, weight, bias, block, 0.3, seed)
    (oy, ofold), (sy, sfold) = oracle_and_same(
        lambda *a: ref_shard_linear_outputs(*a, 0.3, seed), x, weight, bias, block)
    assert_close_to_oracle(y, oy, sy, dtype=dtype_, what="y")
    assert_close_to_oracle(fold, ofold, sfold, what="fold")
    grad_out = rand((rows, out), dtype=dtype_, gen=gen)
    grad_x, grad_block = torch.ops.miss.shard_linear_backward(
        grad_out, fold, weight, block, in_features, 0.3, seed, None, [True, True])
    (ox, oblock), (sx, sblock) = grads_oracle_and_same(
        lambda *a: reference.shard_linear(*a, 0.3, seed), [x, weight, bias, block], [grad_out], [0, 3])
    assert_close_to_oracle(grad_x, ox, sx, dtype=dtype_, what="grad_x")
    assert_close_to_oracle(grad_block, oblock, sblock, what="grad_block")


# float32/float64 layers without dropout take the weight path from rows * r >= 19 * in on
# (csrc/ops/shard_ops.cpp: y = x (W + dW)^T, dx = dy (W + dW)): same rule, same oracle.
WEIGHT_PATH_ROWS = 300


@pytest.mark.parametrize("dtype_", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("m", [40, 8], ids=["standard", "mini"])
def test_weight_path_matches_oracle(m, dtype_):
    out, in_features, r = 40, 37, 6
    gen = generator(71)
    x = rand((3, WEIGHT_PATH_ROWS // 3, in_features), dtype=dtype_, gen=gen)
    weight = rand((out, in_features), dtype=dtype_, gen=gen, scale=0.3)
    bias = rand((out,), dtype=dtype_, gen=gen)
    block = rand((r, m), dtype=torch.float32, gen=gen, scale=0.5)
    y, fold = torch.ops.miss.shard_linear(x, weight, bias, block, 0.0, None)
    (oy, ofold), (sy, sfold) = oracle_and_same(lambda *a: ref_shard_linear_outputs(*a), x, weight, bias, block)
    assert_close_to_oracle(y, oy, sy, dtype=dtype_, what="y")
    grad_out = rand(y.shape, dtype=dtype_, gen=gen)
    grad_fold = rand(fold.shape, dtype=fold.dtype, gen=gen)
    for gf in (None, grad_fold):
        grad_x, grad_block = torch.ops.miss.shard_linear_backward(
            grad_out, fold, weight, block, in_features, 0.0, None, gf, [True, True])
        grads = [grad_out] if gf is None else [grad_out, gf]
        (ox, oblock), (sx, sblock) = grads_oracle_and_same(
            lambda *a: ref_shard_linear_outputs(*a), [x, weight, bias, block], grads, [0, 3])
        assert_close_to_oracle(grad_x, ox, sx, dtype=dtype_, what=f"grad_x (grad_fold {gf is not None})")
        assert_close_to_oracle(grad_block, oblock, sblock, what="grad_block")


def test_weight_path_gradcheck():
    gen = generator(72)
    x = rand((WEIGHT_PATH_ROWS, 5), dtype=torch.float64, gen=gen).requires_grad_()
    weight = rand((6, 5), dtype=torch.float64, gen=gen)
    block = rand((2, 3), dtype=torch.float64, gen=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: torch.ops.miss.shard_linear(x, weight, None, b, 0.0, None),
                                    (x, block))


def test_kernels_do_not_depend_on_the_number_of_threads():
    gen = generator(63)
    x = rand((4099, 40), gen=gen)
    g = rand((4099, 7), gen=gen)
    w = rand((48, 40), gen=gen)
    grad_w = rand((48, 40), gen=gen)
    block = bat_block(48, 4, gen=gen)
    seed = seed_tensor(64)

    def run():
        merged = w.clone()
        miss_ext.merge_(merged, block)
        return (miss_ext.shard_fold(x, 7, 0.3, seed), miss_ext.shard_tile_add(x, g, 0.3, seed),
                miss_ext.bat_weight(w, block), miss_ext.bat_block_grad(grad_w, w, 4),
                miss_ext.bat_weight_grad(grad_w, block), merged)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, run()):
        assert torch.equal(a, b)
