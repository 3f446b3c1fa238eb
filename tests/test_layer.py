"""MissLinear, the user layer: several named adapters (each with its own variant) on one
nn.Linear, built, run forward and backward against the float64 math of docs/spec.md
(miss_ext.reference), set, disabled and deleted. Merging, dtypes and dropout, and bad input
have their own files: tests/test_layer_merge.py, test_layer_dtypes.py, test_layer_errors.py.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miss_ext import MissLinear, reference

from conftest import generator, rand
from layer_helpers import (ADAPTERS, IN, OUT, SUBSETS, assert_layer_unchanged, check_forward,
                           layer_input, layer_state, make_layer)


@pytest.fixture
def x():
    return layer_input()


# ---------------------------------------------------------------------------------------
# Construction and forward


def test_adapters_have_their_own_variant_and_shape():
    layer = make_layer()
    assert layer.miss_variant == {"std": "standard", "mini": "mini", "bat": "bat", "rand": "standard",
                                  "bat2": "bat"}
    assert tuple(layer.miss_block["std"].shape) == (5, OUT)
    assert tuple(layer.miss_block["mini"].shape) == (4, 4)
    assert tuple(layer.miss_block["bat"].shape) == (OUT // 8, 8, 8)
    assert tuple(layer.miss_block["bat2"].shape) == (OUT // 4, 4, 4)
    assert tuple(layer.miss_block["rand"].shape) == (6, OUT)
    assert layer.miss_r == {"std": 5, "mini": 4, "bat": 8, "rand": 6, "bat2": 4}
    assert layer.miss_mini_r["mini"] == 4
    # only the first adapter is active (PEFT: added adapters are inactive until set_adapter)
    assert layer.active_adapters == ["std"] and layer.active_adapter == "std"
    assert layer.in_features == IN and layer.out_features == OUT
    assert layer.weight is layer.base_layer.weight and layer.get_base_layer() is layer.base_layer


def test_added_adapter_is_inactive_and_frozen():
    """PEFT's MissLayer.update_layer ends with set_adapter(active_adapters): an added adapter
    is neither active nor trainable until set_adapter."""
    layer = make_layer(names=("std", "mini", "bat"))
    assert layer.active_adapters == ["std"]
    assert {k: v.requires_grad for k, v in layer.miss_block.items()} == {"std": True, "mini": False, "bat": False}


def test_new_blocks_init():
    base = nn.Linear(IN, OUT)
    layer = MissLinear(base, "a", r=4)
    layer.update_layer("b", 4, 4, 0.0, "mini")
    layer.update_layer("c", 8, 1, 0.0, "bat")
    layer.update_layer("d", 4, 1, 0.0, False)
    for name in "abc":
        assert not layer.miss_block[name].any(), f"{name}: zeros expected"
    assert layer.miss_block["d"].abs().min() > 0  # kaiming uniform, non-zero
    assert layer.miss_block["d"].std() > 0.01
    x = rand((4, IN))
    layer.set_adapter(["a", "b", "c"])
    assert torch.allclose(layer(x), base(x), atol=1e-6)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_forward_single_adapter(name, x):
    layer = make_layer()
    layer.set_adapter(name)
    assert layer.active_adapters == [name]
    check_forward(layer, x, [name])
    # a 2-D input and a non-contiguous view give the same math
    check_forward(layer, x[0], [name], what="2-D x")
    check_forward(layer, x.transpose(0, 1), [name], what="transposed x")


@pytest.mark.parametrize("names", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_forward_active_subsets(names, x):
    layer = make_layer()
    layer.set_adapter(names)
    assert layer.active_adapters == list(names)
    assert {k for k, v in layer.miss_block.items() if v.requires_grad} == set(names)
    check_forward(layer, x, names)


def test_forward_grads_match_float64(x):
    layer = make_layer()
    names = ["bat", "std", "mini"]
    layer.set_adapter(names)
    xl = x.clone().requires_grad_(True)
    y = layer(xl)
    g = rand(y.shape, gen=generator(11))
    y.backward(g)
    # float64 autograd of the same math
    blocks64 = {n: layer.miss_block[n].detach().double().requires_grad_(True) for n in names}
    x64 = x.double().requires_grad_(True)
    w = layer.base_layer.weight.double()
    w = reference.bat_weight(w, blocks64["bat"])
    y64 = F.linear(x64, w, layer.base_layer.bias.double())
    for n in ("std", "mini"):
        y64 = y64 + reference.shard_delta(x64, blocks64[n], OUT)
    y64.backward(g.double())
    for n in names:
        got, want = layer.miss_block[n].grad, blocks64[n].grad
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), n
    assert torch.allclose(xl.grad.double(), x64.grad, rtol=1e-5, atol=1e-5 * x64.grad.abs().max().item())
    assert layer.miss_block["rand"].grad is None and layer.miss_block["bat2"].grad is None


def test_disabled_layer_is_exactly_base(x):
    layer = make_layer()
    layer.set_adapter(["bat", "std", "mini"])
    base_y = layer.base_layer(x)
    layer.enable_adapters(False)
    assert layer.disable_adapters
    assert not any(p.requires_grad for p in layer.miss_block.values())
    assert torch.equal(layer(x), base_y)
    layer.enable_adapters(True)
    assert not layer.disable_adapters
    assert layer.active_adapters == ["bat", "std", "mini"]
    assert {k for k, v in layer.miss_block.items() if v.requires_grad} == {"bat", "std", "mini"}
    check_forward(layer, x, ["bat", "std", "mini"])


def test_no_active_adapter_is_base(x):
    layer = make_layer()
    layer.set_adapter([])
    assert torch.equal(layer(x), layer.base_layer(x))


def test_delete_adapter(x):
    layer = make_layer()
    layer.set_adapter(["std", "mini"])
    layer.delete_adapter("mini")
    assert "mini" not in layer.miss_block
    for table in (layer.miss_r, layer.miss_mini_r, layer.miss_dropout, layer.miss_variant):
        assert "mini" not in table
    assert not any("mini" in k for k in layer.state_dict())
    assert layer.active_adapters == ["std"]
    check_forward(layer, x, ["std"])
    # deleting an inactive adapter keeps the active one
    layer.delete_adapter("bat2")
    assert layer.active_adapters == ["std"]
    # deleting the last active adapter activates a remaining one (PEFT does the same)
    layer.delete_adapter("std")
    assert len(layer.active_adapters) == 1 and layer.active_adapters[0] in layer.miss_block
    check_forward(layer, x, layer.active_adapters)
    before = layer_state(layer)
    with pytest.raises(ValueError, match="nope"):
        layer.delete_adapter("nope")
    assert_layer_unchanged(layer, before)


def test_delete_merged_adapter_refused(x):
    layer = make_layer()
    layer.merge(adapter_names=["std"])
    before = layer_state(layer)
    with pytest.raises(ValueError, match="std"):
        layer.delete_adapter("std")
    assert_layer_unchanged(layer, before)


def test_repr_is_readable():
    layer = make_layer()
    text = repr(layer)
    assert text.startswith("MissLinear(") or "MissLinear" in text.splitlines()[0]
    for piece in ("in_features=24", "out_features=16", "std", "mini", "bat", "rand", "standard", "r=5", "r=8",
                  "mini_r=4"):
        assert piece in text, (piece, text)
    assert "Linear(in_features=24, out_features=16" in text  # the base layer is shown too
    layer.merge()
    assert "merged" in repr(layer)
