"""MissTuner: the adapted model and its adapters, PEFT's tuner (``peft.tuners.miss.MissModel``).

A :class:`~miss_ext.MissModel` holds one MissTuner as ``base_model``, and the tuner holds the
wrapped model as ``model``, the layout of a PEFT model (``peft_model.base_model.model``): the
state dict keys are PEFT's (``base_model.model.<path>.miss_block.<adapter>``), and code written
for PEFT's tuner (Trainer's ``model.base_model.model``, ``model.base_model.merge_and_unload()``)
finds what it expects. The tuner owns the adapter bookkeeping (configs, the active set); the
MissModel adds files, the Hub and PEFT's model-level API on top.

Every operation checks everything before it changes anything: an unknown target, a target
that is not nn.Linear or an r the layer cannot take raises, and the model is left as it was.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .adapter_names import ActiveAdapters, checked_names
from .config import MissConfig
from .layer import MissLinear, block_shape, check_adapter_name
from .modules_to_save import ModulesToSaveWrapper
from .targeting import find_modules_to_save, find_targets, resolve_target_patterns

KEY_PREFIX = "base_model.model."
BLOCK_KEY = "miss_block"


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def base_linear(module: nn.Module) -> nn.Linear:
    return module.base_layer if isinstance(module, MissLinear) else module


class MissTuner(ActiveAdapters, nn.Module):
    """The wrapped model (``.model``) with its MiSS adapters. Attributes the tuner does not
    have are looked up on the wrapped model, as PEFT's tuners do."""

    prefix = "miss_"

    def __init__(self, model: nn.Module, *, backend: str = "kernels") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, MissConfig] = {}
        self._active_adapters: list[str] = []
        self._backend = backend

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # -- adapters ---------------------------------------------------------------------------

    def miss_layers(self) -> Iterator[tuple[str, MissLinear]]:
        for name, module in self.model.named_modules():
            if isinstance(module, MissLinear):
                yield name, module

    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                yield name, module

    def add_adapter(self, adapter_name: str, config: MissConfig) -> None:
        """Adds an adapter; the first one becomes active, later ones stay inactive (and frozen)
        until :meth:`set_adapter`, as in PEFT."""
        if not isinstance(config, MissConfig):
            raise TypeError(f"config must be a miss_ext.MissConfig, got {type(config).__name__}")
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first")
        targets = find_targets(self.model, config)
        to_save = find_modules_to_save(self.model, config.modules_to_save)
        for name, module in targets:  # check every layer before changing any
            base = base_linear(module)
            if isinstance(module, MissLinear) and adapter_name in module.miss_block:
                raise ValueError(f"layer {name!r} already has an adapter named {adapter_name!r}")
            try:
                block_shape(config.variant, config.r, config.mini_r, base.in_features, base.out_features)
            except ValueError as error:
                raise ValueError(f"cannot adapt {name!r}: {error}") from None

        config = copy.deepcopy(config)
        if isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
            config.target_modules = resolve_target_patterns(self.model, config)
        first = not self.peft_config
        if first:
            self._active_adapters = [adapter_name]
        for name, module in targets:
            args = (adapter_name, config.r, config.mini_r, config.miss_dropout, config.init_weights)
            if isinstance(module, MissLinear):
                module.update_layer(*args)
            else:
                module.requires_grad_(False)
                layer = MissLinear(module, *args, backend=self._backend)
                parent, child = parent_of(self.model, name)
                setattr(parent, child, layer)
        for name, module in to_save:
            if isinstance(module, ModulesToSaveWrapper):
                module.add_adapter(adapter_name)
            else:
                parent, child = parent_of(self.model, name)
                setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))
        self.peft_config[adapter_name] = config
        if first:
            self._mark_only_adapters_trainable(config)
        self.set_adapter(self._active_adapters)
        if config.inference_mode:
            self.set_requires_grad(adapter_name, False)

    def _mark_only_adapters_trainable(self, config: MissConfig) -> None:
        for name, param in self.model.named_parameters():
            param.requires_grad_(False)
        if config.bias == "all":
            for name, param in self.model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias" and ".original_module." not in f".{name}.":
                    param.requires_grad_(True)
        elif config.bias == "MiSS_only":
            for _, layer in self.miss_layers():
                if layer.base_layer.bias is not None:
                    layer.base_layer.bias.requires_grad_(True)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Turns gradients of these adapters' blocks and module copies on or off (PEFT's
        ``set_requires_grad``; unlike PEFT, an unknown name raises instead of being ignored)."""
        if not isinstance(requires_grad, bool):
            raise TypeError(f"requires_grad must be a bool, got {requires_grad!r}")
        names = checked_names(adapter_names, self.peft_config, "model")
        for _, layer in self.miss_layers():
            for name in names:
                if name in layer.miss_block:
                    layer.miss_block[name].requires_grad_(requires_grad)
        for _, wrapper in self._wrappers():
            for name in names:
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(requires_grad)

    def set_adapter(self, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Makes these adapters active (and their blocks trainable, unless ``inference_mode``,
        as in PEFT) on every layer."""
        names = checked_names(adapter_names, self.peft_config, "model")
        for _, layer in self.miss_layers():
            layer.set_adapter([n for n in names if n in layer.miss_block])
        for _, wrapper in self._wrappers():
            wrapper.set_adapter(names)
        self._active_adapters = names
        # adapters loaded for inference stay frozen when active
        frozen = [n for n in names if inference_mode or self.peft_config[n].inference_mode]
        if frozen:
            self.set_requires_grad(frozen, False)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(self.peft_config)}")
        merged = [n for n, layer in self.miss_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"adapter {adapter_name!r} is merged in {merged[:3]}...: unmerge_adapter() first")
        for _, layer in self.miss_layers():
            if adapter_name in layer.miss_block:
                layer.delete_adapter(adapter_name)
        for _, wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [n for n in self._active_adapters if n != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.set_adapter(remaining)

    def enable_adapter_layers(self) -> None:
        for module in self._switchable():
            module.enable_adapters(True)

    def disable_adapter_layers(self) -> None:
        for module in self._switchable():
            module.enable_adapters(False)

    def _switchable(self) -> list[nn.Module]:
        return [m for _, m in self.miss_layers()] + [w for _, w in self._wrappers()]

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model computes exactly the base model."""
        modules = self._switchable()
        for module in modules:
            module.enable_adapters(False)
        try:
            yield
        finally:
            for module in modules:
                module.enable_adapters(True)

    # -- merge ------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        names = None if adapter_names is None else checked_names(adapter_names, self.peft_config, "model")
        layers = [(layer, None if names is None else [n for n in names if n in layer.miss_block])
                  for _, layer in self.miss_layers()]
        for layer, layer_names in layers:  # every layer is checked before any is merged
            layer.check_merge(safe_merge, layer_names)
        for layer, layer_names in layers:
            layer.merge(adapter_names=layer_names)

    def unmerge_adapter(self) -> None:
        layers = [layer for _, layer in self.miss_layers() if layer.merged]
        for layer in layers:  # a singular bat block anywhere stops the unmerge before it starts
            layer.check_unmerge()
        for layer in layers:
            layer.unmerge()

    def _unload(self, merge: bool, safe_merge: bool = False,
                adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        else:
            self.unmerge_adapter()
        for name, layer in list(self.miss_layers()):
            parent, child = parent_of(self.model, name)
            setattr(parent, child, layer.base_layer)
        for name, wrapper in list(self._wrappers()):
            parent, child = parent_of(self.model, name)
            setattr(parent, child, wrapper.active_module)
        self.peft_config.clear()
        return self.model

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        """Merges the adapters into the weights and returns the plain model (no MissLinear)."""
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Returns the original model: adapters removed, merged ones unmerged first."""
        return self._unload(merge=False)

    # -- parameters -------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # -- the adapter's tensors --------------------------------------------------------------

    def adapter_entries(self, adapter_name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """``{file key: (key in the wrapped model's state_dict, tensor)}`` for one adapter.

        File keys are PEFT's (``base_model.model.<path>.miss_block``, the adapter name
        removed); the second key says where the tensor lives, so that a caller holding a
        state dict of the whole model (Trainer under DeepSpeed or FSDP) can take it from there.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(self.peft_config)}")
        config = self.peft_config[adapter_name]
        entries = {}
        for name, layer in self.miss_layers():
            if adapter_name in layer.miss_block:
                entries[f"{KEY_PREFIX}{name}.{BLOCK_KEY}"] = (f"{name}.{BLOCK_KEY}.{adapter_name}",
                                                             layer.miss_block[adapter_name])
                if config.bias == "MiSS_only" and layer.base_layer.bias is not None:
                    key = f"{name}.base_layer.bias"
                    entries[KEY_PREFIX + key] = (key, layer.base_layer.bias)
        wrapped = []
        for name, wrapper in self._wrappers():
            wrapped.append(name + ".")
            if adapter_name in wrapper.modules_to_save:
                for key, value in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                    entries[f"{KEY_PREFIX}{name}.{key}"] = (f"{name}.modules_to_save.{adapter_name}.{key}", value)
        if config.bias == "all":
            for name, param in self.model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias" and not any(name.startswith(w) for w in wrapped):
                    entries[KEY_PREFIX + name] = (name, param)
        return entries

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's file keys (``base_model.model.<path>.miss_block``,
        the adapter name removed); they share the parameters' storage."""
        return {k: v.detach() for k, (_, v) in self.adapter_entries(adapter_name).items()}

    def load_adapter_tensors(self, adapter_name: str, tensors: dict) -> None:
        """Copies an adapter file's tensors (already checked against the model) into the
        adapter's blocks, module copies and biases."""
        with torch.no_grad():
            for file_key, (_, target) in self.adapter_entries(adapter_name).items():
                if file_key in tensors:
                    target.copy_(tensors[file_key])
