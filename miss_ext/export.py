"""Exact LoRA export of standard and mini MiSS adapters (SPEC.md sec. 8).

A standard adapter's weight delta is ``dW = B^T @ S`` with ``S[c, i] = 1 if i % r == c``
(``[r, in]``): a rank-r LoRA with ``lora_A = S`` and ``lora_B = B^T``, exactly; a mini adapter
is the same with ``B_full[c, o] = B[c, o % mini_r]``. :func:`export_lora` writes that LoRA as a
PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), so
serving stacks that only know LoRA (vLLM, TGI, PEFT's LoRA, diffusers...) can use a MiSS
adapter. ``lora_alpha = r`` makes LoRA's scaling 1, and the factors hold only copies of the
block's values and zeros/ones in the block's dtype: the exported LoRA's delta is bit-for-bit
the MiSS delta. BAT (``W' = W + W B + B``) depends on W and is not low-rank: no exact export.
"""

from __future__ import annotations

import torch

from .config import _peft_version_written, config_file_bytes
from .files import write_adapter_files
from .model import BLOCK_KEY, KEY_PREFIX, MissModel

__all__ = ["export_lora", "lora_adapter", "lora_factors"]

# MiSS's bias modes and their LoRA names (the same PEFT mechanism, the same file keys).
_LORA_BIAS = {"none": "none", "all": "all", "MiSS_only": "lora_only"}


def lora_factors(block: torch.Tensor, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A [r, in], lora_B [out, r])`` of a standard (``[r, out]``) or mini
    (``[r, mini_r]``) block, in the block's dtype, with ``lora_B @ lora_A == dW`` exactly."""
    if block.dim() != 2:
        raise ValueError(
            f"a LoRA export needs a standard [r, out] or mini [r, mini_r] block, got shape {tuple(block.shape)} "
            "(a bat block [out/r, r, r] is not low-rank)"
        )
    r, m = block.shape
    if out_features % m:
        raise ValueError(f"block columns ({m}) must divide out_features ({out_features})")
    block = block.detach()
    columns = torch.arange(in_features, device=block.device)
    lora_a = torch.zeros(r, in_features, dtype=block.dtype, device=block.device)
    lora_a[columns % r, columns] = 1
    full = block if m == out_features else block.repeat(1, out_features // m)  # B_full[c, o] = B[c, o % m]
    return lora_a, full.t().contiguous()


def lora_adapter(miss_model: MissModel, adapter_name: str = "default") -> tuple[dict, dict[str, torch.Tensor]]:
    """The exact LoRA of one adapter: ``(adapter_config dict, tensors under PEFT's LoRA file keys)``.

    Raises ValueError for a BAT adapter (not low-rank) or an unknown adapter name.
    """
    if not isinstance(miss_model, MissModel):
        raise TypeError(f"export_lora takes a miss_ext.MissModel, got {type(miss_model).__name__}")
    if adapter_name not in miss_model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(miss_model.peft_config)}")
    config = miss_model.peft_config[adapter_name]
    if config.variant == "bat":
        raise ValueError(
            f"adapter {adapter_name!r} is a BAT adapter (init_weights='bat'): its update W' = W + W B + B "
            "depends on the base weight and is not low-rank, so it has no exact LoRA. Only standard and mini "
            "adapters export; for BAT, merge_and_unload() gives the adapted weights."
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in miss_model.adapter_state_dict(adapter_name).items():
        if not key.endswith("." + BLOCK_KEY):  # biases and modules_to_save: the same keys in LoRA files
            tensors[key] = value
    targets = []
    for name, layer in miss_model.miss_layers():
        if adapter_name not in layer.miss_block:
            continue
        lora_a, lora_b = lora_factors(layer.miss_block[adapter_name], layer.in_features, layer.out_features)
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = lora_a
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = lora_b
        targets.append(name)
    lora_config = {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path
        or getattr(getattr(miss_model.model, "config", None), "_name_or_path", None) or None,
        "revision": config.revision,
        "inference_mode": True,
        "r": config.r,
        "lora_alpha": config.r,  # scaling = lora_alpha / r = 1: the factors carry the whole delta
        "lora_dropout": config.miss_dropout,  # both drop x before the first factor (the fold / lora_A)
        # The adapted layers by full name: exactly the layers MiSS adapted, whatever patterns
        # (regex, all-linear, layers_to_transform, defaults) selected them.
        "target_modules": targets,
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": _LORA_BIAS[config.bias],
        "modules_to_save": config.modules_to_save,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "peft_version": _peft_version_written(),
    }
    return lora_config, tensors


def export_lora(miss_model: MissModel, directory: str, adapter_name: str = "default") -> str:
    """Writes adapter ``adapter_name`` of ``miss_model`` as a PEFT LoRA adapter in ``directory``
    (``adapter_config.json`` and ``adapter_model.safetensors``, replaced as a unit) and returns
    the directory.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` on the un-adapted base model then
    computes what the MiSS adapter computes. A BAT adapter raises ValueError (not low-rank).
    """
    lora_config, tensors = lora_adapter(miss_model, adapter_name)
    write_adapter_files(directory, config_file_bytes(lora_config), tensors)
    return directory
