"""MissLinear and the ops inside torch.autocast (CPU, bfloat16; CUDA float16/bfloat16 in
tests/test_cuda_integration.py).

The rule (README, "Autocast"): inside an autocast region for x's device type MissLinear does
what the nn.Linear it replaces does: x, weight and bias are cast to the autocast dtype
(x without a copy when it has that dtype already), the output has the autocast dtype. The
blocks are never cast: the kernels read them in their own dtype and accumulate in float32,
which is cheaper and more accurate than a rounded copy. Called directly, shard_linear and
bat_linear follow the same rule (F.linear's), the other ops run as called.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import miss_ext

from integration_helpers import VARIANTS, CastLog, batch, make_model, relative_error

BF16_REL = 2.0**-8  # one bf16 rounding


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x_fp32", "x_bf16"])
def test_output_has_the_autocast_dtype_and_is_close_to_fp32(variant, x_dtype):
    model = make_model(variant, dropout=0.0).eval()
    x = batch()
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer_out = model.model.proj_in(x.to(x_dtype))
            out = model(x.to(x_dtype))
    assert layer_out.dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16  # the head is a plain nn.Linear
    assert relative_error(out, expected) < 8 * BF16_REL, relative_error(out, expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_copy_of_x_nor_of_the_block(variant):
    """The only casts are those nn.Linear itself makes (weight and bias to bf16); x in bf16
    and the float32 blocks are read as they are."""
    model = make_model(variant, dropout=0.0)
    layer = model.model.layers[0].fc1
    x = torch.randn(4, 7, 32, dtype=torch.bfloat16)
    blocks = list(layer.miss_block.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with CastLog() as ours:
            y = layer(x)
        with CastLog() as linear:
            reference = layer.base_layer(x)
    assert y.dtype == reference.dtype == torch.bfloat16
    assert not any(t is x for t in ours.casts), "x was copied"
    assert not any(t is b for t in ours.casts for b in blocks), "a block was cast"
    assert len(ours.casts) == len(linear.casts) == 2, (ours.ops, linear.ops)


def test_already_low_precision_model_makes_no_copy_at_all():
    """A bf16 model with float32 adapters (PEFT's default) under bf16 autocast: nothing to cast."""
    model = make_model("mixed", dropout=0.0, dtype=torch.bfloat16)
    layer = model.model.layers[0].fc1
    assert all(b.dtype == torch.float32 for b in layer.miss_block.values())
    x = torch.randn(4, 7, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), CastLog() as log:
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert log.casts == [], log.ops


@pytest.mark.parametrize("variant", ["standard", "mixed"])
def test_training_under_autocast(variant):
    """Gradients flow to the float32 blocks in float32, close to the float32 gradients, with
    dropout on (the same seeds are drawn in both runs)."""
    model = make_model(variant).train()
    x = batch()
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(autocast: bool):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().square().mean()
        return torch.autograd.grad(loss, params)

    expected, got = grads(False), grads(True)
    for g, e, p in zip(got, expected, params):
        assert g.dtype == p.dtype == torch.float32
        assert relative_error(g, e) < 16 * BF16_REL, relative_error(g, e)


def test_disabled_and_merged_layers_are_plain_linear_under_autocast():
    model = make_model("standard", dropout=0.0)
    layer = model.model.layers[0].fc1
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        adapted = layer(x)
        with model.disable_adapter():
            base = layer(x)
        expected_base = layer.base_layer(x)
        model.merge_adapter()
        merged = layer(x)
        model.unmerge_adapter()
    assert adapted.dtype == base.dtype == merged.dtype == torch.bfloat16
    assert torch.equal(base, expected_base)
    assert relative_error(merged, adapted) < 4 * BF16_REL


def test_autocast_for_another_device_type_changes_nothing():
    model = make_model("mixed", dropout=0.0).eval()
    x = batch()
    with torch.no_grad():
        expected = model.model.proj_in(x)
        with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
            got = model.model.proj_in(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_reference_backend_follows_the_same_rule():
    model = make_model("mixed", dropout=0.0)
    layer = model.model.layers[1].fc2
    x = torch.randn(5, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        kernels = layer(x)
        layer.backend = "reference"
        reference = layer(x)
    assert kernels.dtype == reference.dtype == torch.bfloat16
    assert relative_error(kernels, reference) < 4 * BF16_REL


# ---------------------------------------------------------------------------------------
# The ops called directly


def test_shard_linear_and_bat_linear_cast_like_f_linear_and_keep_the_block():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(6, 16, generator=gen), torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    block, tiles = torch.randn(4, 8, generator=gen) * 0.3, torch.randn(2, 4, 4, generator=gen) * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with CastLog() as log:
            y = miss_ext.shard_linear(x, w, b, block)
        assert y.dtype == torch.bfloat16
        assert sorted(id(t) for t in log.casts) == sorted(map(id, (x, w, b)))
        with CastLog() as log:
            z = miss_ext.bat_linear(x, w, None, tiles)
        assert z.dtype == torch.bfloat16
        assert sorted(id(t) for t in log.casts) == sorted(map(id, (x, w)))
        # the fold reads x in its own dtype and returns float32: no cast
        with CastLog() as log:
            f = miss_ext.shard_fold(x, 4)
        assert f.dtype == torch.float32 and log.casts == []
    expected = miss_ext.shard_linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), block)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    expected = miss_ext.bat_linear(x.bfloat16(), w.bfloat16(), None, tiles)
    torch.testing.assert_close(z, expected, rtol=0, atol=0)


def test_direct_ops_under_autocast_compile_like_eager():
    """The autocast rule is also registered for tracing: torch.compile (fullgraph) gives the
    eager dtypes, values and gradients."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 16, generator=gen).requires_grad_()
    w, b = torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    block = (torch.randn(4, 8, generator=gen) * 0.3).requires_grad_()
    tiles = (torch.randn(2, 4, 4, generator=gen) * 0.1).requires_grad_()

    def f(x, block, tiles):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return miss_ext.shard_linear(x, w, b, block) + miss_ext.bat_linear(x, w, b, tiles)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, expected = compiled(x, block, tiles), f(x, block, tiles)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    grads = torch.autograd.grad(y.float().sum(), (x, block, tiles))
    expected_grads = torch.autograd.grad(expected.float().sum(), (x, block, tiles))
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    torch._dynamo.reset()


def test_direct_op_autograd_under_autocast():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 16, generator=gen).requires_grad_()
    w = torch.randn(8, 16, generator=gen)
    block = (torch.randn(4, 8, generator=gen) * 0.3).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = miss_ext.shard_linear(x, w, None, block, 0.2, miss_ext.dropout_seed("cpu"))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and block.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and block.grad.abs().sum() > 0


def test_module_outputs_match_nn_linear_dtype_rules():
    """What autocast makes of nn.Linear is what it makes of MissLinear, for x in each dtype."""
    model = make_model("standard", dropout=0.0)
    layer = model.model.proj_in
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 16, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            assert layer(x).dtype == nn.functional.linear(x, layer.weight, layer.bias).dtype
