"""Exact LoRA export (docs/spec.md sec. 8): a standard or mini MiSS adapter written as a PEFT LoRA
adapter gives, loaded by PEFT on the un-adapted base model, the MiSS adapter's outputs; its
factors multiply to the MiSS delta exactly; BAT without a rank is refused with a clear error
(its truncated-SVD export: tests/test_export_svd.py).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import miss_ext
from miss_ext import MissConfig, export_lora, get_miss_model
from miss_ext.export import lora_adapter, lora_factors

import models as M

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

CASES = {
    "standard": dict(r=8, init_weights=True),
    "standard-tail": dict(r=5, init_weights=True),  # in % r != 0 on every layer
    "mini": dict(r=8, init_weights="mini", mini_r=4),
    "mini-1": dict(r=6, init_weights="mini", mini_r=1),
    "random": dict(r=4, init_weights=False, miss_dropout=0.1),
}


def assert_close(ours, theirs, rel=1e-5, what=""):
    ours, theirs = ours.detach().double(), theirs.detach().double()
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"{what}: max error {err:.3e} > {rel:.1e} * {scale:.3e}"


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_the_exported_lora_and_computes_the_miss_outputs(case, tmp_path):
    base = M.make_llama()
    fresh = copy.deepcopy(base)
    model = get_miss_model(base, MissConfig(target_modules="all-linear", **CASES[case]))
    M.randomize_blocks(model)
    tokens = M.token_input()
    expected = M.run(model.eval(), "llama", tokens)
    assert not torch.allclose(expected, M.run(fresh, "llama", tokens))

    assert export_lora(model, str(tmp_path)) == str(tmp_path)
    lora = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    assert isinstance(lora.peft_config["default"], peft.LoraConfig)
    assert_close(M.run(lora, "llama", tokens), expected, what=case)

    # PEFT's LoRA merge gives the MiSS merge
    merged_lora = lora.merge_and_unload()
    merged_miss = model.merge_and_unload()
    for (name, a), (_, b) in zip(merged_lora.named_parameters(), merged_miss.named_parameters()):
        assert_close(a, b, rel=1e-6, what=f"merged {name}")


def test_file_layout_is_peft_s(tmp_path):
    model = get_miss_model(M.make_llama(), MissConfig(r=8, target_modules=["q_proj", "v_proj"], miss_dropout=0.05))
    export_lora(model, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == config["lora_alpha"] == 8 and not config["use_rslora"] and not config["use_dora"]
    assert config["lora_dropout"] == 0.05
    layers = sorted(name for name, _ in model.miss_layers())
    assert sorted(config["target_modules"]) == layers
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    expected = {f"base_model.model.{n}.lora_{f}.weight" for n in layers for f in "AB"}
    assert set(tensors) == expected
    # PEFT's own LoRA of this shape saves the same keys and shapes
    theirs = peft.get_peft_model(M.make_llama(), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    their_tensors = peft.get_peft_model_state_dict(theirs)
    assert {k: tuple(v.shape) for k, v in their_tensors.items()} == {k: tuple(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize("case", ["standard-tail", "mini", "mini-1"])
def test_factors_multiply_to_the_miss_delta_exactly(case):
    model = get_miss_model(M.make_mlp(), MissConfig(target_modules=["fc1", "fc2"], **CASES[case]))
    M.randomize_blocks(model)
    for _, layer in model.miss_layers():
        lora_a, lora_b = lora_factors(layer.miss_block["default"], layer.in_features, layer.out_features)
        assert lora_a.shape == (layer.miss_r["default"], layer.in_features)
        assert lora_b.shape == (layer.out_features, layer.miss_r["default"])
        assert set(lora_a.unique().tolist()) == {0.0, 1.0} and (lora_a.sum(0) == 1).all()
        # each output is a single product (one 1 per column of lora_A): exact in float32
        assert torch.equal(lora_b @ lora_a, layer.get_delta_weight("default"))


@pytest.mark.parametrize("bias", ["none", "MiSS_only", "all"])
def test_bias_and_modules_to_save_export_as_in_the_miss_config(bias, tmp_path):
    base = M.make_mlp()
    fresh = copy.deepcopy(base)
    config = MissConfig(r=6, target_modules=["fc1", "fc2"], bias=bias, modules_to_save=["head"])
    model = get_miss_model(base, config)
    M.randomize_blocks(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and not name.endswith("miss_block.default"):
                param.add_(0.25)  # trained biases and head copy
    x = M.mlp_input()
    expected = M.run(model.eval(), "mlp", x)
    export_lora(model, str(tmp_path))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["bias"] == {"none": "none", "MiSS_only": "lora_only", "all": "all"}[bias]
    assert written["modules_to_save"] == ["head"]
    lora = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    assert_close(M.run(lora, "mlp", x), expected, what=bias)


def test_blocks_export_in_their_dtype_on_a_bf16_model(tmp_path):
    base = M.make_llama(dtype=torch.bfloat16)
    fresh = copy.deepcopy(base)
    model = get_miss_model(base, MissConfig(r=8, target_modules=["q_proj", "v_proj"]))
    M.randomize_blocks(model)
    tensors = lora_adapter(model)[1]
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # PEFT's default: fp32 adapters
    for _, layer in model.miss_layers():
        bf16_block = layer.miss_block["default"].detach().to(torch.bfloat16)
        lora_a, lora_b = lora_factors(bf16_block, layer.in_features, layer.out_features)
        assert lora_a.dtype == lora_b.dtype == torch.bfloat16
        assert torch.equal(lora_b.float() @ lora_a.float(), layer.get_delta_weight("default").bfloat16().float())
    export_lora(model, str(tmp_path))
    lora = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    tokens = M.token_input()
    ours, theirs = M.run(model, "llama", tokens), M.run(lora, "llama", tokens)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert M.relative_error(ours, theirs) < 2e-2


def test_another_adapter_exports_by_name(tmp_path):
    base = M.make_mlp()
    fresh = copy.deepcopy(base)
    model = get_miss_model(base, MissConfig(r=4, target_modules=["fc1"]))
    model.add_adapter("second", MissConfig(r=8, target_modules=["fc2"], init_weights="mini", mini_r=8))
    M.randomize_blocks(model, "second")
    model.set_adapter("second")
    x = M.mlp_input()
    expected = M.run(model, "mlp", x)
    export_lora(model, str(tmp_path), adapter_name="second")
    lora = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    assert_close(M.run(lora, "mlp", x), expected)


def test_bat_without_rank_and_bad_arguments_are_refused_with_clear_errors(tmp_path):
    """BAT has no exact LoRA: without rank= it is refused, saying why and what to pass; a bad
    rank names the argument, the expected and the actual value; nothing is written."""
    model = get_miss_model(M.make_mlp(), MissConfig(r=8, target_modules=["fc1"], init_weights="bat"))
    with pytest.raises(ValueError, match="BAT adapter .* not low-rank.* pass rank="):
        export_lora(model, str(tmp_path / "lora"))
    for rank, error, match in ((0, ValueError, "at least 1.* got 0"), (1.5, ValueError, r"\(0, 1\].* got 1.5"),
                               (0.0, ValueError, r"\(0, 1\].* got 0.0"), ("4", TypeError, "got str '4'"),
                               (True, TypeError, "got bool True"), (65, ValueError, r"at most min\(out_features, "
                                                                                     r"in_features\) = 32")):
        with pytest.raises(error, match=match):
            export_lora(model, str(tmp_path / "lora"), rank=rank)
    assert not (tmp_path / "lora").exists()
    with pytest.raises(ValueError, match="unknown adapter"):
        export_lora(model, str(tmp_path / "lora"), adapter_name="nope")
    with pytest.raises(TypeError, match="MissModel"):
        export_lora(M.make_mlp(), str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="not low-rank"):
        lora_factors(torch.zeros(2, 8, 8), 16, 16)


def test_exported_from_the_top_level_package():
    assert miss_ext.export_lora is export_lora
