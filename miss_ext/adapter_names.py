"""Adapter names, shared by MissLinear and MissModel: the active set and the one check that
names exist, so that a layer and a model answer and fail alike."""

from __future__ import annotations

from typing import Iterable, Sequence, Union


def checked_names(adapter_names: Union[str, Sequence[str]], known: Iterable[str], owner: str) -> list[str]:
    """``adapter_names`` as a list, after checking every name is in ``known``."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this {owner} has {known}")
    return names


class ActiveAdapters:
    """The ``active_adapters`` / ``active_adapter`` properties PEFT's layers and models have."""

    _active_adapters: list[str]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else self.active_adapters
