"""MissModel: a model whose targeted nn.Linear layers are MissLinear, managed like PEFT.

``get_miss_model(model, config)`` adapts a model in place (the targets become MissLinear,
modules_to_save get trainable copies, everything else is frozen) and returns the MissModel
that wraps it. Adapter directories are PEFT's: ``save_pretrained`` writes what
``peft.PeftModel.from_pretrained`` reads, and ``MissModel.from_pretrained`` reads what PEFT
writes.

Every operation checks everything before it changes anything: an unknown target, a target
that is not nn.Linear, an r the layer cannot take, or an adapter file that does not fit the
model raises, and the model is left as it was.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .adapter_names import ActiveAdapters, checked_names
from .config import MissConfig
from .files import load_tensors, write_adapter_files
from .layer import MissLinear, block_shape, check_adapter_name
from .modules_to_save import ModulesToSaveWrapper
from .targeting import find_modules_to_save, find_targets, resolve_target_patterns

KEY_PREFIX = "base_model.model."
BLOCK_KEY = "miss_block"


def _parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _base_linear(module: nn.Module) -> nn.Linear:
    return module.base_layer if isinstance(module, MissLinear) else module


def expected_adapter_keys(model: nn.Module, config: MissConfig) -> dict[str, tuple]:
    """The file keys (and shapes) an adapter of this config has on this model."""
    expected = {}
    targets = find_targets(model, config)
    for name, module in targets:
        base = _base_linear(module)
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


class MissModel(ActiveAdapters, nn.Module):
    """A model adapted by MiSS adapters. Attributes the wrapper does not have are looked up on
    the wrapped model, so ``miss_model.config`` or ``miss_model.generate`` work as before."""

    prefix = "miss_"

    def __init__(self, model: nn.Module, config: MissConfig, adapter_name: str = "default", *,
                 backend: str = "kernels") -> None:
        super().__init__()
        self.model = model
        # Trainer, TRL and accelerate keep the batch columns that inspect.signature(
        # model.forward) names: this instance's forward carries the wrapped model's signature
        # (through __wrapped__), where the class's forward(*args, **kwargs) names none.
        self.forward = functools.update_wrapper(functools.partial(type(self).forward, self), model.forward)
        self.peft_config: dict[str, MissConfig] = {}
        self._active_adapters: list[str] = [adapter_name]
        self._backend = backend
        self.add_adapter(adapter_name, config)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.model

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
            base = _base_linear(module)
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
        for name, module in targets:
            args = (adapter_name, config.r, config.mini_r, config.miss_dropout, config.init_weights)
            if isinstance(module, MissLinear):
                module.update_layer(*args)
            else:
                module.requires_grad_(False)
                layer = MissLinear(module, *args, backend=self._backend)
                parent, child = _parent_of(self.model, name)
                setattr(parent, child, layer)
        for name, module in to_save:
            if isinstance(module, ModulesToSaveWrapper):
                module.add_adapter(adapter_name)
            else:
                parent, child = _parent_of(self.model, name)
                setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))
        self.peft_config[adapter_name] = config
        if first:
            self._mark_only_adapters_trainable(config)
        self.set_adapter(self._active_adapters)
        if config.inference_mode:
            self._freeze_adapter(adapter_name)

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

    def _freeze_adapter(self, adapter_name: str) -> None:
        for _, layer in self.miss_layers():
            if adapter_name in layer.miss_block:
                layer.miss_block[adapter_name].requires_grad_(False)
        for _, wrapper in self._wrappers():
            if adapter_name in wrapper.modules_to_save:
                wrapper.modules_to_save[adapter_name].requires_grad_(False)

    def set_adapter(self, adapter_names: Union[str, Sequence[str]]) -> None:
        """Makes these adapters active (and their blocks trainable) on every layer."""
        names = checked_names(adapter_names, self.peft_config, "model")
        for _, layer in self.miss_layers():
            layer.set_adapter([n for n in names if n in layer.miss_block])
        for _, wrapper in self._wrappers():
            wrapper.set_adapter(names)
        self._active_adapters = names
        for name in names:  # adapters loaded for inference stay frozen when active
            if self.peft_config[name].inference_mode:
                self._freeze_adapter(name)

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

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model computes exactly the base model."""
        modules = [m for _, m in self.miss_layers()] + [w for _, w in self._wrappers()]
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
            parent, child = _parent_of(self.model, name)
            setattr(parent, child, layer.base_layer)
        for name, wrapper in list(self._wrappers()):
            parent, child = _parent_of(self.model, name)
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

    # -- files ------------------------------------------------------------------------------

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's file keys (``base_model.model.<path>.miss_block``,
        the adapter name removed)."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; this model has {list(self.peft_config)}")
        config = self.peft_config[adapter_name]
        tensors = {}
        for name, layer in self.miss_layers():
            if adapter_name in layer.miss_block:
                tensors[f"{KEY_PREFIX}{name}.{BLOCK_KEY}"] = layer.miss_block[adapter_name]
                if config.bias == "MiSS_only" and layer.base_layer.bias is not None:
                    tensors[f"{KEY_PREFIX}{name}.base_layer.bias"] = layer.base_layer.bias
        wrapped = []
        for name, wrapper in self._wrappers():
            wrapped.append(name + ".")
            if adapter_name in wrapper.modules_to_save:
                for key, value in wrapper.modules_to_save[adapter_name].state_dict().items():
                    tensors[f"{KEY_PREFIX}{name}.{key}"] = value
        if config.bias == "all":
            for name, param in self.model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias" and not any(name.startswith(w) for w in wrapped):
                    tensors[f"{KEY_PREFIX}{name}"] = param
        return {k: v.detach() for k, v in tensors.items()}

    def save_pretrained(self, directory: str, selected_adapters: Optional[Sequence[str]] = None) -> None:
        """Writes each adapter as PEFT does: "default" in ``directory``, others in
        ``directory/<name>``: adapter_config.json and adapter_model.safetensors, each adapter
        directory replaced as a unit (a killed save never leaves new weights with an old
        config; miss_ext/files.py)."""
        names = checked_names(self.peft_config if selected_adapters is None else selected_adapters,
                              self.peft_config, "model")
        for name in names:
            target = directory if name == "default" else os.path.join(directory, name)
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
            write_adapter_files(target, config.to_json(), self.adapter_state_dict(name))

    def _load_tensors_into(self, adapter_name: str, tensors: dict) -> None:
        config = self.peft_config[adapter_name]
        with torch.no_grad():
            for name, layer in self.miss_layers():
                key = f"{KEY_PREFIX}{name}.{BLOCK_KEY}"
                if adapter_name in layer.miss_block and key in tensors:
                    layer.miss_block[adapter_name].copy_(tensors[key])
            for name, wrapper in self._wrappers():
                if adapter_name in wrapper.modules_to_save:
                    copy_ = wrapper.modules_to_save[adapter_name]
                    own = {k: tensors[f"{KEY_PREFIX}{name}.{k}"] for k in copy_.state_dict()}
                    copy_.load_state_dict(own)
            if config.bias in ("all", "MiSS_only"):
                for name, param in self.model.named_parameters():
                    if f"{KEY_PREFIX}{name}" in tensors and name.rsplit(".", 1)[-1] == "bias":
                        param.copy_(tensors[f"{KEY_PREFIX}{name}"])

    def load_adapter(self, directory: str, adapter_name: str, is_trainable: bool = False) -> None:
        """Adds the adapter saved in ``directory`` under ``adapter_name`` (inactive, as in PEFT).

        With ``is_trainable=False`` its weights are frozen and the model is put in eval mode.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it first")
        config = MissConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        tensors = load_tensors(directory)
        check_adapter_file(self.model, config, tensors, directory)
        self.add_adapter(adapter_name, config)
        self._load_tensors_into(adapter_name, tensors)
        if not is_trainable:
            self.eval()

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str, adapter_name: str = "default",
                        is_trainable: bool = False, *, backend: str = "kernels") -> "MissModel":
        """Adapts ``model`` with the adapter saved in ``directory`` (by miss_ext or PEFT)."""
        config = MissConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        tensors = load_tensors(directory)
        check_adapter_file(model, config, tensors, directory)  # before the model is touched
        miss_model = cls(model, config, adapter_name, backend=backend)
        miss_model._load_tensors_into(adapter_name, tensors)
        if not is_trainable:
            miss_model.eval()
        return miss_model


def get_miss_model(model: nn.Module, config: MissConfig, adapter_name: str = "default", *,
                   backend: str = "kernels") -> MissModel:
    """Adapts ``model`` in place with a MiSS adapter and returns the MissModel wrapping it."""
    return MissModel(model, config, adapter_name, backend=backend)
