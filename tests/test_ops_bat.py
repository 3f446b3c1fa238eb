"""The bat ops of torch.ops.miss against the float64 oracle (miss_ext.reference), in every dtype:
bat_weight, bat_linear, the block and weight gradients, and bat_linear_backward against
torch.autograd.grad of the float64 reference; the fake (meta) kernels' shapes. The accuracy
rule is conftest.assert_close_to_oracle.
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
    assert_close_to_oracle,
    assert_empty_output,
    dtype_id,
    generator,
    grads_oracle_and_same,
    ids,
    make_bat_layer,
    make_shard_layer,
    oracle_and_same,
    rand,
    seed_tensor,
    to64,
)

DEVICE = "cpu"


# ---------------------------------------------------------------------------------------
# BAT


@pytest.mark.parametrize("case", BAT_CASES, ids=ids(BAT_CASES))
def test_bat_weight(case, dtype):
    layer = make_bat_layer(case, dtype=dtype, device=DEVICE)
    ours = miss_ext.bat_weight(layer.weight, layer.block)
    oracle, same = oracle_and_same(reference.bat_weight, layer.weight, layer.block)
    assert_close_to_oracle(ours, oracle, same, dtype=dtype, what="W'")


@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=MIXED_IDS)
def test_bat_weight_mixed_block_dtype(dtypes):
    w_dtype, block_dtype = dtypes
    layer = make_bat_layer(BAT_CASES[0], dtype=w_dtype, block_dtype=block_dtype, device=DEVICE)
    ours = miss_ext.bat_weight(layer.weight, layer.block)
    oracle, same = oracle_and_same(reference.bat_weight, layer.weight, layer.block)
    assert_close_to_oracle(ours, oracle, same, dtype=w_dtype, what="W'")


def test_bat_weight_non_contiguous_weight():
    layer = make_bat_layer(BAT_CASES[0], device=DEVICE)
    weight = layer.weight.t().contiguous().t()
    assert not weight.is_contiguous()
    ours = miss_ext.bat_weight(weight, layer.block)
    oracle, same = oracle_and_same(reference.bat_weight, weight, layer.block)
    assert_close_to_oracle(ours, oracle, same, dtype=torch.float32)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("case", BAT_CASES, ids=ids(BAT_CASES))
def test_bat_linear(case, bias, dtype):
    layer = make_bat_layer(case, dtype=dtype, bias=bias, device=DEVICE)
    ours = miss_ext.bat_linear(layer.x, layer.weight, layer.bias, layer.block)
    oracle, same = oracle_and_same(reference.bat_linear, layer.x, layer.weight, layer.bias, layer.block)
    assert_close_to_oracle(ours, oracle, same, dtype=dtype, what="y")


@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=MIXED_IDS)
@pytest.mark.parametrize("case", BAT_CASES[:2], ids=ids(BAT_CASES[:2]))
def test_bat_linear_mixed_block_dtype(case, dtypes):
    x_dtype, block_dtype = dtypes
    layer = make_bat_layer(case, dtype=x_dtype, block_dtype=block_dtype, device=DEVICE)
    ours = miss_ext.bat_linear(layer.x, layer.weight, layer.bias, layer.block)
    oracle, same = oracle_and_same(reference.bat_linear, layer.x, layer.weight, layer.bias, layer.block)
    assert_close_to_oracle(ours, oracle, same, dtype=x_dtype, what="y")


@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("case", BAT_CASES[:5], ids=ids(BAT_CASES[:5]))
def test_bat_block_grad(case, g_dtype, dtype):
    gen = generator(41)
    weight = rand((case.out_features, case.in_features), dtype=dtype, gen=gen, device=DEVICE)
    grad_weight = rand((case.out_features, case.in_features), dtype=g_dtype, gen=gen, device=DEVICE)
    ours = miss_ext.bat_block_grad(grad_weight, weight, case.r)
    oracle, same = oracle_and_same(lambda g, w: reference.bat_block_grad(g, w, case.r), grad_weight, weight)
    assert_close_to_oracle(ours, oracle, same, dtype=torch.float32, what="dB")


@pytest.mark.parametrize("case", BAT_CASES[:5], ids=ids(BAT_CASES[:5]))
def test_bat_weight_grad(case, dtype):
    gen = generator(42)
    grad_weight = rand((case.out_features, case.in_features), dtype=dtype, gen=gen, device=DEVICE)
    block = rand((case.out_features // case.r, case.r, case.r), gen=gen, scale=0.3, device=DEVICE)
    ours = miss_ext.bat_weight_grad(grad_weight, block)
    oracle, same = oracle_and_same(reference.bat_weight_grad, grad_weight, block)
    assert_close_to_oracle(ours, oracle, same, dtype=dtype, what="dW")


def test_bat_weight_grad_low_precision_block():
    gen = generator(43)
    grad_weight = rand((12, 8), gen=gen, device=DEVICE)
    block = rand((3, 4, 4), dtype=torch.bfloat16, gen=gen, scale=0.3, device=DEVICE)
    ours = miss_ext.bat_weight_grad(grad_weight, block)
    oracle, same = oracle_and_same(reference.bat_weight_grad, grad_weight, block)
    assert_close_to_oracle(ours, oracle, same, dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# bat_linear_backward


def _bat_backward(case, dtype, block_dtype, output_mask):
    layer = make_bat_layer(case, dtype=dtype, block_dtype=block_dtype, device=DEVICE)
    grad_out = rand((*case.lead, case.out_features), dtype=dtype, gen=generator(51), device=DEVICE)
    ours = torch.ops.miss.bat_linear_backward(grad_out, layer.x, layer.weight, layer.block, list(output_mask))
    oracle, same = grads_oracle_and_same(
        reference.bat_linear, [layer.x, layer.weight, layer.bias, layer.block], [grad_out], [0, 1, 3]
    )
    expected_dtypes = (layer.x.dtype, layer.weight.dtype, layer.block.dtype)
    for name, asked, g, o, s, dt in zip(("x", "weight", "block"), output_mask, ours, oracle, same, expected_dtypes):
        if asked:
            assert_close_to_oracle(g, o, s, dtype=dt, what=f"grad_{name}")
        else:
            assert_empty_output(g, f"grad_{name}")


@pytest.mark.parametrize("case", BAT_CASES, ids=ids(BAT_CASES))
def test_bat_linear_backward(case, dtype):
    _bat_backward(case, dtype, None, (True, True, True))


@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=MIXED_IDS)
def test_bat_linear_backward_mixed_block_dtype(dtypes):
    _bat_backward(BAT_CASES[0], dtypes[0], dtypes[1], (True, True, True))


@pytest.mark.parametrize("output_mask", list(itertools.product([True, False], repeat=3)),
                         ids=lambda m: "mask_" + "".join("1" if b else "0" for b in m))
@pytest.mark.parametrize("dtype_", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_bat_linear_backward_output_mask(output_mask, dtype_):
    _bat_backward(BAT_CASES[0], dtype_, None, output_mask)


def test_bat_linear_saves_no_adapted_weight():
    """BAT keeps x, W and B for backward (referenced), never a copy the size of W'."""
    layer = make_bat_layer(BAT_CASES[0], device=DEVICE)
    x, weight, block = layer.x.requires_grad_(), layer.weight, layer.block.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        miss_ext.bat_linear(x, weight, layer.bias, block)
    referenced = {t.untyped_storage().data_ptr() for t in (x, weight, block)}
    copies = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    extra = sum(n for ptr, n in copies.items() if ptr not in referenced)
    assert extra <= 64, f"bat_linear saved {extra} bytes besides x, weight and block"


def test_fake_kernels_match_real_shapes():
    """Meta-device runs (fake kernels) give the shapes and dtypes of the real outputs."""
    case = SHARD_CASES[7]
    layer = make_shard_layer(case, dtype=torch.bfloat16, block_dtype=torch.float32)
    seed = seed_tensor(3)
    real = torch.ops.miss.shard_linear(layer.x, layer.weight, layer.bias, layer.block, 0.3, seed)
    meta = torch.ops.miss.shard_linear(*[t.to("meta") for t in (layer.x, layer.weight, layer.bias, layer.block)],
                                       0.3, seed.to("meta"))
    for r, m in zip(real, meta):
        assert m.device.type == "meta"
        assert (r.shape, r.dtype) == (m.shape, m.dtype)


def test_to64_keeps_seed():
    # The oracle helpers convert floating tensors only: the int64 seed must pass unchanged.
    s = seed_tensor(3)
    assert to64(s) is s
