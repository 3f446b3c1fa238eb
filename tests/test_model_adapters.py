"""MissModel's adapter management on small transformers models: add / set / delete / disable,
merge and unload, and the paths between them (merged adapters, failed merges, deep copies).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from miss_ext import MissConfig, MissLinear, MissModel, get_miss_model
from miss_ext.modules_to_save import ModulesToSaveWrapper

import models as M
from model_helpers import (CONFIG_FILE, LLAMA_QV, OTHER, WEIGHTS_FILE, block_names, close, llama_with_two_adapters, solo_model)

# transformers' own deprecation noise when PEFT inspects a model
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# ---------------------------------------------------------------------------------------
# Adapters: add / set / delete / disable


def test_add_and_set_adapter():
    base, mm = llama_with_two_adapters()
    assert mm.active_adapters == ["default"] and mm.active_adapter == "default"
    assert set(mm.peft_config) == {"default", "other"}
    assert M.trainable_names(mm) == {f"{n}.miss_block.default" for n in M.miss_layer_names(mm) if "o_proj" not in n}
    y_default = M.run(mm, "llama")
    assert close(y_default, M.run(solo_model(base, mm, "default", LLAMA_QV), "llama"))
    mm.set_adapter("other")
    assert mm.active_adapters == ["other"]
    assert M.trainable_names(mm) == block_names(mm, "other")
    y_other = M.run(mm, "llama")
    assert close(y_other, M.run(solo_model(base, mm, "other", OTHER), "llama"))
    assert not close(y_other, y_default)
    mm.set_adapter(["default", "other"])
    assert mm.active_adapters == ["default", "other"]
    assert M.trainable_names(mm) == block_names(mm, "default") | block_names(mm, "other")
    y_both = M.run(mm, "llama")
    assert not close(y_both, y_default) and not close(y_both, y_other)
    mm.merge_adapter()  # an independent path: the merged weights carry both adapters
    assert close(M.run(mm, "llama"), y_both, atol_scale=1e-4)
    mm.unmerge_adapter()
    assert close(M.run(mm, "llama"), y_both)


def test_delete_adapter():
    base, mm = llama_with_two_adapters()
    mm.set_adapter("other")
    y_other = M.run(mm, "llama")
    mm.set_adapter(["default", "other"])
    mm.delete_adapter("default")
    assert set(mm.peft_config) == {"other"} and mm.active_adapters == ["other"]
    assert not any(".default" in k for k in mm.state_dict())
    assert M.trainable_names(mm) == block_names(mm, "other")
    assert close(M.run(mm, "llama"), y_other)
    # layers that only had "default" keep working (no adapter: base output)
    q = mm.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, MissLinear) and len(q.miss_block) == 0
    x = torch.randn(3, 32)
    assert torch.equal(q(x), q.base_layer(x))


def test_delete_the_active_adapter_activates_another():
    base, mm = llama_with_two_adapters()
    mm.delete_adapter("default")
    assert mm.active_adapters == ["other"]
    assert close(M.run(mm, "llama"), M.run(solo_model(base, mm, "other", OTHER), "llama"))


def test_disable_adapter_context():
    base, mm = llama_with_two_adapters()
    mm.model.add_module("extra", nn.Identity())  # harmless; checks that nothing else is touched
    y_base = M.run(base, "llama")
    mm.set_adapter(["default", "other"])
    y = M.run(mm, "llama")
    trainable = M.trainable_names(mm)
    with mm.disable_adapter():
        assert torch.equal(M.run(mm, "llama"), y_base), "disabled must be exactly the base model"
        assert M.trainable_names(mm) == set()
    assert M.trainable_names(mm) == trainable
    assert torch.equal(M.run(mm, "llama"), y)
    with pytest.raises(RuntimeError, match="boom"):
        with mm.disable_adapter():
            raise RuntimeError("boom")
    assert torch.equal(M.run(mm, "llama"), y) and M.trainable_names(mm) == trainable


def test_bad_adapter_names_leave_model_unchanged():
    _, mm = llama_with_two_adapters()
    y = M.run(mm, "llama")
    before = M.snapshot(mm)
    active = mm.active_adapters
    with pytest.raises(ValueError, match="nope"):
        mm.set_adapter(["default", "nope"])
    with pytest.raises(ValueError, match="nope"):
        mm.delete_adapter("nope")
    with pytest.raises(ValueError, match="other"):
        mm.add_adapter("other", MissConfig(r=4, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="nope"):
        mm.merge_adapter(["nope"])
    with pytest.raises(TypeError):
        mm.add_adapter("third", {"r": 4})
    M.assert_unchanged(mm, before)
    assert mm.active_adapters == active and set(mm.peft_config) == {"default", "other"}
    assert torch.equal(M.run(mm, "llama"), y)


# ---------------------------------------------------------------------------------------
# Merge, unload


@pytest.mark.parametrize("init, extra", [(True, {}), ("mini", dict(mini_r=4)), ("bat", {})],
                         ids=["standard", "mini", "bat"])
def test_merge_and_unmerge_adapter(init, extra):
    base = M.make_llama()
    weights0 = {k: v.clone() for k, v in base.state_dict().items()}
    mm = get_miss_model(copy.deepcopy(base), MissConfig(r=8, target_modules="all-linear", init_weights=init, **extra))
    M.randomize_blocks(mm, seed=4)
    y = M.run(mm, "llama")
    mm.merge_adapter()
    assert all(layer.merged for _, layer in mm.miss_layers())
    assert close(M.run(mm, "llama"), y, atol_scale=1e-4)
    mm.unmerge_adapter()
    assert not any(layer.merged for _, layer in mm.miss_layers())
    for name, layer in mm.miss_layers():
        w0 = weights0[f"{name}.weight"]
        assert close(layer.base_layer.weight, w0), name
    assert close(M.run(mm, "llama"), y)


@pytest.mark.parametrize("init, extra", [(True, {}), ("mini", dict(mini_r=4)), ("bat", {})],
                         ids=["standard", "mini", "bat"])
def test_merge_and_unload(init, extra):
    base = M.make_llama()
    keys = set(base.state_dict())
    mm = get_miss_model(copy.deepcopy(base), MissConfig(r=8, target_modules="all-linear", init_weights=init, **extra))
    M.randomize_blocks(mm, seed=5)
    y = M.run(mm, "llama")
    plain = mm.merge_and_unload()
    assert type(plain) is type(base)
    assert not any(isinstance(m, (MissLinear, ModulesToSaveWrapper)) for m in plain.modules())
    assert set(plain.state_dict()) == keys
    assert close(M.run(plain, "llama"), y, atol_scale=1e-4)
    assert not close(M.run(plain, "llama"), M.run(base, "llama"))


def test_merge_and_unload_selected_adapter():
    base, mm = llama_with_two_adapters()
    y_default = M.run(mm, "llama")
    plain = mm.merge_and_unload(adapter_names=["default"])
    assert not any(isinstance(m, MissLinear) for m in plain.modules())
    assert close(M.run(plain, "llama"), y_default, atol_scale=1e-4)


def test_unload_gives_the_original_model():
    base = M.make_llama()
    y_base = M.run(base, "llama")
    keys = set(base.state_dict())
    mm = get_miss_model(copy.deepcopy(base), MissConfig(r=8, target_modules="all-linear"))
    M.randomize_blocks(mm, seed=6)
    plain = mm.unload()
    assert not any(isinstance(m, MissLinear) for m in plain.modules())
    assert set(plain.state_dict()) == keys
    assert torch.equal(M.run(plain, "llama"), y_base)
    # merged first: unload unmerges
    mm = get_miss_model(copy.deepcopy(base), MissConfig(r=8, target_modules="all-linear", init_weights="bat"))
    M.randomize_blocks(mm, seed=7)
    mm.merge_adapter()
    plain = mm.unload()
    assert not any(isinstance(m, MissLinear) for m in plain.modules())
    assert close(M.run(plain, "llama"), y_base, atol_scale=1e-4)


def test_wrapper_forwards_attributes_and_calls():
    base = M.make_llama()
    mm = get_miss_model(base, MissConfig(**LLAMA_QV))
    assert mm.config is base.config
    assert mm.get_base_model() is base
    tokens = M.token_input()
    with torch.no_grad():
        assert torch.equal(mm(input_ids=tokens).logits, base(input_ids=tokens).logits)


# ---------------------------------------------------------------------------------------
# More management paths


def test_modules_to_save_excluded_from_all_linear_like_peft():
    base = M.make_mlp()
    config = MissConfig(r=8, target_modules="all-linear", modules_to_save=["head"])
    theirs = M.peft_copy(base, config)
    ours = get_miss_model(copy.deepcopy(base), config)
    assert "head" not in M.miss_layer_names(ours)
    assert M.miss_layer_names(ours) == M.miss_layer_names(theirs)
    assert M.trainable_names(ours) == M.trainable_names(theirs)


def test_disable_adapter_while_merged():
    base = M.make_llama()
    y_base = M.run(base, "llama")
    mm = get_miss_model(copy.deepcopy(base), MissConfig(r=8, target_modules="all-linear"))
    M.randomize_blocks(mm, seed=12)
    y = M.run(mm, "llama")
    mm.merge_adapter()
    with mm.disable_adapter():  # PEFT: a disabled merged layer unmerges first
        assert close(M.run(mm, "llama"), y_base, atol_scale=1e-4)
    assert not any(layer.merged for _, layer in mm.miss_layers())
    assert close(M.run(mm, "llama"), y)


def test_delete_merged_adapter_refused():
    _, mm = llama_with_two_adapters()
    mm.merge_adapter(["default"])
    before = M.snapshot(mm)
    with pytest.raises(ValueError, match="default"):
        mm.delete_adapter("default")
    M.assert_unchanged(mm, before)
    assert set(mm.peft_config) == {"default", "other"}


def test_failed_safe_merge_leaves_model_unchanged():
    """SPEC sec. 6: a failed merge (NaN/Inf with safe_merge=True) leaves the base weights
    bit-identical; for a model, every layer's (not only the layer that failed)."""
    mm = get_miss_model(M.make_llama(), MissConfig(r=8, target_modules="all-linear"))
    M.randomize_blocks(mm, seed=13)
    _, last = list(mm.miss_layers())[-1]
    with torch.no_grad():
        last.miss_block["default"].view(-1)[0] = float("nan")
    before = M.snapshot(mm)
    with pytest.raises((ValueError, RuntimeError)):
        mm.merge_adapter(safe_merge=True)
    assert [n for n, layer in mm.miss_layers() if layer.merged] == []
    M.assert_unchanged(mm, before)


