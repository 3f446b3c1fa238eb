"""PEFT's model API on a MissModel (issue 16), each item against PEFT's own MiSS model on the
same base model and config: what works works as in PEFT, and what PEFT does not do on such a
model raises (PEFT's error where there is one).

- ``isinstance(model, peft.PeftModel)`` (what Trainer, TRL and accelerate check), kept through
  deepcopy and pickle; every public member of PeftModel is miss_ext's but a listed few;
- ``base_model`` is the tuner and ``base_model.model`` the wrapped model: state dict keys
  are PEFT's; ``peft_type``; ``set_requires_grad``; ``active_peft_config``...;
- ``save_pretrained`` with PEFT's signature (``safe_serialization``, ``state_dict=``,
  ``is_main_process``), ``load_adapter`` into an existing adapter;
- ``push_to_hub`` pushes the adapter (a fake Hub records the upload), and offline fails with
  huggingface_hub's error, as PEFT's does;
- ``get_peft_config_as_dict`` (not in PEFT 0.21) and ``peft.get_peft_model_state_dict``
  (PEFT finds adapters by its layer classes) raise.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from miss_ext import MissConfig, MissModel, get_miss_model

import models as M

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

CONFIG = dict(r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])


def pair():
    """(ours, PEFT's): the same base model, config and block values."""
    ours = get_miss_model(M.make_llama(), MissConfig(**CONFIG))
    M.randomize_blocks(ours, seed=2)
    theirs = peft.get_peft_model(M.make_llama(), peft.MissConfig(**CONFIG))
    M.randomize_blocks(theirs, seed=2)
    return ours, theirs


def test_a_miss_model_is_a_peft_model_whose_api_is_miss_ext():
    from miss_ext.trainer_support import INHERITED_FROM_PEFT, PeftMissModel

    ours, _ = pair()
    assert isinstance(ours, peft.PeftModel) and isinstance(ours, MissModel) and type(ours) is PeftMissModel
    for copied in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(copied) is PeftMissModel
        assert torch.equal(M.run(copied, "llama"), M.run(ours, "llama"))
    members = {n for n in dir(peft.PeftModel) if not n.startswith("_") and not hasattr(torch.nn.Module, n)}
    assert set(INHERITED_FROM_PEFT) <= members, "a member PEFT no longer has: update INHERITED_FROM_PEFT"
    for name in sorted(members - set(INHERITED_FROM_PEFT)):
        owner = next(c for c in type(ours).__mro__ if name in vars(c))
        assert owner.__module__.startswith("miss_ext"), f"PeftModel.{name} is PEFT's on a MissModel ({owner})"
    for name in ("get_prompt", "get_prompt_embedding_to_save"):  # prompt learning: fails as on PEFT's MiSS
        with pytest.raises(AttributeError):
            getattr(ours, name)("default") if name.endswith("save") else getattr(ours, name)(1)


def test_base_model_is_the_tuner_and_the_layout_is_peft_s():
    from miss_ext.tuner import MissTuner

    ours, theirs = pair()
    assert isinstance(ours.base_model, MissTuner) and ours.base_model.model is ours.get_base_model() is ours.model
    assert type(ours.base_model.model) is type(theirs.base_model.model)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert ours.peft_type == theirs.peft_type == peft.PeftType.MISS
    assert ours.active_adapter == theirs.active_adapter and ours.active_adapters == theirs.active_adapters
    assert ours.active_peft_config is ours.peft_config["default"]
    assert ours.modules_to_save == theirs.modules_to_save == {"lm_head"}
    assert ours.base_model_torch_dtype == theirs.base_model_torch_dtype == torch.float32
    assert ours.supports_lora_conversion() and theirs.supports_lora_conversion()
    assert ours.has_active_enabled_adapter
    with ours.disable_adapter():
        assert not ours.has_active_enabled_adapter
    # the tuner's own API, as PEFT's tuner has it
    merged = copy.deepcopy(ours)
    plain = merged.base_model.merge_and_unload()
    torch.testing.assert_close(M.run(plain, "llama"), M.run(ours, "llama"), rtol=1e-5, atol=1e-6)


def test_set_requires_grad_as_peft():
    ours, theirs = pair()
    for requires_grad in (False, True):
        ours.set_requires_grad("default", requires_grad=requires_grad)
        theirs.set_requires_grad("default", requires_grad=requires_grad)
        assert M.trainable_names(ours) == M.trainable_names(theirs)
        assert bool(M.trainable_names(ours)) is requires_grad
    # deliberately unlike PEFT, which ignores it: a name the model does not have
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        ours.set_requires_grad("nope")
    with pytest.raises(TypeError, match="requires_grad must be a bool"):
        ours.set_requires_grad("default", requires_grad="yes")


def test_save_pretrained_takes_peft_s_arguments(tmp_path):
    ours, _ = pair()
    tokens = M.token_input()
    expected = M.run(ours.eval(), "llama", tokens)
    ours.save_pretrained(str(tmp_path), safe_serialization=True)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]

    # PEFT's pickle-free .bin, which replaces the safetensors file rather than hiding behind it
    ours.save_pretrained(str(tmp_path), safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.bin"]
    for loaded in (peft.PeftModel.from_pretrained(M.make_llama(), str(tmp_path)),
                   MissModel.from_pretrained(M.make_llama(), str(tmp_path))):
        torch.testing.assert_close(M.run(loaded, "llama", tokens), expected, rtol=1e-5, atol=1e-6)

    # state_dict= (Trainer passes the whole model's under DeepSpeed/FSDP): its values are saved
    state = {k: v * 2 if ".miss_block." in k else v for k, v in ours.state_dict().items()}
    ours.save_pretrained(str(tmp_path / "given"), state_dict=state)
    saved = load_file(str(tmp_path / "given" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.miss_block"
    assert torch.equal(saved[key], 2 * ours.state_dict()[key + ".default"])
    with pytest.raises(ValueError, match="state_dict has no entry"):
        ours.save_pretrained(str(tmp_path / "partial"), state_dict={})

    ours.save_pretrained(str(tmp_path / "not_main"), is_main_process=False, max_shard_size="5GB")
    assert not (tmp_path / "not_main").exists()
    with pytest.raises(ValueError, match="save_embedding_layers must be 'auto' or False, got True"):
        ours.save_pretrained(str(tmp_path / "emb"), save_embedding_layers=True)
    with pytest.raises(ValueError, match="path_initial_model_for_weight_conversion .* must be None"):
        ours.save_pretrained(str(tmp_path / "pissa"), path_initial_model_for_weight_conversion=str(tmp_path))
    with pytest.raises(ValueError, match="must be a directory"):
        ours.save_pretrained(str(tmp_path / "adapter_model.bin"))


def test_load_adapter_takes_peft_s_arguments(tmp_path):
    ours, _ = pair()
    ours.save_pretrained(str(tmp_path))
    other = get_miss_model(M.make_llama(), MissConfig(**CONFIG))
    result = other.load_adapter(str(tmp_path), "default", is_trainable=True, torch_device="cpu")
    assert result.missing_keys == [] and result.unexpected_keys == [] and other.training
    assert torch.equal(M.run(other, "llama"), M.run(ours, "llama"))
    with pytest.raises(TypeError, match=r"does not support \['revision'\]"):
        other.load_adapter(str(tmp_path), "default", revision="main")
    with pytest.raises(ValueError, match="autocast_adapter_dtype must be True"):
        other.load_adapter(str(tmp_path), "default", autocast_adapter_dtype=False)


def test_push_to_hub_uploads_the_adapter(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    ours, _ = pair()
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = (repo_id, kwargs)
        shutil.copytree(folder_path, tmp_path / "pushed")
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert ours.push_to_hub("me/adapter", private=True, commit_message="trained") == "commit"
    assert calls["create_repo"] == ("me/adapter", {"private": True, "token": None, "exist_ok": True})
    assert calls["upload_folder"][1]["commit_message"] == "trained"
    assert sorted(os.listdir(tmp_path / "pushed")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "library_name: peft" in (tmp_path / "pushed" / "README.md").read_text()
    pushed = peft.PeftModel.from_pretrained(M.make_llama(), str(tmp_path / "pushed"))
    torch.testing.assert_close(M.run(pushed, "llama"), M.run(ours.eval(), "llama"), rtol=1e-5, atol=1e-6)


def test_push_to_hub_offline_fails_with_huggingface_hub_s_error_as_peft(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ours, theirs = pair()
    errors = []
    for model in (ours, theirs):
        with pytest.raises(huggingface_hub.errors.OfflineModeIsEnabled, match="offline mode is enabled") as info:
            model.push_to_hub("me/adapter")
        errors.append(str(info.value))
    assert errors[0] == errors[1]


def test_what_peft_does_not_do_on_a_miss_model_raises():
    ours, theirs = pair()
    for model in (ours, theirs):  # not in PEFT 0.21: both raise transformers' AttributeError
        with pytest.raises(AttributeError, match="'LlamaForCausalLM' object has no attribute 'get_peft_config_as_dict'"):
            model.get_peft_config_as_dict()
    assert set(peft.get_peft_model_state_dict(theirs)) == set(ours.adapter_state_dict("default"))
    # PEFT finds adapter tensors by its own layer classes: on ours it would return {}; it stops
    with pytest.raises(AttributeError, match=r"not a peft.PeftConfig.*MissModel.adapter_state_dict"):
        peft.get_peft_model_state_dict(ours)
    with pytest.raises(AttributeError, match="not a peft.PeftConfig"):
        peft.set_peft_model_state_dict(ours, ours.adapter_state_dict("default"))


WITHOUT_PEFT = r"""
import sys
sys.modules["peft"] = None  # as if PEFT were not installed
sys.path.insert(0, sys.argv[1])
import torch
import models as M
from miss_ext import MissConfig, MissModel, get_miss_model
mm = get_miss_model(M.make_mlp(), MissConfig(r=8, target_modules=["fc1"]))
M.randomize_blocks(mm)
assert type(mm) is MissModel and "peft" not in str(type(mm).__mro__), type(mm).__mro__
assert mm.base_model.model is mm.model and mm.peft_type == "MISS"
mm.save_pretrained(sys.argv[2])
again = MissModel.from_pretrained(M.make_mlp(), sys.argv[2])
assert torch.equal(M.run(again, "mlp"), M.run(mm.eval(), "mlp"))
print("plain")
"""


def test_without_peft_a_miss_model_is_a_plain_module(tmp_path):
    """miss_ext needs no PEFT: without it a MissModel is a plain nn.Module (with PEFT's layout
    and files all the same)."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", WITHOUT_PEFT, tests, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "plain", done.stderr[-3000:]
