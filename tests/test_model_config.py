"""MissConfig and what get_miss_model adapts and trains, on plain MLPs and small transformers
models (Llama, BERT, OPT, T5 from configs, no downloads): the config's fields and files,
targeting, trainable parameters (bias modes, modules_to_save). PEFT (when installed) is the
oracle for what gets adapted and what is trainable.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from miss_ext import MissConfig, MissLinear, MissModel, get_miss_model
from miss_ext.modules_to_save import ModulesToSaveWrapper

import models as M
from model_helpers import (CONFIG_FILE, WEIGHTS_FILE, close, load_safetensors, make)

# transformers' own deprecation noise when PEFT inspects a model
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


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