def test_failed_bat_unmerge_leaves_model_unchanged():
    """SPEC sec. 6: a singular BAT unmerge raises and leaves the base weights bit-identical;
    for a model, every layer stays merged (not only the layer that failed)."""
    mm = get_miss_model(M.make_llama(), MissConfig(r=8, target_modules="all-linear", init_weights="bat"))
    M.randomize_blocks(mm, seed=14)
    _, last = list(mm.miss_layers())[-1]
    with torch.no_grad():
        last.miss_block["default"][0] = -torch.eye(8)  # I + B_0 singular
    mm.merge_adapter()
    before = M.snapshot(mm)
    with pytest.raises((ValueError, RuntimeError)):
        mm.unmerge_adapter()
    assert all(layer.merged for _, layer in mm.miss_layers())
    M.assert_unchanged(mm, before)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-dropout"])
def test_reference_backend_model(train):
    base = M.make_llama()
    config = MissConfig(r=8, target_modules="all-linear", miss_dropout=0.2)
    kernels = get_miss_model(copy.deepcopy(base), config)
    reference = get_miss_model(copy.deepcopy(base), config, backend="reference")
    for mm in (kernels, reference):
        mm.add_adapter("bat", MissConfig(r=8, target_modules=["q_proj", "o_proj"], init_weights="bat"))
        M.randomize_blocks(mm, "default", seed=15)
        M.randomize_blocks(mm, "bat", seed=16)
        mm.set_adapter(["default", "bat"])
        mm.train(train)
    assert {layer.backend for _, layer in reference.miss_layers()} == {"reference"}
    assert {layer.backend for _, layer in kernels.miss_layers()} == {"kernels"}
    outs = []
    for mm in (kernels, reference):
        torch.manual_seed(77)
        y = M.forward(mm, "llama")
        y.pow(2).mean().backward()
        outs.append((y.detach(), {n: p.grad for n, p in mm.named_parameters() if p.requires_grad}))
    (yk, gk), (yr, gr) = outs
    assert close(yk, yr, atol_scale=1e-5)
    assert gk.keys() == gr.keys()
    for name in gk:
        assert close(gk[name], gr[name], rtol=1e-4, atol_scale=1e-4), name


