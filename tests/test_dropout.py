"""Dropout of the standard/mini ops (SPEC sec. 2): a counter-based mask drawn from a seed
tensor, reproducible from torch's generator, regenerated (not stored) in backward."""

import math

import pytest
import torch
import torch.nn.functional as F

import miss_ext
from miss_ext import reference

from conftest import (
    SHARD_CASES,
    assert_close_to_oracle,
    generator,
    grads_oracle_and_same,
    make_shard_layer,
    make_x,
    rand,
    seed_tensor,
    to64,
)

DEVICE = "cpu"


def multipliers_of(rows, columns, p, seed, device=DEVICE):
    """The op's own [rows, columns] dropout multipliers: tile a g of ones (r = 1) onto zeros."""
    zeros = torch.zeros(rows, columns, device=device)
    ones = torch.ones(rows, 1, device=device)
    return miss_ext.shard_tile_add(zeros, ones, p, seed)


def test_same_seed_same_output():
    layer = make_shard_layer(SHARD_CASES[0])
    seed = seed_tensor(42)
    a = miss_ext.shard_linear(layer.x, layer.weight, layer.bias, layer.block, 0.3, seed)
    b = miss_ext.shard_linear(layer.x, layer.weight, layer.bias, layer.block, 0.3, seed.clone())
    assert torch.equal(a, b)
    assert torch.equal(miss_ext.shard_fold(layer.x, 4, 0.3, seed), miss_ext.shard_fold(layer.x, 4, 0.3, seed))


def test_manual_seed_then_dropout_seed_reproduces():
    layer = make_shard_layer(SHARD_CASES[0])
    outputs, seeds = [], []
    for _ in range(2):
        torch.manual_seed(1234)
        seed = miss_ext.dropout_seed(DEVICE)
        seeds.append(seed)
        outputs.append(miss_ext.shard_linear(layer.x, layer.weight, layer.bias, layer.block, 0.3, seed))
    assert seeds[0].dtype == torch.int64 and seeds[0].shape == (1,) and seeds[0].device.type == "cpu"
    assert torch.equal(seeds[0], seeds[1])
    assert torch.equal(outputs[0], outputs[1])
    # and the generator moves on: the next draw is another seed
    assert not torch.equal(miss_ext.dropout_seed(DEVICE), seeds[1])


