"""ModulesToSaveWrapper: a module trained in full beside the adapters (e.g. a new classifier).

The original stays frozen; each adapter gets its own trainable copy, used while that adapter
is active. The attribute names (``original_module``, ``modules_to_save.<adapter>``) are
PEFT's, so state dicts line up with PEFT models.
"""

from __future__ import annotations

import copy
from typing import Union

from torch import nn


class ModulesToSaveWrapper(nn.Module):
    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active_adapter = adapter_name
        self._disabled = False
        self.original_module.requires_grad_(False)
        self.add_adapter(adapter_name)

    def add_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            raise ValueError(f"adapter {adapter_name!r} already has a copy of this module")
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.modules_to_save[adapter_name].requires_grad_(adapter_name == self._active_adapter)

    def set_adapter(self, adapter_names: Union[str, list]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise ValueError(f"only one adapter's copy of a module to save can be active, got {present}")
        self._active_adapter = present[0] if present else None
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self._active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self._active_adapter == adapter_name:
            self._active_adapter = None

    def enable_adapters(self, enabled: bool) -> None:
        self._disabled = not enabled

    @property
    def active_module(self) -> nn.Module:
        """The module the forward uses: the active adapter's copy, else the original."""
        if self._disabled or self._active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self._active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "_active_adapter", "_disabled"):
                raise
            return getattr(self.active_module, name)