def test_deepcopy_of_a_miss_model():
    mm = get_miss_model(M.make_llama(), MissConfig(**LLAMA_QV))
    M.randomize_blocks(mm, seed=17)
    twin = copy.deepcopy(mm)
    assert torch.equal(M.run(twin, "llama"), M.run(mm, "llama"))
    assert M.trainable_names(twin) == M.trainable_names(mm)


def test_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    """Writes are atomic: a save that dies mid-write leaves the previous adapter, which still
    loads, and no temporary files."""
    mm = get_miss_model(M.make_mlp(), MissConfig(r=8, target_modules=["fc1"]))
    M.randomize_blocks(mm, seed=18)
    y = M.run(mm, "mlp")
    mm.save_pretrained(str(tmp_path))
    M.randomize_blocks(mm, seed=19)

    def crash(fd):
        raise OSError("disk died")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk died"):
        mm.save_pretrained(str(tmp_path))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert torch.equal(M.run(MissModel.from_pretrained(M.make_mlp(), str(tmp_path)), "mlp"), y)


@pytest.mark.parametrize("adapter_name", ["", "a.b", 3], ids=["empty", "dotted", "int"])
def test_bad_adapter_name_leaves_model_unchanged(adapter_name):
    model = M.make_mlp()
    before = M.snapshot(model)
    with pytest.raises((ValueError, KeyError, TypeError)):
        get_miss_model(model, MissConfig(r=8, target_modules=["fc1", "fc2"]), adapter_name=adapter_name)
    M.assert_unchanged(model, before)
    mm = get_miss_model(M.make_mlp(), MissConfig(r=8, target_modules=["fc1"]))
    before = M.snapshot(mm)
    with pytest.raises((ValueError, KeyError, TypeError)):
        mm.add_adapter(adapter_name, MissConfig(r=8, target_modules=["fc2", "fc1"]))
    M.assert_unchanged(mm, before)
    assert set(mm.peft_config) == {"default"}


