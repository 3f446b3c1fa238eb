"""MissLinear in low precision (SPEC sec. 3: bf16/fp16 base weights with fp32 or low-precision
blocks), with dropout (train mode only; bat takes none), and its reference backend, which must
agree with the kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from miss_ext import MissLinear

from conftest import generator, rand
from layer_helpers import IN, OUT, check_forward, layer_input, make_layer, set_random_block


@pytest.fixture
def x():
    return layer_input()


# ---------------------------------------------------------------------------------------
# Dtypes (SPEC sec. 3)


@pytest.mark.parametrize("names", [["std"], ["mini"], ["bat"], ["bat", "std", "mini"]],
                         ids=["std", "mini", "bat", "bat+std+mini"])
def test_bf16_base_fp32_block(names, x):
    layer = make_layer(dtype=torch.bfloat16)
    for block in layer.miss_block.values():
        assert block.dtype == torch.float32, "PEFT's default: fp32 adapters on a bf16 model"
    layer.set_adapter(names)
    xb = x.to(torch.bfloat16)
    y = check_forward(layer, xb, names)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for n in names:
        assert layer.miss_block[n].grad.dtype == torch.float32
    # merge in bf16 (fp32 math, rounded once) keeps the dtype and gives the same forward
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y0 = layer(xb)
        layer.merge()
        w_merged = layer.base_layer.weight.detach().clone()
        assert layer.base_layer.weight.dtype == torch.bfloat16
        y1 = layer(xb)
        scale = y0.float().abs().max().item()
        assert (y1.float() - y0.float()).abs().max().item() <= 0.05 * scale
        layer.unmerge()
    if "bat" not in names:
        # standard/mini: within 1 bf16 ulp, measured at the larger of |W| and |W merged| (the
        # merged weight is stored in bf16, so its rounding bounds what unmerge can recover)
        ulp = torch.finfo(torch.bfloat16).eps * torch.maximum(w0.float().abs(), w_merged.float().abs())
        assert ((layer.base_layer.weight.float() - w0.float()).abs() <= ulp).all()


def test_output_dtype_is_x_dtype(x):
    layer = make_layer(dtype=torch.bfloat16)
    layer.set_adapter(["std", "mini"])
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    layer32 = make_layer()
    layer32.set_adapter(["std", "bat"])
    assert layer32(x).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_block_on_low_precision_layer(dtype, x):
    layer = make_layer(dtype=dtype, block_dtype=dtype)
    assert all(b.dtype == dtype for b in layer.miss_block.values())
    names = ["bat", "std", "mini", "rand"]
    layer.set_adapter(names)
    y = check_forward(layer, x.to(dtype), names)
    assert y.dtype == dtype


def test_explicit_block_dtype(x):
    layer = make_layer(names=("std", "mini"), dtype=torch.float32, block_dtype=torch.bfloat16)
    assert all(b.dtype == torch.bfloat16 for b in layer.miss_block.values())
    layer.set_adapter(["std", "mini"])
    y = check_forward(layer, x, ["std", "mini"])
    assert y.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Dropout and the reference backend


def dropout_layer(p=0.5, backend="kernels"):
    base = nn.Linear(IN, OUT)
    base.requires_grad_(False)
    layer = MissLinear(base, "d", r=5, miss_dropout=p, backend=backend)
    layer.update_layer("m", 4, 4, p, "mini")
    layer.update_layer("b", 8, 1, p, "bat")
    for i, name in enumerate(("d", "m", "b")):
        set_random_block(layer, name, 50 + i)
    return layer


def test_dropout_only_in_train_mode(x):
    layer = dropout_layer()
    layer.set_adapter(["d", "m"])
    layer.eval()
    y_eval = check_forward(layer, x, ["d", "m"], what="eval: no dropout")
    assert torch.equal(layer(x), y_eval)
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    y1_again = layer(x)
    y2 = layer(x)
    assert torch.equal(y1, y1_again), "torch.manual_seed must make dropout reproducible"
    assert not torch.allclose(y1, y_eval), "train mode: dropout changes the output"
    assert not torch.equal(y1, y2), "a new mask each call"
    # the base part is never dropped: disabling the adapters in train mode gives base(x)
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_bat_applies_no_dropout(x):
    layer = dropout_layer(p=0.5)
    layer.set_adapter("b")
    layer.train()
    y_train = layer(x)
    layer.eval()
    y_eval = layer(x)
    assert torch.allclose(y_train, y_eval, atol=1e-6)


@pytest.mark.parametrize("names", [["d"], ["m"], ["b"], ["b", "d", "m"]], ids=["std", "mini", "bat", "all"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_reference_backend_matches_kernels(names, train, x):
    kernels = dropout_layer(p=0.3)
    ref = copy.deepcopy(kernels)
    ref.backend = "reference"
    assert ref.backend == "reference" and "reference" in repr(ref)
    outs = []
    for layer in (kernels, ref):
        layer.set_adapter(names)
        layer.train(train)
        xl = x.clone().requires_grad_(True)
        torch.manual_seed(123)
        y = layer(xl)
        y.backward(rand(y.shape, gen=generator(5)))
        outs.append((y.detach(), xl.grad, {n: layer.miss_block[n].grad for n in names}))
    (yk, gxk, gbk), (yr, gxr, gbr) = outs
    tol = dict(rtol=1e-5, atol=1e-5)
    assert torch.allclose(yk, yr, **tol), (yk - yr).abs().max()
    assert torch.allclose(gxk, gxr, **tol), (gxk - gxr).abs().max()
    for n in names:
        assert torch.allclose(gbk[n], gbr[n], rtol=1e-5, atol=1e-5 * gbr[n].abs().max().item()), n


def test_backend_value_checked():
    with pytest.raises(ValueError, match="backend"):
        MissLinear(nn.Linear(IN, OUT), "a", r=4, backend="cuda-magic")
