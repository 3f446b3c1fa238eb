"""MissLinear's merge and unmerge, any subset of its adapters: the merged forward matches the
unmerged one, unmerge restores the weight, and a safe merge or a singular bat unmerge that
is refused leaves the layer as it was.
"""

from __future__ import annotations


import pytest
import torch

from miss_ext import reference

from layer_helpers import ADAPTERS, SUBSETS, assert_layer_unchanged, layer_input, layer_state, make_layer


@pytest.fixture
def x():
    return layer_input()


# ---------------------------------------------------------------------------------------
# Merge


@pytest.mark.parametrize("names", SUBSETS, ids=["+".join(s) for s in SUBSETS])
@pytest.mark.parametrize("safe", [False, True], ids=["plain", "safe_merge"])
def test_merge_unmerge(names, safe, x):
    layer = make_layer()
    layer.set_adapter(names)
    w0 = layer.base_layer.weight.detach().clone()
    y_unmerged = layer(x)
    layer.merge(safe_merge=safe)
    assert layer.merged and sorted(layer.merged_adapters) == sorted(names)
    # the merged weight is the float64 math: BATs in order, then the standard/mini deltas
    w = w0.double()
    for n in names:
        if layer.miss_variant[n] == "bat":
            w = reference.merged(w, layer.miss_block[n].detach())
    for n in names:
        if layer.miss_variant[n] != "bat":
            w = reference.merged(w, layer.miss_block[n].detach())
    merged_w = layer.base_layer.weight.detach()
    assert torch.allclose(merged_w.double(), w, rtol=1e-5, atol=1e-6 * w.abs().max().item()), \
        (merged_w.double() - w).abs().max()
    y_merged = layer(x)
    assert torch.allclose(y_merged, y_unmerged, rtol=1e-5, atol=1e-5 * y_unmerged.abs().max().item())
    assert torch.equal(y_merged, layer.base_layer(x))
    layer.unmerge()
    assert not layer.merged and layer.merged_adapters == []
    back = layer.base_layer.weight.detach()
    assert torch.allclose(back, w0, rtol=1e-5, atol=1e-5 * w0.abs().max().item()), (back - w0).abs().max()
    assert torch.allclose(layer(x), y_unmerged, rtol=1e-5, atol=1e-5 * y_unmerged.abs().max().item())


def test_merge_named_subset_of_inactive_adapters(x):
    layer = make_layer()  # active: std
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge(adapter_names=["mini", "rand"])
    assert sorted(layer.merged_adapters) == ["mini", "rand"]
    want = reference.merged(reference.merged(w0, layer.miss_block["mini"].detach()), layer.miss_block["rand"].detach())
    assert torch.allclose(layer.base_layer.weight.double(), want, atol=1e-6)
    # merging an adapter twice warns and does nothing more
    with pytest.warns(UserWarning):
        layer.merge(adapter_names=["mini"])
    assert sorted(layer.merged_adapters) == ["mini", "rand"]
    assert torch.allclose(layer.base_layer.weight.double(), want, atol=1e-6)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)
    with pytest.warns(UserWarning):
        layer.unmerge()  # nothing to do


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_get_delta_weight_is_merged_minus_weight(name):
    layer = make_layer()
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight(name)
    assert delta.shape == w0.shape and delta.dtype == torch.float32
    assert torch.equal(layer.base_layer.weight, w0), "get_delta_weight must not touch the weight"
    want = reference.merged(w0, layer.miss_block[name].detach()) - w0.double()
    assert torch.allclose(delta.double(), want, atol=1e-6), (delta.double() - want).abs().max()
    layer.merge(adapter_names=[name])
    assert torch.allclose(layer.base_layer.weight - w0, delta, atol=1e-6)


def test_disabled_forward_unmerges(x):
    layer = make_layer()
    layer.set_adapter(["std", "bat"])
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.enable_adapters(False)
    y = layer(x)  # PEFT: a disabled layer unmerges and runs the base layer
    assert not layer.merged
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-5)
    assert torch.equal(y, layer.base_layer(x))


def test_merge_bat_on_merged_standard_refused(x):
    layer = make_layer()
    layer.merge(adapter_names=["std"])
    before = layer_state(layer)
    with pytest.raises(ValueError, match="bat"):
        layer.merge(adapter_names=["bat"])
    assert_layer_unchanged(layer, before)
    with pytest.raises(ValueError, match="bat"):
        layer.merge(adapter_names=["bat", "mini"])
    assert_layer_unchanged(layer, before)


@pytest.mark.parametrize("name", ["std", "mini", "bat"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_safe_merge_refuses_non_finite(name, bad):
    layer = make_layer()
    with torch.no_grad():
        layer.miss_block[name].view(-1)[3] = bad
    before = layer_state(layer)
    with pytest.raises((ValueError, RuntimeError)):
        layer.merge(safe_merge=True, adapter_names=[name])
    assert_layer_unchanged(layer, before)
    assert not layer.merged


def test_safe_merge_failure_after_a_good_adapter_is_consistent():
    layer = make_layer()
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.miss_block["mini"].view(-1)[0] = float("nan")
    with pytest.raises((ValueError, RuntimeError)):
        layer.merge(safe_merge=True, adapter_names=["std", "mini"])
    assert "mini" not in layer.merged_adapters
    assert torch.isfinite(layer.base_layer.weight).all()
    if layer.merged:
        layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)


def test_singular_bat_unmerge_refused():
    layer = make_layer()
    with torch.no_grad():
        layer.miss_block["bat"][1] = -torch.eye(8)  # I + B_1 singular
    layer.merge(adapter_names=["bat"])
    before = layer_state(layer)
    with pytest.raises((ValueError, RuntimeError)):
        layer.unmerge()
    assert_layer_unchanged(layer, before)
    assert layer.merged_adapters == ["bat"]


def test_merge_unknown_adapter_refused():
    layer = make_layer()
    before = layer_state(layer)
    with pytest.raises(ValueError, match="nope"):
        layer.merge(adapter_names=["std", "nope"])
    assert_layer_unchanged(layer, before)
    with pytest.raises(ValueError, match="nope"):
        layer.get_delta_weight("nope")
