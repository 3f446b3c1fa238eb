"""Steps every torch / transformers / PEFT user takes, taken with the public API.

Each test here follows a user, not the code: move or cast an adapted model and use it, merge
in the middle of a step, load what was saved in a new process (training with transformers'
Trainer, TRL and accelerate: test_trainer.py, test_trl.py, test_accelerate.py). They were written after these steps failed on a green suite (issue 12): every
defect of that list has its test here or in test_double_backward.py / test_kill_during_save.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import miss_ext
from miss_ext import MissConfig, MissLinear, MissModel, get_miss_model

import models as M
from conftest import assert_close_to_oracle

VARIANTS = {
    "standard": dict(init_weights=True),
    "mini": dict(init_weights="mini", mini_r=4),
    "bat": dict(init_weights="bat"),
}
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def adapted_llama(variant: str, seed: int = 5) -> MissModel:
    mm = get_miss_model(M.make_llama(), MissConfig(r=8, target_modules=LLAMA_TARGETS, **VARIANTS[variant]))
    M.randomize_blocks(mm, seed=seed)
    return mm


def with_backend(model: nn.Module, backend: str) -> nn.Module:
    for module in model.modules():
        if isinstance(module, MissLinear):
            module.backend = backend
    return model


def float_dtypes(model: nn.Module) -> set:
    return {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}


# ---------------------------------------------------------------------------------------
# Moving and casting (nn.Module._apply was shadowed by MissLinear: every one of these raised)

CASTS = {
    "to(float64)": (lambda m: m.to(torch.float64), torch.float64),
    "double()": (lambda m: m.double(), torch.float64),
    "to(bfloat16)": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "bfloat16()": (lambda m: m.bfloat16(), torch.bfloat16),
    "half()": (lambda m: m.half(), torch.float16),
    "to(dtype=float16)": (lambda m: m.to(dtype=torch.float16), torch.float16),
    "float()": (lambda m: m.double().float(), torch.float32),
    "type(float64)": (lambda m: m.type(torch.float64), torch.float64),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cast", CASTS)
def test_cast_adapted_transformers_model_then_run(variant, cast):
    """model.to(dtype) and friends cast every parameter, blocks included (as PEFT's do), and
    the cast model computes the adapted model in that dtype (float64 oracle, 2x rule)."""
    apply, dtype = CASTS[cast]
    mm = adapted_llama(variant)
    oracle = M.run(with_backend(copy.deepcopy(mm), "reference").double(), "llama")
    same_precision = M.run(apply(with_backend(copy.deepcopy(mm), "reference")), "llama")
    returned = apply(mm)
    assert returned is mm
    assert float_dtypes(mm) == {dtype}
    assert_close_to_oracle(M.run(mm, "llama"), oracle, same_precision, dtype=dtype, what=cast)


@pytest.mark.parametrize("variant", VARIANTS)
def test_move_to_device_and_back(variant):
    """.to(device), .cpu(), .to("cpu", float64), share_memory(): the model keeps working; on
    the meta device it gives meta outputs of the right shape (fake kernels)."""
    mm = adapted_llama(variant)
    expected = M.run(mm, "llama")
    assert mm.to("cpu") is mm and mm.cpu() is mm and mm.share_memory() is mm
    assert torch.equal(M.run(mm, "llama"), expected)
    mm.to("cpu", torch.float64).to(device="cpu", dtype=torch.float32)
    torch.testing.assert_close(M.run(mm, "llama"), expected, rtol=1e-6, atol=1e-6)
    on_meta = copy.deepcopy(mm).to("meta")
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    layer = next(m for m in on_meta.modules() if isinstance(m, MissLinear))
    out = layer(torch.empty(3, layer.in_features, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, layer.out_features)


def test_to_empty_then_load_state_dict():
    """The meta-device init pattern: build on meta, to_empty(), load the real weights."""
    config = MissConfig(r=8, target_modules=["fc1", "fc2"])
    source = get_miss_model(M.make_mlp(), config)
    M.randomize_blocks(source, seed=7)
    with torch.device("meta"):
        shell = get_miss_model(M.make_mlp(), config)
    assert shell.to_empty(device="cpu") is shell
    shell.load_state_dict(source.state_dict())
    assert torch.equal(M.run(shell, "mlp"), M.run(source, "mlp"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_and_back(variant):
    mm = adapted_llama(variant)
    expected = M.run(mm, "llama")
    assert mm.cuda() is mm
    on_gpu = M.run(mm, "llama", M.token_input().cuda())
    torch.testing.assert_close(on_gpu.cpu(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(M.run(mm.cpu(), "llama"), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cast_single_layer(variant):
    torch.manual_seed(3)
    layer = MissLinear(nn.Linear(16, 32), r=8, mini_r=4, init_weights=VARIANTS[variant]["init_weights"])
    M.randomize_blocks(layer, seed=4)
    x = torch.randn(5, 16, dtype=torch.float64)
    oracle = with_backend(copy.deepcopy(layer), "reference").double()(x)
    assert layer.double() is layer
    torch.testing.assert_close(layer(x), oracle, rtol=1e-12, atol=1e-12)
    layer.half()
    assert float_dtypes(layer) == {torch.float16}
    assert layer(x.half()).dtype == torch.float16


# ---------------------------------------------------------------------------------------
# Merging between forward and backward (merge_ wrote W without bumping its version counter)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_between_forward_and_backward_is_refused_like_torch(variant):
    """Backward needs the W of the forward; after a merge it refuses to run, as it does after
    any in-place change of a saved tensor (PEFT replaces W instead; either way dx is never
    computed from the merged W)."""
    mm = adapted_llama(variant)
    mm.train()
    loss = M.forward(mm, "llama").square().mean()
    mm.merge_adapter()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_then_train_step_matches(variant):
    """A merge and unmerge before the step: the next step's gradients are the ones of a
    model that was never merged (no false alarm from the version counter)."""
    mm = adapted_llama(variant)
    twin = copy.deepcopy(mm)
    mm.merge_adapter()
    mm.unmerge_adapter()
    for model in (mm, twin):
        M.forward(model, "llama").square().mean().backward()
    grads = {n: p.grad for n, p in mm.named_parameters() if p.requires_grad}
    for name, param in twin.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("block_shape", [(4, 8), (4, 2), (2, 4, 4)], ids=["standard", "mini", "bat"])
def test_merge_ops_behave_like_torch_inplace_ops(block_shape):
    """miss.merge_/unmerge_ bump the version counter; with grad mode on they refuse a leaf
    that requires grad and a block that requires grad, before writing anything."""
    weight = torch.randn(8, 8)
    block = torch.randn(block_shape) * 0.1
    version = weight._version
    miss_ext.merge_(weight, block)
    assert weight._version > version
    version = weight._version
    miss_ext.unmerge_(weight, block)
    assert weight._version > version

    trainable_weight = nn.Parameter(torch.randn(8, 8))
    before = trainable_weight.detach().clone()
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
        miss_ext.merge_(trainable_weight, block)
    with pytest.raises(RuntimeError, match="not differentiable"):
        miss_ext.merge_(weight, block.clone().requires_grad_())
    assert torch.equal(trainable_weight.detach(), before)
    with torch.no_grad():
        miss_ext.merge_(trainable_weight, block)
    assert not torch.equal(trainable_weight.detach(), before)


# ---------------------------------------------------------------------------------------
# Every saved artefact loads in a new process (the installed package, nothing shared)

LOADER = r"""
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
import models as M
import miss_ext
from miss_ext import MissConfig, MissModel, get_miss_model
kind, path = sys.argv[1], sys.argv[2]
if kind == "miss_adapter":
    out = M.run(MissModel.from_pretrained(M.make_llama(), path), "llama")
elif kind == "peft_adapter":
    import peft
    out = M.run(peft.PeftModel.from_pretrained(M.make_llama(), path), "llama")
print(json.dumps({{"output": out.tolist(), "package": os.path.dirname(miss_ext.__file__)}}))
"""


def run_in_fresh_process(kind: str, path: str) -> dict:
    code = LOADER.format(tests=TESTS_DIR)
    done = subprocess.run([sys.executable, "-c", code, kind, path], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(path))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_adapter_loads_in_a_new_process(variant, tmp_path):
    """save_pretrained (and export_lora), then a new Python process loads each with miss_ext
    and with PEFT."""
    mm = adapted_llama(variant)
    mm.save_pretrained(str(tmp_path / "adapter"))
    expected = M.run(mm, "llama")
    saved = [("miss_adapter", "adapter")]
    if _has("peft"):
        saved.append(("peft_adapter", "adapter"))
        if variant != "bat":  # the exact LoRA export: standard and mini only
            miss_ext.export_lora(mm, str(tmp_path / "lora"))
            saved.append(("peft_adapter", "lora"))
    for kind, name in saved:
        result = run_in_fresh_process(kind, str(tmp_path / name))
        torch.testing.assert_close(torch.tensor(result["output"]), expected, rtol=1e-5, atol=1e-6,
                                   msg=f"{name} loaded by {kind}")


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False