def test_different_seeds_differ():
    rows, columns, p = 64, 64, 0.5
    a = multipliers_of(rows, columns, p, seed_tensor(1)) > 0
    b = multipliers_of(rows, columns, p, seed_tensor(2)) > 0
    # Independent masks agree on p^2 + (1-p)^2 = 1/2 of the entries (sd 1/128 here).
    agreement = (a == b).double().mean().item()
    assert abs(agreement - 0.5) < 6 * math.sqrt(0.25 / (rows * columns))
    layer = make_shard_layer(SHARD_CASES[0])
    y1 = miss_ext.shard_linear(layer.x, layer.weight, layer.bias, layer.block, 0.3, seed_tensor(1))
    y2 = miss_ext.shard_linear(layer.x, layer.weight, layer.bias, layer.block, 0.3, seed_tensor(2))
    assert not torch.equal(y1, y2)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_kept_fraction_close_to_one_minus_p(p):
    rows, columns = 256, 256
    m = multipliers_of(rows, columns, p, seed_tensor(777))
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert torch.all((m == 0) | (m == scale)), "a multiplier is neither 0 nor 1/(1-p)"
    kept = (m != 0).double()
    n = kept.numel()
    sd = math.sqrt(p * (1 - p) / n)
    # 6 standard deviations of a binomial proportion: a false alarm has probability ~2e-9.
    assert abs(kept.mean().item() - (1 - p)) <= 6 * sd
    # Every column position inside a Philox group of 8 and every row is drawn alike.
    per_position = kept.reshape(rows, columns // 8, 8).mean(dim=(0, 1))
    assert torch.all((per_position - (1 - p)).abs() <= 6 * math.sqrt(p * (1 - p) / (n / 8)))
    # The mask also equals, bit for bit, the reference's reproduction of the seed.
    expected = reference.dropout_multipliers(777, rows, columns, p, dtype=torch.float32)
    assert torch.equal(m, expected)


@pytest.mark.parametrize("seed_value", [0, 1, -1, 2**63 - 1, -(2**63), 0x123456789ABCDEF])
def test_mask_equals_reference_for_any_seed(seed_value):
    m = multipliers_of(9, 21, 0.4, seed_tensor(seed_value))
    assert torch.equal(m, reference.dropout_multipliers(seed_value, 9, 21, 0.4, dtype=torch.float32))


def test_mask_depends_on_logical_row_not_memory_layout():
    """A strided or 3-D x gets the mask of its contiguous 2-D copy (rows are logical rows)."""
    seed = seed_tensor(99)
    for layout, lead in [("transposed", (7,)), ("transposed3d", (3, 4)), ("step2", (2, 5)), ("col_offset", (6,))]:
        x = make_x(lead, 10, layout=layout, gen=generator(1))
        flat = x.contiguous().reshape(-1, 10)
        assert torch.equal(miss_ext.shard_fold(x, 3, 0.5, seed), miss_ext.shard_fold(flat, 3, 0.5, seed)), layout


@pytest.mark.parametrize("case", [SHARD_CASES[0], SHARD_CASES[1], SHARD_CASES[6]], ids=["std", "mini", "3d"])
def test_backward_uses_the_forward_mask(case):
    p, seed = 0.5, seed_tensor(2024)
    layer = make_shard_layer(case)
    x = layer.x.detach().clone().requires_grad_()
    block = layer.block.detach().clone().requires_grad_()
    y = miss_ext.shard_linear(x, layer.weight, layer.bias, block, p, seed)
    grad_out = rand(y.shape, gen=generator(3))
    grad_x, grad_block = torch.autograd.grad(y, (x, block), grad_out)

    inputs = [layer.x, layer.weight, layer.bias, layer.block]
    (ox, oblock), (sx, sblock) = grads_oracle_and_same(
        lambda *a: reference.shard_linear(*a, p, seed), inputs, [grad_out], [0, 3]
    )
    assert_close_to_oracle(grad_x, ox, sx, what="grad_x")
    assert_close_to_oracle(grad_block, oblock, sblock, what="grad_block")

    # Spelled out: dx = dy W + mask * (dy B_full^T)[n, i % r], the forward's multipliers.
    rows = case.rows
    mult = reference.dropout_multipliers(int(seed.item()), rows, case.in_features, p)
    dy = to64(grad_out).reshape(rows, -1)
    g = dy @ reference.full_block(to64(layer.block), case.out_features).t()
    tiled = g.repeat(1, -(-case.in_features // case.r))[:, : case.in_features]
    expected = dy @ to64(layer.weight) + mult * tiled
    assert_close_to_oracle(grad_x.reshape(rows, -1), expected, sx.reshape(rows, -1), what="grad_x spelled out")

    # The comparison is sensitive: the mask of another seed is far off.
    other = reference.dropout_multipliers(int(seed.item()) + 1, rows, case.in_features, p)
    wrong = dy @ to64(layer.weight) + other * tiled
    assert (wrong - expected).abs().max() > 0.1 * expected.abs().max()


def test_p_equal_one_drops_everything():
    layer = make_shard_layer(SHARD_CASES[1])
    seed = seed_tensor(5)
    fold = miss_ext.shard_fold(layer.x, 4, 1.0, seed)
    assert torch.equal(fold, torch.zeros_like(fold))
    x = layer.x.detach().clone().requires_grad_()
    block = layer.block.detach().clone().requires_grad_()
    y = miss_ext.shard_linear(x, layer.weight, layer.bias, block, 1.0, seed)
    assert torch.equal(y, F.linear(layer.x, layer.weight, layer.bias))
    grad_out = rand(y.shape, gen=generator(6))
    grad_x, grad_block = torch.autograd.grad(y, (x, block), grad_out)
    assert torch.equal(grad_block, torch.zeros_like(grad_block))
    assert torch.allclose(grad_x, grad_out @ layer.weight, rtol=1e-6, atol=1e-6)
    m = multipliers_of(8, 16, 1.0, seed)
    assert torch.equal(m, torch.zeros_like(m))


def test_p_zero_ignores_seed():
    layer = make_shard_layer(SHARD_CASES[0])
    a = miss_ext.shard_linear(layer.x, layer.weight, layer.bias, layer.block, 0.0, None)
    b = miss_ext.shard_linear(layer.x, layer.weight, layer.bias, layer.block, 0.0, seed_tensor(3))
    assert torch.equal(a, b)


def _saved_bytes(fn, referenced):
    """Bytes of the tensors autograd saves while running fn, deduplicated by storage, leaving
    out the storages in ``referenced`` (tensors saved by reference, not copied)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    ref_ptrs = {t.untyped_storage().data_ptr() for t in referenced}
    extra = sum(n for ptr, n in storages.items() if ptr not in ref_ptrs)
    return out, extra, set(storages)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead", [(64,), (4, 16)], ids=["2d", "3d"])
def test_shard_linear_with_dropout_saves_nothing_of_size_n_by_in(lead, x_dtype):
    n, in_features, out, r = math.prod(lead), 256, 32, 4
    gen = generator(8)
    x = rand((*lead, in_features), dtype=x_dtype, gen=gen).requires_grad_()
    weight = rand((out, in_features), dtype=x_dtype, gen=gen)
    bias = rand((out,), dtype=x_dtype, gen=gen)
    block = rand((r, out), gen=gen).requires_grad_()
    seed = seed_tensor(11)
    y, extra, ptrs = _saved_bytes(lambda: miss_ext.shard_linear(x, weight, bias, block, 0.3, seed),
                                  [weight, block])
    # The fold ([N, r] float32) and the seed (8 bytes); a mask would be N * in = 16384 bytes.
    assert extra <= n * r * 4 + 64, f"saved {extra} bytes, more than the fold and the seed"
    assert x.untyped_storage().data_ptr() not in ptrs, "x itself must not be kept (frozen weight)"
    y.sum().backward()  # the saved state is enough for backward
    assert x.grad is not None and block.grad is not None


def test_shard_delta_add_and_fold_with_dropout_save_nothing_of_size_n_by_in():
    n, in_features, out, r = 64, 256, 32, 4
    gen = generator(9)
    x = rand((n, in_features), gen=gen).requires_grad_()
    y0 = rand((n, out), gen=gen).requires_grad_()
    block = rand((r, out), gen=gen).requires_grad_()
    seed = seed_tensor(12)
    _, extra, _ = _saved_bytes(lambda: miss_ext.shard_delta_add(y0, x, block, 0.3, seed), [block])
    assert extra <= n * r * 4 + 64
    _, extra, _ = _saved_bytes(lambda: miss_ext.shard_fold(x, r, 0.3, seed), [])
    assert extra <= 64
