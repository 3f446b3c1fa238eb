"""MissLinear on bad input: a clear error that names the argument, and a layer (or base layer)
left as it was; and its state_dict layout, which must be PEFT's.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from miss_ext import MissLinear

from conftest import rand
from layer_helpers import (IN, OUT, assert_layer_unchanged, check_forward, layer_input, layer_state,
                           make_layer)


@pytest.fixture
def x():
    return layer_input()


# ---------------------------------------------------------------------------------------
# Bad input: a clear error, the layer unchanged


@pytest.mark.parametrize("module", [nn.Conv1d(4, 4, 3), nn.Embedding(10, 4), nn.Sequential(nn.Linear(4, 4))],
                         ids=["conv1d", "embedding", "sequential"])
def test_non_linear_base_refused(module):
    with pytest.raises(TypeError, match="Linear"):
        MissLinear(module, "a", r=2)


@pytest.mark.parametrize(
    "args, words",
    [
        (("x", IN + 1, 1, 0.0, True), ["r", str(IN + 1), str(IN)]),          # r > in_features
        (("x", 0, 1, 0.0, True), ["r"]),
        (("x", -2, 1, 0.0, True), ["r"]),
        (("x", 5, 1, 0.0, "bat"), ["r", "5", str(IN)]),                      # bat: in % r != 0
        (("x", 3, 1, 0.0, "bat"), ["r", "3"]),                               # 24 % 3 == 0, 16 % 3 != 0
        (("x", 4, 3, 0.0, "mini"), ["mini_r", "3", str(OUT)]),               # out % mini_r != 0
        (("x", 4, 0, 0.0, "mini"), ["mini_r"]),
        (("x", 4, 1, 1.5, True), ["miss_dropout"]),
        (("x", 4, 1, -0.1, True), ["miss_dropout"]),
        (("x", 4, 1, 0.0, "balance"), ["init_weights"]),
        (("std", 4, 1, 0.0, True), ["std", "exists"]),                       # duplicate name
        (("", 4, 1, 0.0, True), ["adapter_name"]),
    ],
    ids=["r>in", "r=0", "r<0", "bat-in%r", "bat-out%r", "mini-out%mini_r", "mini_r=0", "dropout>1", "dropout<0",
         "init_weights", "duplicate", "empty-name"],
)
def test_bad_update_layer_leaves_layer_unchanged(args, words, x):
    layer = make_layer()
    layer.set_adapter(["std", "bat"])
    y0 = layer(x)
    before = layer_state(layer)
    with pytest.raises(ValueError) as info:
        layer.update_layer(*args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert_layer_unchanged(layer, before)
    assert torch.equal(layer(x), y0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(r=IN + 1), dict(r=5, init_weights="bat"), dict(r=4, mini_r=3, init_weights="mini"), dict(r=0)],
    ids=["r>in", "bat-in%r", "mini-out%mini_r", "r=0"],
)
def test_bad_constructor_leaves_base_unchanged(kwargs):
    base = nn.Linear(IN, OUT)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    with pytest.raises(ValueError):
        MissLinear(base, "a", **kwargs)
    assert torch.equal(base.weight, w) and torch.equal(base.bias, b)
    assert base.weight.requires_grad


def test_set_adapter_unknown_refused(x):
    layer = make_layer()
    layer.set_adapter(["std", "mini"])
    before = layer_state(layer)
    with pytest.raises(ValueError, match="nope"):
        layer.set_adapter(["std", "nope"])
    assert_layer_unchanged(layer, before)
    with pytest.raises(ValueError, match="nope"):
        layer.set_adapter("nope")
    assert_layer_unchanged(layer, before)
    check_forward(layer, x, ["std", "mini"])


def test_wrong_input_width_refused():
    layer = make_layer()
    layer.set_adapter(["std", "mini"])
    with pytest.raises((ValueError, RuntimeError)):
        layer(rand((3, IN + 1)))
    layer.set_adapter("bat")
    with pytest.raises((ValueError, RuntimeError)):
        layer(rand((3, IN - 1)))


def test_integer_input_refused():
    layer = make_layer()
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        layer(torch.ones(3, IN, dtype=torch.int64))


def test_state_dict_layout_matches_peft():
    """PEFT's attribute layout: base_layer.weight/bias and miss_block.<adapter>."""
    layer = make_layer(names=("std", "mini"))
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "miss_block.std", "miss_block.mini"}
    assert MissLinear.adapter_layer_names == ("miss_block",)
