"""LoRA export of MiSS adapters (SPEC.md sec. 8): exact for standard and mini, truncated SVD for BAT.

A standard adapter's weight delta is ``dW = B^T @ S`` with ``S[c, i] = 1 if i % r == c``
(``[r, in]``): a rank-r LoRA with ``lora_A = S`` and ``lora_B = B^T``, exactly; a mini adapter
is the same with ``B_full[c, o] = B[c, o % mini_r]``. :func:`export_lora` writes that LoRA as a
PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), so
serving stacks that only know LoRA (vLLM, TGI, PEFT's LoRA, diffusers...) can use a MiSS
adapter. ``lora_alpha = r`` makes LoRA's scaling 1, and the factors hold only copies of the
block's values and zeros/ones in the block's dtype: the exported LoRA's delta is bit-for-bit
the MiSS delta. BAT (``W' = W + W B + B``) depends on W and is not low-rank: it is exported
approximately, by a truncated SVD of each layer's delta with ``rank=`` (a fixed rank or an
energy fraction; :mod:`miss_ext.lora_svd`), as PEFT's ``convert_to_lora`` does, and the result
reports each layer's rank and relative Frobenius error.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .config import _peft_version_written, config_file_bytes
from .files import write_adapter_files
from .lora_svd import Rank, check_rank, svd_lora_factors
from .model import BLOCK_KEY, KEY_PREFIX, MissModel

__all__ = ["export_lora", "lora_adapter", "lora_factors", "LoraAdapter", "LoraExport"]

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


class LoraAdapter(NamedTuple):
    """A MiSS adapter as a PEFT LoRA: its adapter_config.json dict, its tensors under PEFT's
    LoRA file keys, and per adapted layer the LoRA rank and the relative Frobenius error
    ``||dW - lora_B @ lora_A|| / ||dW||`` (0.0 for the exact standard and mini exports)."""

    config: dict
    tensors: dict
    ranks: dict
    relative_errors: dict


class LoraExport(str):
    """What :func:`export_lora` returns: the directory it wrote (a str, as before), with each
    layer's ``ranks`` and ``relative_errors`` (see :class:`LoraAdapter`)."""

    ranks: dict
    relative_errors: dict

    def __new__(cls, directory: str, ranks: dict, relative_errors: dict) -> "LoraExport":
        export = super().__new__(cls, directory)
        export.ranks, export.relative_errors = ranks, relative_errors
        return export

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_errors.values(), default=0.0)


def lora_adapter(miss_model: MissModel, adapter_name: str = "default", rank: Optional[Rank] = None) -> LoraAdapter:
    """One adapter as a LoRA (:class:`LoraAdapter`).

    Standard and mini adapters give their exact rank-r factors (``rank`` is checked and
    otherwise ignored, as in PEFT: r already is the exact rank). A BAT adapter needs ``rank``:
    an int k (every layer rank k) or a float in (0, 1] (each layer the smallest rank whose
    singular values hold that fraction of the energy of its update).
    """
    if not isinstance(miss_model, MissModel):
        raise TypeError(f"export_lora takes a miss_ext.MissModel, got {type(miss_model).__name__}")
    if adapter_name not in miss_model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(miss_model.peft_config)}")
    check_rank(rank)
    config = miss_model.peft_config[adapter_name]
    bat = config.variant == "bat"
    if bat and rank is None:
        raise ValueError(
            f"adapter {adapter_name!r} is a BAT adapter (init_weights='bat'): its update W' = W + W B + B depends on "
            "the base weight and is not low-rank, so its LoRA is a truncated SVD of each layer's update; pass rank= "
            "(an int, or a float in (0, 1] for the fraction of each update's energy to keep)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for key, value in miss_model.adapter_state_dict(adapter_name).items():
        if not key.endswith("." + BLOCK_KEY):  # biases and modules_to_save: the same keys in LoRA files
            tensors[key] = value
    ranks, errors = {}, {}
    for name, layer in miss_model.miss_layers():
        if adapter_name not in layer.miss_block:
            continue
        block = layer.miss_block[adapter_name]
        if bat:
            lora_a, lora_b, errors[name] = svd_lora_factors(layer.get_delta_weight(adapter_name), rank, block.dtype,
                                                            layer=name)
        else:
            lora_a, lora_b = lora_factors(block, layer.in_features, layer.out_features)
            errors[name] = 0.0
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = lora_a
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = lora_b
        ranks[name] = lora_a.shape[0]
    if bat and isinstance(rank, float):
        # PEFT's convention for per-layer ranks: r = lora_alpha = 1, and each layer's rank in
        # rank_pattern and alpha_pattern (scaling alpha / r = 1 everywhere)
        r, rank_pattern = 1, dict(ranks)
    else:
        r, rank_pattern = (rank if bat else config.r), {}
    lora_config = {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": config.base_model_name_or_path
        or getattr(getattr(miss_model.model, "config", None), "_name_or_path", None) or None,
        "revision": config.revision,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1: the factors carry the whole delta
        # both drop x before the first factor (the fold / lora_A); BAT applies no dropout
        "lora_dropout": 0.0 if bat else config.miss_dropout,
        # The adapted layers by full name: exactly the layers MiSS adapted, whatever patterns
        # (regex, all-linear, layers_to_transform, defaults) selected them.
        "target_modules": list(ranks),
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
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "peft_version": _peft_version_written(),
    }
    return LoraAdapter(lora_config, tensors, ranks, errors)


def export_lora(miss_model: MissModel, directory: str, adapter_name: str = "default",
                rank: Optional[Rank] = None) -> LoraExport:
    """Writes adapter ``adapter_name`` of ``miss_model`` as a PEFT LoRA adapter in ``directory``
    (``adapter_config.json`` and ``adapter_model.safetensors``, replaced as a unit) and returns
    the directory (a :class:`LoraExport`: a str with each layer's ``ranks`` and
    ``relative_errors``).

    ``peft.PeftModel.from_pretrained(base_model, directory)`` on the un-adapted base model then
    computes what the MiSS adapter computes: exactly for standard and mini, within the
    reported error for BAT, which needs ``rank`` (see :func:`lora_adapter`).
    """
    adapter = lora_adapter(miss_model, adapter_name, rank)
    write_adapter_files(directory, config_file_bytes(adapter.config), adapter.tensors)
    return LoraExport(directory, adapter.ranks, adapter.relative_errors)
