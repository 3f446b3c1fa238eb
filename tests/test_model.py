"""MissConfig and MissModel / get_miss_model on plain MLPs and small transformers models
(Llama, BERT, OPT, T5 from configs, no downloads): targeting, trainable parameters, adapter
management, merging, unloading, adapter files, a short training run, and bad input (a clear
error and an unchanged model). PEFT (when installed) is the oracle for what gets adapted and
what is trainable.
"""

from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
from torch import nn

from miss_ext import MissConfig, MissLinear, MissModel, get_miss_model
from miss_ext.modules_to_save import ModulesToSaveWrapper

import models as M

# transformers' own deprecation noise when PEFT inspects a model
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def close(a, b, rtol=1e-5, atol_scale=1e-5):
    return torch.allclose(a, b, rtol=rtol, atol=atol_scale * b.abs().max().item())


def make(kind, seed=0):
    if kind == "mlp":
        return M.make_mlp(seed)
    if kind == "mixed":
        torch.manual_seed(seed)
        return M.MixedNet()
    return M.MODEL_FACTORIES[kind](seed)


def block_names(model, adapter="default"):
    return {M.strip(n) for n, _ in model.named_parameters() if n.endswith(f"miss_block.{adapter}")}


def load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def save_safetensors(tensors, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------
# MissConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(r=0), "r"), (dict(r=-3), "r"), (dict(r=2.5), "r"), (dict(r="8"), "r"),
        (dict(mini_r=0), "mini_r"), (dict(mini_r=-1), "mini_r"),
        (dict(miss_dropout=-0.1), "miss_dropout"), (dict(miss_dropout=1.5), "miss_dropout"),
        (dict(init_weights="balance"), "init_weights"), (dict(init_weights="gaussian"), "init_weights"),
        (dict(init_weights=None), "init_weights"),
        (dict(bias="lora_only"), "bias"), (dict(bias=True), "bias"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={v[k]}" for k in v),
)
def test_config_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MissConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(target_modules=r".*\.q_proj", layers_to_transform=0),
        dict(target_modules=r".*\.q_proj", layers_to_transform=[0, 1]),
        dict(target_modules=r".*\.q_proj", layers_pattern="layers"),
        dict(target_modules=r".*\.q_proj", layers_to_transform=[1], layers_pattern="layers"),
    ],
)
def test_config_regex_with_layers_refused(kwargs):
    with pytest.raises(ValueError, match="layers_(to_transform|pattern)"):
        MissConfig(**kwargs)


def test_config_defaults():
    config = MissConfig()
    assert (config.r, config.miss_dropout, config.mini_r, config.init_weights, config.bias) == (64, 0.0, 1, True, "none")
    assert config.target_modules is None and config.modules_to_save is None and config.peft_type == "MISS"
    assert config.variant == "standard"
    assert MissConfig(init_weights="mini").variant == "mini"
    assert MissConfig(init_weights="bat").variant == "bat"
    assert MissConfig(init_weights=False).variant == "standard"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=8, miss_dropout=0.1, mini_r=4, target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"],
             init_weights="mini", layers_to_transform=[0], layers_pattern="layers", bias="MiSS_only",
             modules_to_save=["score"], task_type="CAUSAL_LM"),
        dict(r=4, target_modules=r".*\.(q|v)_proj", exclude_modules=r".*\.layers\.0\..*", init_weights=False,
             bias="all"),
        dict(r=16, target_modules="all-linear", init_weights="bat", modules_to_save=["head"]),
    ],
    ids=["lists", "regex", "all-linear"],
)
def test_config_json_round_trip(tmp_path, kwargs):
    config = MissConfig(**kwargs)
    path = config.save_pretrained(str(tmp_path))
    assert os.path.basename(path) == CONFIG_FILE
    data = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert data["peft_type"] == "MISS"
    for key, value in kwargs.items():
        assert data[key] == value, key
    assert MissConfig.from_pretrained(str(tmp_path)) == config
    assert [p for p in os.listdir(tmp_path) if p != CONFIG_FILE] == [], "temp files left behind"