def test_second_adapter_bias_like_peft():
    base = M.make_mlp()
    theirs = M.peft_copy(base, MissConfig(r=8, target_modules=["fc1"]))
    theirs.add_adapter("b", pytest.importorskip("peft").MissConfig(r=8, target_modules=["fc2"], bias="all"))
    ours = get_miss_model(copy.deepcopy(base), MissConfig(r=8, target_modules=["fc1"]))
    ours.add_adapter("b", MissConfig(r=8, target_modules=["fc2"], bias="all"))
    assert M.trainable_names(ours) == M.trainable_names(theirs)
    theirs.set_adapter("b")
    ours.set_adapter("b")
    assert M.trainable_names(ours) == M.trainable_names(theirs)


def test_load_adapter_keeps_a_frozen_adapter_frozen(tmp_path):
    """from_pretrained(is_trainable=False) freezes the adapter; loading a second one (also
    frozen) must not make the first trainable again (PEFT: nothing trainable)."""
    _, mm = llama_with_two_adapters()
    mm.save_pretrained(str(tmp_path))
    loaded = MissModel.from_pretrained(M.make_llama(), str(tmp_path))
    assert M.trainable_names(loaded) == set()
    loaded.load_adapter(str(tmp_path / "other"), "other")
    assert M.trainable_names(loaded) == set()
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(M.make_llama(), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "other"), adapter_name="other")
    assert M.trainable_names(theirs) == set()
