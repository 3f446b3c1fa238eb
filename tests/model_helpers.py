"""Helpers of the MissModel tests (tests/test_model*.py): models to adapt, two-adapter Llama
models, and a saved adapter with its files to edit."""

from __future__ import annotations

import copy
import json

import torch

from miss_ext import MissConfig, get_miss_model

import models as M

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
