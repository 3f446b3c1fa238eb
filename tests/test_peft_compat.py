"""miss_ext against Hugging Face PEFT (the reference implementation of MiSS): the same config
fields and validation, config and adapter files that move both ways, and, with the same base
weights and the same random (non-zero) blocks, the same outputs, block gradients and merged
weights for every variant, in float32 and on a bfloat16 model.

PEFT paths not used here on purpose: r > in_features (PEFT refuses it) and mini unmerge with
bf16 adapter weights on CPU (PEFT crashes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch

from miss_ext import MissConfig, MissModel, get_miss_model

import models as M

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

# transformers' own deprecation noise when PEFT inspects a model
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BOOKKEEPING = {"auto_mapping", "peft_version"}  # PEFT's own fields, not MiSS settings

VARIANTS = {
    "standard": dict(init_weights=True),
    "mini": dict(init_weights="mini", mini_r=4),
    "bat": dict(init_weights="bat"),
}


def assert_close(ours, theirs, rel=1e-5, what=""):
    ours, theirs = ours.detach().double(), theirs.detach().double()
    assert ours.shape == theirs.shape, what
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"{what}: max error {err:.3e} > {rel:.1e} * {scale:.3e}"


def peft_config_values(config: MissConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(peft.MissConfig)
            if f.name not in BOOKKEEPING | {"peft_type"}}


def normalized(values: dict) -> dict:
    """Lists and sets compare as sets (PEFT keeps name lists as sets)."""
    return {k: (set(v) if isinstance(v, (list, set, tuple)) else v) for k, v in values.items()}


# ---------------------------------------------------------------------------------------
# Config


def test_config_fields_and_defaults_are_peft_s():
    ours = {f.name for f in dataclasses.fields(MissConfig)}
    theirs = {f.name for f in dataclasses.fields(peft.MissConfig)}
    assert theirs - BOOKKEEPING <= ours, f"missing PEFT fields: {sorted(theirs - BOOKKEEPING - ours)}"
    assert ours <= theirs, f"fields PEFT does not have: {sorted(ours - theirs)}"
    default_ours, default_theirs = MissConfig(), peft.MissConfig()
    for name in sorted(theirs - BOOKKEEPING):
        assert getattr(default_ours, name) == getattr(default_theirs, name), name


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=r".*\.q_proj", layers_to_transform=0),
    dict(target_modules=r".*\.q_proj", layers_pattern="layers"),
    dict(target_modules="all-linear", layers_to_transform=[1]),
])
def test_config_validation_like_peft(kwargs):
    with pytest.raises(ValueError) as theirs:
        peft.MissConfig(**kwargs)
    with pytest.raises(ValueError) as ours:
        MissConfig(**kwargs)
    assert str(ours.value) == str(theirs.value)


CONFIGS = [
    dict(r=8, target_modules=["q_proj", "v_proj"]),
    dict(r=16, miss_dropout=0.05, mini_r=4, init_weights="mini", target_modules=["fc1", "fc2"],
         exclude_modules=["layers.0.fc1"], layers_to_transform=[0, 1], layers_pattern="layers", bias="MiSS_only",
         modules_to_save=["head"], task_type="CAUSAL_LM"),
    dict(r=4, init_weights="bat", target_modules=r".*\.(q|v)_proj", exclude_modules=r".*\.layers\.0\..*",
         bias="all"),
    dict(r=2, init_weights=False, target_modules="all-linear"),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=["basic", "mini-everything", "bat-regex", "random-all-linear"])
def test_config_written_here_loads_in_peft(tmp_path, kwargs):
    MissConfig(**kwargs).save_pretrained(str(tmp_path))
    loaded = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, peft.MissConfig)
    assert loaded.peft_type == "MISS"
    expected = normalized(peft_config_values(MissConfig(**kwargs)))
    assert normalized(peft_config_values(loaded)) == expected


@pytest.mark.parametrize("kwargs", CONFIGS, ids=["basic", "mini-everything", "bat-regex", "random-all-linear"])
def test_config_written_by_peft_loads_here(tmp_path, kwargs):
    peft.MissConfig(**kwargs).save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert "peft_version" in data  # PEFT's bookkeeping keys are there and must be ignored
    loaded = MissConfig.from_pretrained(str(tmp_path))
    assert normalized(peft_config_values(loaded)) == normalized(peft_config_values(MissConfig(**kwargs)))


# ---------------------------------------------------------------------------------------
# The same numbers as PEFT


def make_pair(kind, config, dtype=torch.float32, seed=0):
    """(base, ours, theirs): the same base model, the same random non-zero blocks."""
    base = M.make_llama(dtype=dtype) if kind == "llama" else M.make_mlp(dtype=dtype)
    base.eval()
    theirs = M.peft_copy(base, config)
    ours = get_miss_model(copy.deepcopy(base), config)
    M.randomize_blocks(ours, seed=seed)
    M.copy_blocks_to_peft(ours, theirs)
    return base, ours, theirs


def blocks(model):
    return {M.strip(n): p for n, p in model.named_parameters() if ".miss_block." in n}


def base_weights(model):
    return {M.strip(n): p.detach().clone() for n, p in model.named_parameters()
            if n.endswith("base_layer.weight")}


ORACLE_CASES = [(kind, variant) for kind in ("llama", "mlp") for variant in VARIANTS]


@pytest.mark.parametrize("kind, variant", ORACLE_CASES, ids=[f"{k}-{v}" for k, v in ORACLE_CASES])
def test_outputs_grads_and_merge_match_peft(kind, variant):
    # r = 8 divides every in/out of these models (bat); for standard/mini on the MLP r = 6
    # leaves a tail shard (in % r != 0)
    r = 6 if (kind == "mlp" and variant != "bat") else 8
    config = MissConfig(r=r, target_modules="all-linear", **VARIANTS[variant])
    base, ours, theirs = make_pair(kind, config)
    assert M.miss_layer_names(ours) == M.miss_layer_names(theirs)
    assert blocks(ours).keys() == blocks(theirs).keys()
    inputs = M.mlp_input() if kind == "mlp" else M.token_input()

    y_ours, y_theirs = M.forward(ours, kind, inputs), M.forward(theirs, kind, inputs)
    assert_close(y_ours, y_theirs, what="output")
    assert not torch.allclose(y_theirs, M.run(base, kind, inputs)), "the adapter must change the output"
    g = torch.randn(y_theirs.shape, generator=torch.Generator().manual_seed(5))
    (y_ours * g).sum().backward()
    (y_theirs * g).sum().backward()
    theirs_blocks = blocks(theirs)
    for name, param in blocks(ours).items():
        assert param.grad is not None, name
        assert_close(param.grad, theirs_blocks[name].grad, rel=1e-4, what=f"grad {name}")

    w0 = base_weights(ours)
    ours.merge_adapter()
    theirs.merge_adapter()
    merged_theirs = base_weights(theirs)
    for name, w in base_weights(ours).items():
        assert_close(w, merged_theirs[name], what=f"merged {name}")
        assert not torch.equal(w, w0[name])
    assert_close(M.run(ours, kind, inputs), M.run(theirs, kind, inputs), rel=1e-4, what="merged output")
    assert_close(M.run(ours, kind, inputs), y_theirs, rel=1e-4, what="merged vs unmerged output")
    ours.unmerge_adapter()
    theirs.unmerge_adapter()
    for name, w in base_weights(ours).items():
        assert_close(w, w0[name], rel=1e-5, what=f"unmerged {name}")

    plain_ours, plain_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert_close(M.run(plain_ours, kind, inputs), M.run(plain_theirs, kind, inputs), rel=1e-4, what="unloaded")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_model_matches_peft(variant):
    config = MissConfig(r=8, target_modules="all-linear", **VARIANTS[variant])
    base, ours, theirs = make_pair("llama", config, dtype=torch.bfloat16)
    for name, param in blocks(ours).items():
        assert param.dtype == torch.float32, f"{name}: PEFT keeps fp32 adapters on a bf16 model"
        assert blocks(theirs)[name].dtype == torch.float32
    # the float32 oracle: PEFT on a float32 copy of the same (bf16-valued) weights and blocks
    oracle = M.peft_copy(base.float(), config)
    M.copy_blocks_to_peft(ours, oracle)
    tokens = M.token_input()
    y_ours = M.forward(ours, "llama", tokens)
    y_theirs = M.forward(theirs, "llama", tokens)
    y_oracle = M.forward(oracle, "llama", tokens)
    assert y_ours.dtype == y_theirs.dtype == torch.bfloat16
    err_ours = M.relative_error(y_ours, y_oracle)
    err_theirs = M.relative_error(y_theirs, y_oracle)
    assert err_ours <= 2 * err_theirs + 4e-3, (err_ours, err_theirs)
    assert M.relative_error(y_ours, y_theirs) < 3e-2

    g = torch.randn(y_oracle.shape, generator=torch.Generator().manual_seed(6))
    (y_ours.float() * g).sum().backward()
    (y_theirs.float() * g).sum().backward()
    (y_oracle * g).sum().backward()
    theirs_blocks, oracle_blocks = blocks(theirs), blocks(oracle)
    for name, param in blocks(ours).items():
        assert param.grad.dtype == torch.float32
        e_ours = M.relative_error(param.grad, oracle_blocks[name].grad)
        e_theirs = M.relative_error(theirs_blocks[name].grad, oracle_blocks[name].grad)
        assert e_ours <= 2 * e_theirs + 1e-2, (name, e_ours, e_theirs)

    ours.merge_adapter()
    theirs.merge_adapter()
    merged_theirs = base_weights(theirs)
    for name, w in base_weights(ours).items():
        assert w.dtype == torch.bfloat16
        diff = (w.float() - merged_theirs[name].float()).abs()
        ulp = torch.finfo(torch.bfloat16).eps * merged_theirs[name].float().abs().clamp_min(1e-3)
        assert (diff <= 2 * ulp).all(), f"merged {name}: {diff.max().item():.3e}"


# ---------------------------------------------------------------------------------------
# Adapter files both ways


FILE_CASES = [(kind, variant) for kind in ("llama", "mlp") for variant in VARIANTS]


@pytest.mark.parametrize("kind, variant", FILE_CASES, ids=[f"{k}-{v}" for k, v in FILE_CASES])
def test_saved_here_loads_in_peft(tmp_path, kind, variant):
    r = 6 if (kind == "mlp" and variant != "bat") else 8
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["fc1", "fc2", "proj_in"]
    config = MissConfig(r=r, target_modules=targets, **VARIANTS[variant])
    base = M.make_llama() if kind == "llama" else M.make_mlp()
    ours = get_miss_model(copy.deepcopy(base), config)
    M.randomize_blocks(ours, seed=21)
    y = M.run(ours, kind)
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert M.miss_layer_names(theirs) == M.miss_layer_names(ours)
    assert_close(M.run(theirs, kind), y, what="PEFT loading our adapter")


@pytest.mark.parametrize("kind, variant", FILE_CASES, ids=[f"{k}-{v}" for k, v in FILE_CASES])
def test_saved_by_peft_loads_here(tmp_path, kind, variant):
    r = 6 if (kind == "mlp" and variant != "bat") else 8
    targets = ["q_proj", "v_proj", "down_proj"] if kind == "llama" else ["fc1", "fc2", "proj_in"]
    values = dict(r=r, target_modules=targets, **VARIANTS[variant])
    base = M.make_llama() if kind == "llama" else M.make_mlp()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.MissConfig(**values))
    M.randomize_blocks(theirs, seed=22)
    y = M.run(theirs, kind)
    theirs.save_pretrained(str(tmp_path))
    ours = MissModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert ours.peft_config["default"].variant == variant
    assert M.miss_layer_names(ours) == M.miss_layer_names(theirs)
    assert_close(M.run(ours, kind), y, what="our loading of PEFT's adapter")


def test_bf16_model_files_both_ways(tmp_path):
    base = M.make_llama(dtype=torch.bfloat16)
    config = MissConfig(r=8, target_modules="all-linear", init_weights="bat")
    ours = get_miss_model(copy.deepcopy(base), config)
    M.randomize_blocks(ours, seed=23)
    y = M.run(ours, "llama")
    ours.save_pretrained(str(tmp_path / "ours"))
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(tmp_path / "ours" / WEIGHTS_FILE)).values()} == {torch.float32}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    assert all(p.dtype == torch.float32 for n, p in theirs.named_parameters() if "miss_block" in n)
    assert M.relative_error(M.run(theirs, "llama"), y) < 3e-2
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = MissModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs"))
    assert all(p.dtype == torch.float32 for n, p in back.named_parameters() if "miss_block" in n)
    assert torch.equal(M.run(back, "llama"), y)


def test_non_default_adapter_directories_both_ways(tmp_path):
    base = M.make_llama()
    ours = get_miss_model(copy.deepcopy(base), MissConfig(r=8, target_modules=["q_proj"]))
    ours.add_adapter("other", MissConfig(r=4, mini_r=4, init_weights="mini", target_modules=["v_proj"]))
    M.randomize_blocks(ours, "default", seed=1)
    M.randomize_blocks(ours, "other", seed=2)
    ours.set_adapter("other")
    y_other = M.run(ours, "llama")
    ours.save_pretrained(str(tmp_path / "ours"))
    assert os.path.isfile(tmp_path / "ours" / "other" / WEIGHTS_FILE)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    theirs.load_adapter(str(tmp_path / "ours" / "other"), adapter_name="other")
    theirs.set_adapter("other")
    assert_close(M.run(theirs, "llama"), y_other)
    # and back: PEFT writes "other" under a subdirectory, we read it from there
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert os.path.isfile(tmp_path / "theirs" / "other" / WEIGHTS_FILE)
    back = MissModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs"))
    back.load_adapter(str(tmp_path / "theirs" / "other"), "other")
    back.set_adapter("other")
    assert_close(M.run(back, "llama"), y_other)


@pytest.mark.parametrize("bias", ["none", "all", "MiSS_only"])
def test_bias_and_modules_to_save_files_both_ways(tmp_path, bias):
    base = M.make_mlp()
    values = dict(r=8, target_modules=["fc1", "fc2"], bias=bias, modules_to_save=["head"])

    def train_step(model):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        M.forward(model, "mlp").pow(2).mean().backward()
        optimizer.step()

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.MissConfig(**values))
    M.randomize_blocks(theirs, seed=31)
    train_step(theirs)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    ours = MissModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs"))
    assert_close(M.run(ours, "mlp"), M.run(theirs, "mlp"), what="ours loading PEFT")

    ours = get_miss_model(copy.deepcopy(base), MissConfig(**values))
    M.randomize_blocks(ours, seed=32)
    train_step(ours)
    ours.save_pretrained(str(tmp_path / "ours"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    assert_close(M.run(loaded, "mlp"), M.run(ours, "mlp"), what="PEFT loading ours")


def test_same_file_keys_as_peft(tmp_path):
    from safetensors.torch import load_file

    base = M.make_llama()
    config = MissConfig(r=8, target_modules="all-linear", init_weights="bat")
    get_miss_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path / "ours"))
    M.peft_copy(base, config).save_pretrained(str(tmp_path / "theirs"))
    ours = load_file(str(tmp_path / "ours" / WEIGHTS_FILE))
    theirs = load_file(str(tmp_path / "theirs" / WEIGHTS_FILE))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    ours_json = json.loads((tmp_path / "ours" / CONFIG_FILE).read_text())
    theirs_json = json.loads((tmp_path / "theirs" / CONFIG_FILE).read_text())
    for key in set(theirs_json) - BOOKKEEPING:
        assert key in ours_json, key
        if key == "base_model_name_or_path":  # a model built from a config has no name: "" or None
            assert not ours_json[key] and not theirs_json[key]
        elif key != "target_modules":
            assert ours_json[key] == theirs_json[key], key
    assert set(ours_json["target_modules"]) == set(theirs_json["target_modules"])


# ---------------------------------------------------------------------------------------
# Several adapters, as PEFT manages them


@pytest.mark.filterwarnings("ignore:Already unmerged")
def test_multiple_adapters_like_peft():
    base = M.make_llama()
    first = MissConfig(r=8, target_modules=["q_proj", "v_proj"])
    second = MissConfig(r=4, target_modules=["v_proj", "o_proj"], init_weights=False)
    ours = get_miss_model(copy.deepcopy(base), first)
    ours.add_adapter("second", second)
    theirs = M.peft_copy(base, first)
    theirs.add_adapter("second", peft.MissConfig(r=4, target_modules=["v_proj", "o_proj"], init_weights=False))
    for adapter, seed in (("default", 1), ("second", 2)):
        M.randomize_blocks(ours, adapter, seed=seed)
        M.copy_blocks_to_peft(ours, theirs, adapter)
    assert M.trainable_names(ours) == M.trainable_names(theirs)
    assert ours.active_adapters == theirs.active_adapters == ["default"]
    assert_close(M.run(ours, "llama"), M.run(theirs, "llama"), what="default")
    ours.set_adapter("second")
    theirs.set_adapter("second")
    assert M.trainable_names(ours) == M.trainable_names(theirs)
    assert_close(M.run(ours, "llama"), M.run(theirs, "llama"), what="second")
    ours.set_adapter(["default", "second"])
    theirs.base_model.set_adapter(["default", "second"])
    assert M.trainable_names(ours) == M.trainable_names(theirs)
    assert_close(M.run(ours, "llama"), M.run(theirs, "llama"), what="both")
    with ours.disable_adapter(), theirs.disable_adapter():
        assert torch.equal(M.run(ours, "llama"), M.run(base, "llama"))
        assert_close(M.run(ours, "llama"), M.run(theirs, "llama"), what="disabled")
    ours.merge_adapter(["second"])
    theirs.merge_adapter(["second"])
    for name, w in base_weights(theirs).items():
        assert_close(base_weights(ours)[name], w, what=f"merged second {name}")
    ours.unmerge_adapter()
    theirs.unmerge_adapter()
    ours.delete_adapter("default")
    theirs.delete_adapter("default")
    assert ours.active_adapters == list(theirs.active_adapters) == ["second"]
    assert M.trainable_names(ours) == M.trainable_names(theirs)
    assert_close(M.run(ours, "llama"), M.run(theirs, "llama"), what="after delete")