def test_config_from_dict_ignores_bookkeeping_and_checks_type():
    values = dict(r=8, target_modules=["q"], peft_type="MISS", peft_version="0.21.2",
                  auto_mapping={"base_model_class": "X"}, some_future_field=1)
    assert MissConfig.from_dict(values) == MissConfig(r=8, target_modules=["q"])
    with pytest.raises(ValueError, match="LORA"):
        MissConfig.from_dict(dict(r=8, peft_type="LORA"))
    with pytest.raises(ValueError, match="r"):
        MissConfig.from_dict(dict(r=0, peft_type="MISS"))


def test_config_from_pretrained_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        MissConfig.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------------------
# Targeting: the same modules as PEFT


TARGETING = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),                              # suffixes
    ("llama", dict(target_modules=["model.layers.0.self_attn.q_proj"])),               # exact name
    ("llama", dict(target_modules=["layers.0.self_attn.q_proj", "mlp.down_proj"])),    # dotted suffixes
    ("llama", dict(target_modules=r".*\.layers\.1\.mlp\.(up|down)_proj")),             # regex (full match)
    ("llama", dict(target_modules="all-linear")),                                      # lm_head excluded
    ("llama", dict(target_modules=None)),                                              # PEFT's defaults
    ("llama", dict(target_modules="all-linear", exclude_modules=["q_proj", "model.layers.1.mlp.up_proj"])),
    ("llama", dict(target_modules="all-linear", exclude_modules=r".*\.layers\.0\..*")),
    ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0], layers_pattern="layers")),
    ("llama", dict(target_modules=["q_proj"], layers_to_transform=1)),
    ("bert", dict(target_modules=None)),
    ("bert", dict(target_modules="all-linear")),
    ("bert", dict(target_modules=None, layers_to_transform=[0], layers_pattern="layer")),
    ("opt", dict(target_modules=None)),
    ("opt", dict(target_modules="all-linear")),
    ("t5", dict(target_modules=None)),
    ("t5", dict(target_modules="all-linear")),
    ("t5", dict(target_modules=["q"], layers_to_transform=[1], layers_pattern="block")),
    ("mlp", dict(target_modules=["fc1"], layers_to_transform=[1], layers_pattern="layers")),
    ("mlp", dict(target_modules="all-linear")),
]


@pytest.mark.parametrize("kind, kwargs", TARGETING, ids=[f"{k}-{i}" for i, (k, _) in enumerate(TARGETING)])
def test_targets_match_peft(kind, kwargs):
    base = make(kind)
    config = MissConfig(r=8, **kwargs)
    expected_names = M.miss_layer_names(M.peft_copy(base, config))
    y_base = M.run(base, kind)
    mm = get_miss_model(base, config)
    assert M.miss_layer_names(mm) == expected_names
    if kwargs.get("target_modules") in (None, "all-linear"):
        assert not any(n.endswith("lm_head") for n in expected_names)
    # only the blocks are trainable; a fresh standard adapter leaves the outputs unchanged
    assert M.trainable_names(mm) == {f"{n}.miss_block.default" for n in expected_names}
    assert close(M.run(mm, kind), y_base)
    assert all(isinstance(m, MissLinear) for n, m in mm.model.named_modules() if n in expected_names)


def test_target_none_without_defaults_refused():
    base = M.make_mlp()
    before = M.snapshot(base)
    with pytest.raises(ValueError, match="target_modules"):
        get_miss_model(base, MissConfig(r=8))
    M.assert_unchanged(base, before)


