"""MissConfig: PEFT's MissConfig fields, defaults and validation, and its adapter_config.json.

A config written here loads in PEFT (``peft.PeftConfig.from_pretrained``) and a PEFT MiSS
config loads here, so adapter directories move between the two in both directions.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

PEFT_TYPE = "MISS"
CONFIG_NAME = "adapter_config.json"
VARIANTS = {True: "standard", "mini": "mini", "bat": "bat", False: "standard"}
BIAS_MODES = ("none", "all", "MiSS_only")


def variant_of(init_weights: Union[bool, str]) -> str:
    """'standard', 'mini' or 'bat' for a valid ``init_weights`` (False is a random standard)."""
    return VARIANTS[init_weights]


def check_init_weights(init_weights: Any) -> None:
    if not (init_weights is True or init_weights is False or init_weights in ("bat", "mini")):
        raise ValueError(
            f"init_weights must be True (standard), False (standard, random init), 'bat' or 'mini', "
            f"got {init_weights!r}"
        )


def check_adapter_hyperparameters(r: Any, mini_r: Any, miss_dropout: Any, init_weights: Any) -> None:
    """The per-adapter rules shared by MissConfig and MissLinear."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if isinstance(mini_r, bool) or not isinstance(mini_r, int) or mini_r <= 0:
        raise ValueError(f"mini_r must be a positive int, got {mini_r!r}")
    if isinstance(miss_dropout, bool) or not isinstance(miss_dropout, (int, float)) or not 0.0 <= miss_dropout <= 1.0:
        raise ValueError(f"miss_dropout must be a float in [0, 1], got {miss_dropout!r}")
    check_init_weights(init_weights)


@dataclass
class MissConfig:
    """The configuration of a MiSS adapter, field for field PEFT's ``MissConfig``.

    Args:
        r: shard width along in_features (the block has r rows). Default 64.
        miss_dropout: dropout probability on the adapter's input (standard and mini; bat
            applies none, as in PEFT).
        mini_r: columns of a mini block (must divide out_features). Default 1.
        target_modules: module names (exact or suffix match), a regex string (full match), or
            ``"all-linear"`` (every nn.Linear but the output layer). None: PEFT's default for
            the model's architecture.
        exclude_modules: names (exact or suffix) or a regex of modules never adapted.
        init_weights: True standard (block zeros), "mini", "bat", or False (standard with a
            random block, for tests).
        layers_to_transform / layers_pattern: adapt only these layer indices (an int or list),
            found after ``layers_pattern`` (e.g. "layers", "h") in the module path.
        bias: "none", "all" (train every bias) or "MiSS_only" (biases of adapted layers).
        modules_to_save: modules (e.g. a new classifier) trained in full and saved with the
            adapter.
    """

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    peft_type: str = field(default=PEFT_TYPE)

    def __post_init__(self):
        if self.peft_type != PEFT_TYPE:
            raise ValueError(f"peft_type must be {PEFT_TYPE!r} for a MiSS adapter, got {self.peft_type!r}")
        check_adapter_hyperparameters(self.r, self.mini_r, self.miss_dropout, self.init_weights)
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        # PEFT keeps name lists as sets; lists are kept here so that the JSON stays ordered.
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise TypeError(f"{name} must be a list of names, a regex string or None, got {type(value).__name__}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if isinstance(self.layers_to_transform, bool) or not (
            self.layers_to_transform is None
            or isinstance(self.layers_to_transform, int)
            or (isinstance(self.layers_to_transform, list) and all(isinstance(i, int) for i in self.layers_to_transform))
        ):
            raise TypeError(f"layers_to_transform must be an int or a list of ints, got {self.layers_to_transform!r}")
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, list):
            raise TypeError(f"modules_to_save must be a list of names, got {self.modules_to_save!r}")

    @property
    def variant(self) -> str:
        return variant_of(self.init_weights)

    def __getattr__(self, name: str):
        # Reached only for attributes a MissConfig lacks. PEFT's model-level functions read
        # PeftConfig-only attributes first (is_prompt_learning, ...), then find the adapter's
        # tensors by PEFT's layer classes, which miss_ext's layers are not: on a MissModel,
        # peft.get_peft_model_state_dict would return an empty dict. It stops here, saying so.
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"'MissConfig' object has no attribute {name!r}: miss_ext's MissConfig is not a peft.PeftConfig, and "
            "PEFT's functions that take a model and find its adapters by PEFT's layer classes "
            "(peft.get_peft_model_state_dict, peft.set_peft_model_state_dict) cannot see miss_ext's layers. Use "
            "MissModel.adapter_state_dict(adapter_name) (PEFT's file keys) and MissModel.load_adapter(directory, "
            "adapter_name); miss_ext.integrations.peft.to_peft_config(config) gives the peft.MissConfig"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MissConfig":
        """A config from an adapter_config.json dict; PEFT's bookkeeping keys are ignored."""
        if values.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
            raise ValueError(f"not a MiSS adapter: peft_type is {values.get('peft_type')!r}, expected {PEFT_TYPE!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_json(self) -> bytes:
        """The adapter_config.json PEFT writes for this config."""
        values = self.to_dict()
        values["peft_version"] = _peft_version_written()
        return config_file_bytes(values)

    def save_pretrained(self, directory: str) -> str:
        """Writes adapter_config.json atomically; returns its path."""
        from .files import atomic_write_bytes

        path = os.path.join(directory, CONFIG_NAME)
        atomic_write_bytes(path, self.to_json())
        return path

    @classmethod
    def from_pretrained(cls, directory: str) -> "MissConfig":
        from .files import check_config_present

        with open(check_config_present(directory)) as f:
            return cls.from_dict(json.load(f))


def config_file_bytes(values: dict) -> bytes:
    """An adapter_config.json's bytes, formatted as PEFT writes them."""
    return (json.dumps(values, indent=2, sort_keys=True) + "\n").encode()


def _peft_version_written() -> str:
    """The PEFT version field PEFT writes; the installed PEFT's when there is one."""
    try:
        import peft

        return peft.__version__
    except ImportError:
        return "0.17.0"
