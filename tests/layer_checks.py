"""Whole-layer checks: forward and autograd of every op of a variant against the float64
oracle, for the edge-case tests (tests/test_edge_cases.py) and, on a GPU, tests/test_cuda.py."""

from __future__ import annotations

import torch

import miss_ext
from miss_ext import reference

from conftest import (BatCase, ShardCase, assert_close_to_oracle, generator, grads_oracle_and_same, leaf,
                      make_bat_layer, make_shard_layer, oracle_and_same, rand, ref_shard_delta_add_outputs,
                      seed_tensor)


def check_shard_layer(case: ShardCase, *, dtype=torch.float32, block_dtype=None, p: float = 0.0,
                      device="cpu", seed_value: int = 4321) -> None:
    """fold, shard_linear (y and autograd grads of x, weight, bias, block) and shard_delta_add
    of one standard/mini layer, each against the float64 oracle."""
    layer = make_shard_layer(case, dtype=dtype, block_dtype=block_dtype, device=device)
    seed = seed_tensor(seed_value, device) if p > 0 else None
    r = case.r

    fold = miss_ext.shard_fold(layer.x, r, p, seed)
    oracle, same = oracle_and_same(lambda x: reference.shard_fold(x, r, p, seed), layer.x)
    assert_close_to_oracle(fold, oracle, same, dtype=torch.float32, what="shard_fold")

    inputs = [layer.x, layer.weight, layer.bias, layer.block]
    leaves = [leaf(t) for t in inputs]
    y = miss_ext.shard_linear(*leaves, p, seed)
    oracle, same = oracle_and_same(lambda *a: reference.shard_linear(*a, p, seed), *inputs)
    assert_close_to_oracle(y, oracle, same, dtype=dtype, what="shard_linear")
    grad_out = rand(y.shape, dtype=dtype, device=device, gen=generator(seed_value + 1))
    grads = torch.autograd.grad(y, leaves, grad_out)
    oracle_grads, same_grads = grads_oracle_and_same(
        lambda *a: reference.shard_linear(*a, p, seed), inputs, [grad_out], [0, 1, 2, 3])
    for name, g, o, s, t in zip(("x", "weight", "bias", "block"), grads, oracle_grads, same_grads, inputs):
        assert_close_to_oracle(g, o, s, dtype=t.dtype, what=f"shard_linear grad_{name}")

    y0 = rand((*case.lead, case.out_features), dtype=dtype, device=device, gen=generator(seed_value + 2))
    y_leaf, x_leaf, block_leaf = leaf(y0), leaf(layer.x), leaf(layer.block)
    out = miss_ext.shard_delta_add(y_leaf, x_leaf, block_leaf, p, seed)
    fn = lambda *a: ref_shard_delta_add_outputs(*a, p, seed)[0]  # noqa: E731
    oracle, same = oracle_and_same(fn, y0, layer.x, layer.block)
    assert_close_to_oracle(out, oracle, same, dtype=dtype, what="shard_delta_add")
    grads = torch.autograd.grad(out, (y_leaf, x_leaf, block_leaf), grad_out)
    oracle_grads, same_grads = grads_oracle_and_same(fn, [y0, layer.x, layer.block], [grad_out], [0, 1, 2])
    for name, g, o, s, t in zip(("y", "x", "block"), grads, oracle_grads, same_grads, (y0, layer.x, layer.block)):
        assert_close_to_oracle(g, o, s, dtype=t.dtype, what=f"shard_delta_add grad_{name}")


def check_bat_layer(case: BatCase, *, dtype=torch.float32, block_dtype=None, device="cpu") -> None:
    """bat_linear (y and autograd grads of x, weight, bias, block) against the oracle."""
    layer = make_bat_layer(case, dtype=dtype, block_dtype=block_dtype, device=device)
    inputs = [layer.x, layer.weight, layer.bias, layer.block]
    leaves = [leaf(t) for t in inputs]
    y = miss_ext.bat_linear(*leaves)
    oracle, same = oracle_and_same(reference.bat_linear, *inputs)
    assert_close_to_oracle(y, oracle, same, dtype=dtype, what="bat_linear")
    grad_out = rand(y.shape, dtype=dtype, device=device, gen=generator(99))
    grads = torch.autograd.grad(y, leaves, grad_out)
    oracle_grads, same_grads = grads_oracle_and_same(reference.bat_linear, inputs, [grad_out], [0, 1, 2, 3])
    for name, g, o, s, t in zip(("x", "weight", "bias", "block"), grads, oracle_grads, same_grads, inputs):
        assert_close_to_oracle(g, o, s, dtype=t.dtype, what=f"bat_linear grad_{name}")