def test_all_linear_resolved_in_saved_config(tmp_path):
    mm = get_miss_model(M.make_llama(), MissConfig(r=8, target_modules="all-linear"))
    mm.save_pretrained(str(tmp_path))
    saved = MissConfig.from_pretrained(str(tmp_path))
    loaded = MissModel.from_pretrained(M.make_llama(), str(tmp_path))
    assert M.miss_layer_names(loaded) == M.miss_layer_names(mm)
    assert "lm_head" not in str(saved.target_modules)


# ---------------------------------------------------------------------------------------
# Trainable parameters: bias modes and modules_to_save, compared with PEFT


BIAS_CASES = [
    (kind, bias, mts)
    for kind, mts_name in (("mlp", "head"), ("bert", "pooler"))
    for bias in ("none", "all", "MiSS_only")
    for mts in (None, [mts_name])
]


@pytest.mark.parametrize("kind, bias, modules_to_save", BIAS_CASES,
                         ids=[f"{k}-{b}-{'mts' if m else 'nomts'}" for k, b, m in BIAS_CASES])
def test_trainable_parameters_match_peft(kind, bias, modules_to_save, capsys):
    base = make(kind)
    targets = ["fc1"] if kind == "mlp" else ["query", "value"]
    config = MissConfig(r=8, target_modules=targets, bias=bias, modules_to_save=modules_to_save)
    theirs = M.peft_copy(base, config)
    ours = get_miss_model(copy.deepcopy(base), config)
    assert M.trainable_names(ours) == M.trainable_names(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    capsys.readouterr()
    ours.print_trainable_parameters()
    printed_ours = capsys.readouterr().out
    theirs.print_trainable_parameters()
    printed_theirs = capsys.readouterr().out
    assert printed_ours == printed_theirs
    if bias == "none" and modules_to_save is None:
        assert M.trainable_names(ours) == {f"{n}.miss_block.default" for n in M.miss_layer_names(ours)}


@pytest.mark.parametrize("kind, config", [
    ("llama", MissConfig(r=8, target_modules="all-linear", init_weights="bat")),
    ("llama", MissConfig(r=8, mini_r=4, target_modules="all-linear", init_weights="mini")),
    ("llama", MissConfig(r=6, target_modules=["q_proj", "down_proj"])),
    ("t5", MissConfig(r=8, target_modules=None)),
    ("opt", MissConfig(r=4, mini_r=2, init_weights="mini", target_modules=None)),
    ("bert", MissConfig(r=8, target_modules=["dense"], modules_to_save=["pooler"])),
    ("bert", MissConfig(r=8, target_modules=["dense"], exclude_modules=["output.dense"], bias="all")),
    ("bert", MissConfig(r=8, target_modules=["query"], layers_to_transform=[1], layers_pattern="layer",
                        modules_to_save=["pooler"], bias="MiSS_only")),
    ("llama", MissConfig(r=8, target_modules=["q_proj"], inference_mode=True)),
], ids=["llama-bat", "llama-mini", "llama-std", "t5", "opt-mini", "bert-dense-pooler", "bert-exclude-bias-all",
        "bert-layers-mts-miss-only", "inference-mode"])
def test_nb_trainable_parameters_match_peft(kind, config):
    base = make(kind)
    theirs = M.peft_copy(base, config)
    ours = get_miss_model(copy.deepcopy(base), config)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert M.trainable_names(ours) == M.trainable_names(theirs)


def test_modules_to_save_is_a_trainable_copy(tmp_path):
    base = M.make_mlp()
    reference = copy.deepcopy(base)
    mm = get_miss_model(base, MissConfig(r=8, target_modules=["fc1"], modules_to_save=["head"]))
    head = mm.model.head
    assert isinstance(head, ModulesToSaveWrapper)
    original, trained = head.original_module, head.modules_to_save["default"]
    assert trained is not original
    assert not any(p.requires_grad for p in original.parameters())
    assert all(p.requires_grad for p in trained.parameters())
    assert "head" not in M.miss_layer_names(mm)  # a module to save is not adapted too
    optimizer = torch.optim.SGD([p for p in mm.parameters() if p.requires_grad], lr=0.1)
    M.forward(mm, "mlp").pow(2).mean().backward()
    optimizer.step()
    assert torch.equal(original.weight, reference.head.weight), "the original must stay frozen"
    assert not torch.equal(trained.weight, reference.head.weight), "the copy must train"
    y = M.run(mm, "mlp")
    with mm.disable_adapter():  # disabled: the original module, exactly the base model
        assert torch.equal(M.run(mm, "mlp"), M.run(reference, "mlp"))
    mm.save_pretrained(str(tmp_path))
    keys = set(load_safetensors(tmp_path / WEIGHTS_FILE))
    assert {"base_model.model.head.weight", "base_model.model.head.bias"} <= keys
    loaded = MissModel.from_pretrained(M.make_mlp(), str(tmp_path))
    assert isinstance(loaded.model.head, ModulesToSaveWrapper)
    assert torch.equal(loaded.model.head.modules_to_save["default"].weight, trained.weight)
    assert close(M.run(loaded, "mlp"), y)
    plain = mm.merge_and_unload()
    assert isinstance(plain.head, nn.Linear) and torch.equal(plain.head.weight, trained.weight)


@pytest.mark.parametrize("bias", ["all", "MiSS_only"])
def test_trained_biases_saved_and_loaded(tmp_path, bias):
    mm = get_miss_model(M.make_mlp(), MissConfig(r=8, target_modules=["fc1", "fc2"], bias=bias))
    M.randomize_blocks(mm, seed=3)
    optimizer = torch.optim.SGD([p for p in mm.parameters() if p.requires_grad], lr=0.1)
    M.forward(mm, "mlp").pow(2).mean().backward()
    optimizer.step()
    y = M.run(mm, "mlp")
    mm.save_pretrained(str(tmp_path))
    loaded = MissModel.from_pretrained(M.make_mlp(), str(tmp_path))
    assert close(M.run(loaded, "mlp"), y)


# ---------------------------------------------------------------------------------------
# Adapters: add / set / delete / disable


LLAMA_QV = dict(r=8, target_modules=["q_proj", "v_proj"])
OTHER = dict(r=4, mini_r=4, init_weights="mini", target_modules=["v_proj", "o_proj"])


def llama_with_two_adapters():
    base = M.make_llama()
    mm = get_miss_model(copy.deepcopy(base), MissConfig(**LLAMA_QV))
    M.randomize_blocks(mm, "default", seed=1)
    mm.add_adapter("other", MissConfig(**OTHER))
    M.randomize_blocks(mm, "other", seed=2)
    return base, mm


def solo_model(base, mm, adapter, config_kwargs):
    """A fresh model with only ``adapter``'s blocks (as "default"): the oracle of set_adapter."""
    solo = get_miss_model(copy.deepcopy(base), MissConfig(**config_kwargs))
    mine = {M.strip(n): p for n, p in mm.named_parameters() if n.endswith(f"miss_block.{adapter}")}
    with torch.no_grad():
        for name, param in solo.named_parameters():
            if name.endswith("miss_block.default"):
                param.copy_(mine[M.strip(name).replace(".default", f".{adapter}")])
    return solo


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
# Training


@pytest.mark.parametrize("init, extra", [(True, dict(miss_dropout=0.1)), ("mini", dict(mini_r=4)), ("bat", {})],
                         ids=["standard-dropout", "mini", "bat"])
def test_training_lowers_the_loss(init, extra):
    torch.manual_seed(0)
    base = M.make_mlp()
    teacher = M.make_mlp(seed=1)
    x = M.mlp_input(batch=64, seed=2)
    with torch.no_grad():
        target = 0.5 * base(x) + 0.5 * teacher(x)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    mm = get_miss_model(base, MissConfig(r=8, target_modules="all-linear", init_weights=init, **extra))
    params = [p for p in mm.parameters() if p.requires_grad]
    assert params and all("miss_block" in n for n, p in mm.named_parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(params, lr=1e-2)

    def eval_loss():
        mm.eval()
        with torch.no_grad():
            return nn.functional.mse_loss(mm(x), target).item()

    initial = eval_loss()
    mm.train()
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(mm(x), target)
        loss.backward()
        optimizer.step()
    final = eval_loss()
    assert final < 0.7 * initial, (initial, final)
    for name, layer in mm.miss_layers():  # the base weights never moved
        assert torch.equal(layer.base_layer.weight, frozen[f"{name}.weight"])


# ---------------------------------------------------------------------------------------
# Bad input: a clear error, the model unchanged


@pytest.mark.parametrize(
    "kind, kwargs, error, words",
    [
        ("llama", dict(target_modules=["nonexistent"]), ValueError, ["nonexistent"]),
        ("llama", dict(target_modules=["q_proj", "nonexistent_proj"], layers_to_transform=[5]), ValueError, []),
        ("llama", dict(target_modules=r"q_proj"), ValueError, ["q_proj"]),  # a regex must match the full name
        ("mixed", dict(target_modules=["embed"]), TypeError, ["embed", "Embedding"]),
        ("mixed", dict(target_modules=["proj", "conv"]), TypeError, ["conv", "Conv1d"]),
        ("mixed", dict(target_modules=r".*"), TypeError, []),
        ("llama", dict(target_modules=["embed_tokens", "q_proj"]), TypeError, ["embed_tokens"]),
        ("llama", dict(target_modules="all-linear", r=48), ValueError, ["48", "32"]),     # r > in_features
        ("mlp", dict(target_modules="all-linear", r=24), ValueError, ["proj_in", "24", "16"]),
        ("llama", dict(target_modules="all-linear", r=32, init_weights="bat"), ValueError, ["k_proj"]),
        ("llama", dict(target_modules="all-linear", r=6, init_weights="bat"), ValueError, []),
        ("llama", dict(target_modules="all-linear", r=8, mini_r=32, init_weights="mini"), ValueError, ["mini_r"]),
        ("llama", dict(target_modules=["q_proj"], modules_to_save=["nonexistent_head"]), ValueError,
         ["nonexistent_head"]),
    ],
    ids=["unknown", "no-layer", "regex-no-fullmatch", "embedding", "conv1d-after-linear", "regex-everything",
         "embedding-llama", "r>in", "r>in-first-layer", "bat-out%r", "bat-in%r", "mini-out%mini_r",
         "unknown-modules_to_save"],
)
def test_bad_config_leaves_model_unchanged(kind, kwargs, error, words):
    model = make(kind)
    model.train()
    before = M.snapshot(model)
    config = MissConfig(**{"r": 8, **kwargs})
    with pytest.raises(error) as info:
        get_miss_model(model, config)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    M.assert_unchanged(model, before)
    # the same config added to an adapted model changes nothing either
    mm = get_miss_model(make(kind), MissConfig(r=2, target_modules=["proj"] if kind == "mixed" else
                                               (["fc2"] if kind == "mlp" else ["v_proj"])))
    before = M.snapshot(mm)
    with pytest.raises(error):
        mm.add_adapter("second", config)
    M.assert_unchanged(mm, before)
    assert set(mm.peft_config) == {"default"} and mm.active_adapters == ["default"]


def saved_llama_adapter(directory, **kwargs):
    mm = get_miss_model(M.make_llama(), MissConfig(**{**LLAMA_QV, **kwargs}))
    M.randomize_blocks(mm, seed=11)
    mm.save_pretrained(str(directory))
    return mm


def edit_config(directory, **changes):
    path = directory / CONFIG_FILE
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(directory, fn):
    path = directory / WEIGHTS_FILE
    tensors = load_safetensors(path)
    fn(tensors)
    save_safetensors(tensors, path)


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
