"""MissModel's adapter files: the saved layout, loading (frozen or trainable, into a second
adapter), and files that are tampered with, truncated, of another model or legacy pickles:
a clear error and an unchanged model.
"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from miss_ext import MissConfig, MissModel, get_miss_model

import models as M
from model_helpers import (CONFIG_FILE, LLAMA_QV, OTHER, WEIGHTS_FILE, block_names, edit_config,
                           edit_tensors, llama_with_two_adapters, load_safetensors, saved_llama_adapter)

# transformers' own deprecation noise when PEFT inspects a model
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# ---------------------------------------------------------------------------------------
# Adapter files


def test_save_pretrained_layout(tmp_path):
    _, mm = llama_with_two_adapters()
    mm.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_FILE, WEIGHTS_FILE, "other"])
    assert sorted(os.listdir(tmp_path / "other")) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    for adapter, directory, config in (("default", tmp_path, LLAMA_QV), ("other", tmp_path / "other", OTHER)):
        tensors = load_safetensors(directory / WEIGHTS_FILE)
        layers = {n for n in M.miss_layer_names(mm) if n + ".miss_block." + adapter in block_names(mm, adapter)}
        assert set(tensors) == {f"base_model.model.{n}.miss_block" for n in layers}
        params = dict(mm.named_parameters())
        for key, value in tensors.items():
            name = key + "." + adapter  # PEFT's layout: a file key is the parameter's name, less the adapter
            assert torch.equal(value, params[name].detach())
        data = json.loads((directory / CONFIG_FILE).read_text())
        assert data["peft_type"] == "MISS"
        for key, value in config.items():
            assert data[key] == value, (adapter, key)
    # selected_adapters
    mm.save_pretrained(str(tmp_path / "only"), selected_adapters=["other"])
    assert os.listdir(tmp_path / "only") == ["other"]


def test_from_pretrained_frozen_and_trainable(tmp_path):
    _, mm = llama_with_two_adapters()
    y_default = M.run(mm, "llama")
    mm.set_adapter("other")
    y_other = M.run(mm, "llama")
    mm.save_pretrained(str(tmp_path))

    model = M.make_llama().train()
    loaded = MissModel.from_pretrained(model, str(tmp_path))
    assert M.trainable_names(loaded) == set()
    assert not any(m.training for m in loaded.modules()), "is_trainable=False: eval mode"
    assert torch.equal(M.run(loaded, "llama"), y_default)

    loaded = MissModel.from_pretrained(M.make_llama(), str(tmp_path / "other"), adapter_name="other",
                                       is_trainable=True)
    assert loaded.active_adapters == ["other"]
    assert M.trainable_names(loaded) == block_names(loaded, "other") != set()
    assert torch.equal(M.run(loaded, "llama"), y_other)


def test_load_adapter(tmp_path):
    _, mm = llama_with_two_adapters()
    mm.set_adapter("other")
    y_other = M.run(mm, "llama")
    mm.save_pretrained(str(tmp_path))
    target = get_miss_model(M.make_llama(), MissConfig(**LLAMA_QV))
    y_zero = M.run(target, "llama")
    target.load_adapter(str(tmp_path / "other"), "other")
    assert target.active_adapters == ["default"] and set(target.peft_config) == {"default", "other"}
    assert not any(n.endswith(".other") for n in M.trainable_names(target))
    assert torch.equal(M.run(target, "llama"), y_zero)
    target.set_adapter("other")
    assert torch.equal(M.run(target, "llama"), y_other)
    # Loading into an existing adapter replaces its weights, as PEFT does (Trainer resumes and
    # loads the best checkpoint that way); a file that does not fit it is refused, nothing changed.
    M.randomize_blocks(mm, "other", seed=21)
    mm.save_pretrained(str(tmp_path / "newer"))
    target.load_adapter(str(tmp_path / "newer" / "other"), "other")
    y_newer = M.run(mm, "llama")
    assert not torch.equal(y_newer, y_other)
    assert torch.equal(M.run(target, "llama"), y_newer)
    target.save_pretrained(str(tmp_path / "default_only"), selected_adapters=["default"])
    before = M.snapshot(target)
    with pytest.raises(ValueError, match="other"):
        target.load_adapter(str(tmp_path / "default_only"), "other")
    M.assert_unchanged(target, before)


def test_save_writes_no_temp_files_and_overwrites(tmp_path):
    mm = get_miss_model(M.make_mlp(), MissConfig(r=8, target_modules=["fc1"]))
    mm.save_pretrained(str(tmp_path))
    M.randomize_blocks(mm, seed=9)
    y = M.run(mm, "mlp")
    mm.save_pretrained(str(tmp_path))  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert torch.equal(M.run(MissModel.from_pretrained(M.make_mlp(), str(tmp_path)), "mlp"), y)


# ---------------------------------------------------------------------------------------
# Bad adapter files: a clear error, the model unchanged


Q0 = "base_model.model.model.layers.0.self_attn.q_proj.miss_block"
V1 = "base_model.model.model.layers.1.self_attn.v_proj.miss_block"
K0 = "base_model.model.model.layers.0.self_attn.k_proj.miss_block"

TAMPERING = {
    "config-r": lambda d: edit_config(d, r=4),
    "config-variant-bat": lambda d: edit_config(d, init_weights="bat"),
    "config-variant-mini": lambda d: edit_config(d, init_weights="mini", mini_r=4),
    "config-targets": lambda d: edit_config(d, target_modules=["q_proj", "v_proj", "k_proj"]),
    "config-unknown-target": lambda d: edit_config(d, target_modules=["nonexistent"]),
    "config-not-miss": lambda d: edit_config(d, peft_type="LORA"),
    "missing-layer": lambda d: edit_tensors(d, lambda t: t.pop(V1)),
    "extra-key": lambda d: edit_tensors(d, lambda t: t.__setitem__(K0, torch.zeros(8, 16))),
    "wrong-shape": lambda d: edit_tensors(d, lambda t: t.__setitem__(Q0, torch.zeros(8, 31))),
    "bat-file-standard-config": lambda d: edit_tensors(d, lambda t: t.__setitem__(Q0, torch.zeros(4, 8, 8))),
    "no-weights": lambda d: os.remove(d / WEIGHTS_FILE),
    "no-config": lambda d: os.remove(d / CONFIG_FILE),
    "truncated": lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:200]),
    "truncated-tail": lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-16]),
    "garbage": lambda d: (d / WEIGHTS_FILE).write_bytes(os.urandom(512)),
    "empty": lambda d: (d / WEIGHTS_FILE).write_bytes(b""),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_bad_adapter_file_refused(tmp_path, case):
    saved_llama_adapter(tmp_path)
    TAMPERING[case](tmp_path)
    model = M.make_llama()
    before = M.snapshot(model)
    with pytest.raises(Exception) as info:
        MissModel.from_pretrained(model, str(tmp_path))
    assert str(info.value), "the error must say something"
    assert not isinstance(info.value, (AttributeError, KeyError, IndexError)), f"unclear error: {info.value!r}"
    M.assert_unchanged(model, before)
    mm = get_miss_model(M.make_llama(), MissConfig(**LLAMA_QV))
    before = M.snapshot(mm)
    with pytest.raises(Exception) as info:
        mm.load_adapter(str(tmp_path), "loaded")
    assert not isinstance(info.value, (AttributeError, KeyError, IndexError)), f"unclear error: {info.value!r}"
    M.assert_unchanged(mm, before)
    assert set(mm.peft_config) == {"default"}


@pytest.mark.parametrize("case", ["config-r", "config-variant-bat", "missing-layer", "extra-key", "wrong-shape"])
def test_mismatched_adapter_error_is_a_value_error(tmp_path, case):
    saved_llama_adapter(tmp_path)
    TAMPERING[case](tmp_path)
    with pytest.raises(ValueError, match="does not fit|cannot adapt|not found"):
        MissModel.from_pretrained(M.make_llama(), str(tmp_path))


def test_adapter_of_another_model_refused(tmp_path):
    saved_llama_adapter(tmp_path)
    model = M.make_bert()
    before = M.snapshot(model)
    with pytest.raises(ValueError):
        MissModel.from_pretrained(model, str(tmp_path))
    M.assert_unchanged(model, before)


def test_legacy_bin_loads_with_weights_only(tmp_path):
    mm = saved_llama_adapter(tmp_path)
    y = M.run(mm, "llama")
    tensors = load_safetensors(tmp_path / WEIGHTS_FILE)
    os.remove(tmp_path / WEIGHTS_FILE)
    torch.save(tensors, tmp_path / "adapter_model.bin")
    loaded = MissModel.from_pretrained(M.make_llama(), str(tmp_path))
    assert torch.equal(M.run(loaded, "llama"), y)


PICKLE_RAN = []


def _side_effect(value):
    PICKLE_RAN.append(value)
    return torch.zeros(8, 32)


class Payload:
    def __reduce__(self):
        return (_side_effect, ("arbitrary code ran",))


def test_legacy_bin_with_arbitrary_object_refused(tmp_path):
    saved_llama_adapter(tmp_path)
    tensors = load_safetensors(tmp_path / WEIGHTS_FILE)
    os.remove(tmp_path / WEIGHTS_FILE)
    tensors[Q0] = Payload()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    PICKLE_RAN.clear()
    model = M.make_llama()
    before = M.snapshot(model)
    with pytest.raises((pickle.UnpicklingError, RuntimeError, ValueError)):
        MissModel.from_pretrained(model, str(tmp_path))
    assert PICKLE_RAN == [], "the pickle ran code: torch.load without weights_only=True"
    M.assert_unchanged(model, before)
    mm = get_miss_model(M.make_llama(), MissConfig(**LLAMA_QV))
    before = M.snapshot(mm)
    with pytest.raises((pickle.UnpicklingError, RuntimeError, ValueError)):
        mm.load_adapter(str(tmp_path), "loaded")
    assert PICKLE_RAN == []
    M.assert_unchanged(mm, before)
