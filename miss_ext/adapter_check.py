"""Does an adapter file fit a model? The keys and shapes an adapter of a config has on a model,
and the check that a file holds exactly those (clear errors for anything else)."""

from __future__ import annotations

import torch
from torch import nn

from .config import MissConfig
from .layer import block_shape
from .modules_to_save import ModulesToSaveWrapper
from .targeting import find_modules_to_save, find_targets
from .tuner import BLOCK_KEY, KEY_PREFIX, base_linear


def expected_adapter_keys(model: nn.Module, config: MissConfig) -> dict[str, tuple]:
    """The file keys (and shapes) an adapter of this config has on this model."""
    expected = {}
    targets = find_targets(model, config)
    for name, module in targets:
        base = base_linear(module)
        try:
            shape = block_shape(config.variant, config.r, config.mini_r, base.in_features, base.out_features)
        except ValueError as error:
            raise ValueError(f"cannot adapt {name!r}: {error}") from None
        expected[f"{KEY_PREFIX}{name}.{BLOCK_KEY}"] = shape
        if config.bias == "MiSS_only" and base.bias is not None:
            expected[f"{KEY_PREFIX}{name}.base_layer.bias"] = tuple(base.bias.shape)
    saved = find_modules_to_save(model, config.modules_to_save)
    for name, module in saved:
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        for key, value in original.state_dict().items():
            expected[f"{KEY_PREFIX}{name}.{key}"] = tuple(value.shape)
    if config.bias == "all":
        target_names = {n for n, _ in targets}
        saved_prefixes = tuple(n + "." for n, _ in saved)
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] != "bias" or name.startswith(saved_prefixes):
                continue
            module_name = name.rsplit(".", 1)[0]
            if module_name in target_names:  # a plain nn.Linear today, a MissLinear once adapted
                name = f"{module_name}.base_layer.bias"
            expected[f"{KEY_PREFIX}{name}"] = tuple(param.shape)
    return expected


def check_adapter_file(model: nn.Module, config: MissConfig, tensors: dict, directory: str) -> None:
    """Raises ValueError unless the file's tensors are exactly what the config puts on model."""
    expected = expected_adapter_keys(model, config)
    saved_prefixes = tuple(f"{KEY_PREFIX}{n}." for n, _ in find_modules_to_save(model, config.modules_to_save))
    # PEFT's bias="all" also writes the biases inside its modules_to_save wrappers under
    # wrapper-internal names; they duplicate the copy's own keys and are ignored.
    unexpected = [k for k in tensors if k not in expected
                  and not (config.bias == "all" and k.startswith(saved_prefixes) and k.endswith(".bias"))]
    # A block or bias stored as an integer, bool or complex tensor is a broken file, not
    # something to cast silently into the model's dtype.
    not_float = [f"{k}: {tensors[k].dtype}" for k in expected
                 if k in tensors and tensors[k].dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64)]
    if not_float:
        raise ValueError(f"the adapter in {directory!r} has tensors that are not float16/bfloat16/float32/float64: "
                         f"{not_float[:5]}")
    missing = [k for k in expected if k not in tensors]
    wrong = [f"{k}: file {tuple(tensors[k].shape)}, model {expected[k]}"
             for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if unexpected or missing or wrong:
        problems = []
        if wrong:
            problems.append(f"shapes that do not fit (variant {config.variant!r}, r={config.r}"
                            f"{f', mini_r={config.mini_r}' if config.variant == 'mini' else ''}): {wrong[:5]}")
        if missing:
            problems.append(f"tensors missing from the file: {missing[:5]}")
        if unexpected:
            problems.append(f"tensors the model has no place for: {unexpected[:5]}")
        raise ValueError(f"the adapter in {directory!r} does not fit this model: " + "; ".join(problems))
