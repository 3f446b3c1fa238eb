"""MissModel: a model whose targeted nn.Linear layers are MissLinear, managed like a PEFT model.

``get_miss_model(model, config)`` adapts a model in place (the targets become MissLinear,
modules_to_save get trainable copies, everything else is frozen) and returns the MissModel
that wraps it. The layout is PEFT's: ``miss_model.base_model`` is the tuner
(:class:`~miss_ext.tuner.MissTuner`), ``miss_model.base_model.model`` the wrapped model, and
adapter directories are PEFT's: ``save_pretrained`` writes what
``peft.PeftModel.from_pretrained`` reads, and ``MissModel.from_pretrained`` reads what PEFT
writes.

Where PEFT is installed, a MissModel *is* a ``peft.PeftModel`` (``isinstance`` holds; see
:mod:`miss_ext.trainer_support`): transformers' Trainer, TRL and accelerate decide by that
check alone whether to save an adapter or the whole model, where to find the labels and the
forward signature, and how to resume.

Every operation checks everything before it changes anything: an unknown target, a target
that is not nn.Linear, an r the layer cannot take, or an adapter file that does not fit the
model raises, and the model is left as it was.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import warnings
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .adapter_check import check_adapter_file, expected_adapter_keys  # noqa: F401 (public here before)
from .adapter_names import checked_names
from .config import PEFT_TYPE, MissConfig
from .files import load_tensors, write_adapter_files
from .layer import MissLinear
from .modules_to_save import ModulesToSaveWrapper
from .tuner import BLOCK_KEY, KEY_PREFIX, MissTuner  # noqa: F401 (BLOCK_KEY: public here before)

# What PEFT's save_pretrained / load_adapter take that has no effect on a MiSS adapter here.
_LOAD_OPTIONS_WITHOUT_EFFECT = ("torch_device", "low_cpu_mem_usage")


@functools.lru_cache(maxsize=None)
def _instance_class() -> type:
    """The class a new MissModel gets: the peft.PeftModel subclass where PEFT is installed."""
    if importlib.util.find_spec("peft") is None:
        return MissModel
    try:
        from .trainer_support import PeftMissModel
    except ImportError as error:  # a broken PEFT install: training stacks cannot use it either
        warnings.warn(f"peft is installed but does not import ({error}); MissModel is not a peft.PeftModel, so "
                      "transformers' Trainer will save whole models instead of adapters")
        return MissModel
    return PeftMissModel


class MissModel(nn.Module):
    """A model adapted by MiSS adapters. Attributes it does not have are looked up on the tuner
    (``base_model``), then on the wrapped model, as in PEFT: ``miss_model.config`` or
    ``miss_model.generate`` work as before."""

    prefix = "miss_"

    def __new__(cls, *args, **kwargs):
        # Chosen per instance, not at import: importing PEFT (and transformers) costs seconds,
        # which `import miss_ext` should not pay for users who never build a model.
        return super().__new__(_instance_class() if cls is MissModel else cls)

    def __init__(self, model: nn.Module, config: MissConfig, adapter_name: str = "default", *,
                 backend: str = "kernels") -> None:
        # Not super().__init__(): in the PEFT subclass the next class is peft.PeftModel, whose
        # __init__ would build PEFT's own tuner.
        nn.Module.__init__(self)
        self.base_model = MissTuner(model, backend=backend)
        # Code that reads inspect.signature(model.forward) (Trainer's column filter without PEFT,
        # TRL, accelerate) sees the wrapped model's parameters (through __wrapped__), where the
        # class's forward(*args, **kwargs) names none.
        self.forward = functools.update_wrapper(functools.partial(type(self).forward, self), model.forward)
        self.base_model.add_adapter(adapter_name, config)

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    # -- PEFT's attributes ------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The wrapped model (PEFT: ``base_model.model``)."""
        return self.base_model.model

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def peft_config(self) -> dict[str, MissConfig]:
        return self.base_model.peft_config

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self.base_model.active_adapter

    @property
    def active_peft_config(self) -> MissConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def peft_type(self):
        return PEFT_TYPE

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The names of every adapter's modules_to_save (None when there are none), as PEFT."""
        names = {n for config in self.peft_config.values() for n in (config.modules_to_save or [])}
        return names or None

    @property
    def has_active_enabled_adapter(self) -> bool:
        return bool(self.active_adapters) and any(not layer.disable_adapters for _, layer in self.miss_layers())

    @property
    def base_model_torch_dtype(self) -> Optional[torch.dtype]:
        return getattr(self.model, "dtype", None)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Every MiSS adapter converts to LoRA: standard and mini exactly, bat by a truncated
        SVD (:func:`miss_ext.export_lora`)."""
        return adapter_name in self.peft_config

    # -- adapters (the tuner's, as PEFT's PeftModel forwards them) ---------------------------

    def miss_layers(self) -> Iterator[tuple[str, MissLinear]]:
        return self.base_model.miss_layers()

    def _wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        return self.base_model._wrappers()

    def add_adapter(self, adapter_name: str, config: MissConfig) -> None:
        """Adds an adapter; the first one becomes active, later ones stay inactive (and frozen)
        until :meth:`set_adapter`, as in PEFT."""
        self.base_model.add_adapter(adapter_name, config)

    def set_adapter(self, adapter_names: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Makes these adapters active (and trainable, unless ``inference_mode``) on every layer."""
        self.base_model.set_adapter(adapter_names, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Turns gradients of these adapters on or off (an unknown name raises, where PEFT
        ignores it)."""
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    def disable_adapter(self):
        """A context manager within which the model computes exactly the base model."""
        return self.base_model.disable_adapter()

    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> nn.Module:
        """Merges the adapters into the weights and returns the plain model (no MissLinear)."""
        return self.base_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Returns the original model: adapters removed, merged ones unmerged first."""
        return self.base_model.unload()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return self.base_model.get_nb_trainable_parameters()

    def print_trainable_parameters(self) -> None:
        self.base_model.print_trainable_parameters()

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's file keys (``base_model.model.<path>.miss_block``,
        the adapter name removed); they share the parameters' storage."""
        return self.base_model.adapter_state_dict(adapter_name)

    # -- files ------------------------------------------------------------------------------

    def _file_tensors(self, adapter_name: str, state_dict: Optional[dict]) -> dict[str, torch.Tensor]:
        """The adapter's tensors to save: the live ones, or those of ``state_dict`` (a state
        dict of this whole model, as Trainer passes under DeepSpeed or FSDP)."""
        entries = self.base_model.adapter_entries(adapter_name)
        if state_dict is None:
            return {key: tensor.detach() for key, (_, tensor) in entries.items()}
        missing = [KEY_PREFIX + path for path, _ in entries.values() if KEY_PREFIX + path not in state_dict]
        if missing:
            raise ValueError(f"state_dict has no entry for adapter {adapter_name!r}'s tensors {missing[:3]}: "
                             "pass a state dict of this whole model (keys 'base_model.model.<path>...')")
        return {key: state_dict[KEY_PREFIX + path] for key, (path, _) in entries.items()}

    def save_pretrained(self, save_directory: Union[str, os.PathLike], safe_serialization: bool = True,
                        selected_adapters: Optional[Sequence[str]] = None,
                        save_embedding_layers: Union[str, bool] = "auto", is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: Optional[str] = None, **kwargs) -> None:
        """Writes each adapter as PEFT does (PEFT's signature): "default" in ``save_directory``,
        others in ``save_directory/<name>``: adapter_config.json and adapter_model.safetensors
        (``adapter_model.bin`` with ``safe_serialization=False``), each adapter directory
        replaced as a unit (a killed save never leaves new weights with an old config;
        miss_ext/files.py). ``state_dict=`` (a state dict of the whole model) supplies the
        values; ``is_main_process=False`` writes nothing. Other keyword arguments are ignored,
        as PEFT ignores them (push_to_hub passes ``max_shard_size``)."""
        directory = os.fspath(save_directory)
        if os.path.isfile(directory):
            raise ValueError(f"save_directory must be a directory, got the file {directory!r}")
        if save_embedding_layers not in ("auto", False):
            raise ValueError(f"save_embedding_layers must be 'auto' or False, got {save_embedding_layers!r}: MiSS adapts "
                             "nn.Linear layers only, so the adapter has no embedding layer to save (train and save "
                             "an embedding with modules_to_save=[...])")
        if path_initial_model_for_weight_conversion is not None:
            raise ValueError("path_initial_model_for_weight_conversion is for LoRA initialisations that change the base "
                             "weights (PiSSA, CorDA, OLoRA); a MiSS adapter leaves them alone, so it must be None, got "
                             f"{path_initial_model_for_weight_conversion!r}")
        names = checked_names(self.peft_config if selected_adapters is None else selected_adapters,
                              self.peft_config, "model")
        if not is_main_process:
            return
        for name in names:
            target = directory if name == "default" else os.path.join(directory, name)
            config = copy.deepcopy(self.peft_config[name])
            config.inference_mode = True
            if config.base_model_name_or_path is None:
                config.base_model_name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
            write_adapter_files(target, config.to_json(), self._file_tensors(name, kwargs.get("state_dict")),
                                safe_serialization=safe_serialization)

    def load_adapter(self, model_id: Union[str, os.PathLike], adapter_name: str, is_trainable: bool = False,
                     autocast_adapter_dtype: bool = True, **kwargs):
        """Loads the adapter saved in directory ``model_id`` under ``adapter_name``, as PEFT does.

        A new name is added inactive (frozen unless ``is_trainable``); an existing one gets the
        file's weights (what Trainer does to resume and to load the best checkpoint), after
        checking that the file fits it. With ``is_trainable=False`` the model is put in eval
        mode. Returns ``(missing_keys, unexpected_keys)``, both empty: a file that does not fit
        exactly is refused, the model unchanged.
        """
        unsupported = sorted(k for k in kwargs if k not in _LOAD_OPTIONS_WITHOUT_EFFECT)
        if unsupported:
            raise TypeError(f"load_adapter() does not support {unsupported} (miss_ext loads adapter directories "
                            "from disk; download a Hub adapter with huggingface_hub.snapshot_download first)")
        if autocast_adapter_dtype is not True:
            raise ValueError("autocast_adapter_dtype must be True (PEFT's default: float32 adapters on float16/bfloat16 "
                             f"models), got {autocast_adapter_dtype!r}")
        directory = os.fspath(model_id)
        config = MissConfig.from_pretrained(directory)
        tensors = load_tensors(directory)
        if adapter_name in self.peft_config:
            held = self.peft_config[adapter_name]
            if (config.variant, config.r) != (held.variant, held.r) or (held.variant == "mini" and config.mini_r != held.mini_r):
                raise ValueError(f"the adapter in {directory!r} is {config.variant!r} with r={config.r}, mini_r="
                                 f"{config.mini_r}; adapter {adapter_name!r} of this model is {held.variant!r} with "
                                 f"r={held.r}, mini_r={held.mini_r}: load it under a new name")
            check_adapter_file(self.model, held, tensors, directory)
        else:
            config.inference_mode = not is_trainable
            check_adapter_file(self.model, config, tensors, directory)
            self.add_adapter(adapter_name, config)
        self.base_model.load_adapter_tensors(adapter_name, tensors)
        if not is_trainable:
            self.eval()
        return nn.modules.module._IncompatibleKeys([], [])

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: Union[str, os.PathLike], adapter_name: str = "default",
                        is_trainable: bool = False, *, backend: str = "kernels") -> "MissModel":
        """Adapts ``model`` with the adapter saved in ``directory`` (by miss_ext or PEFT)."""
        directory = os.fspath(directory)
        config = MissConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        tensors = load_tensors(directory)
        check_adapter_file(model, config, tensors, directory)  # before the model is touched
        miss_model = cls(model, config, adapter_name, backend=backend)
        miss_model.base_model.load_adapter_tensors(adapter_name, tensors)
        if not is_trainable:
            miss_model.eval()
        return miss_model

    def push_to_hub(self, repo_id: str, **kwargs):
        """Uploads the adapter (what :meth:`save_pretrained` writes, and a model card) to the
        Hugging Face Hub, as PEFT's ``push_to_hub`` does; the arguments are transformers'
        ``PushToHubMixin.push_to_hub``'s. Offline, huggingface_hub's error says so."""
        from .hub import push_adapter_to_hub

        return push_adapter_to_hub(self, repo_id, **kwargs)


def get_miss_model(model: nn.Module, config: MissConfig, adapter_name: str = "default", *,
                   backend: str = "kernels") -> MissModel:
    """Adapts ``model`` in place with a MiSS adapter and returns the MissModel wrapping it."""
    return MissModel(model, config, adapter_name, backend=backend)
