"""Which modules of a model a MissConfig adapts: PEFT's matching rules, in our own code.

- ``target_modules`` as a list: a module is targeted when its full name equals an entry or
  ends with ``"." + entry``; as a string: when the full name matches it as a regex
  (``re.fullmatch``); ``"all-linear"``: every ``nn.Linear`` but the output layer of a
  transformers model (and the classifier head of a sequence-classification task).
- ``None``: PEFT's default targets for the model's architecture (``config.model_type``).
- ``exclude_modules`` removes modules with the same rules.
- ``layers_to_transform`` keeps only modules whose layer index (the number after
  ``layers_pattern``, or after the first module list in the path) is listed.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union

from torch import nn

from .config import MissConfig

ALL_LINEAR = "all-linear"
SEQUENCE_CLASSIFICATION_HEADS = ("score", "classifier")

# PEFT's default MiSS targets (the same table as its LoRA defaults) for architectures whose
# targets are nn.Linear; architectures whose attention projections are Conv1D or fused
# (gpt2, bloom, falcon, ...) are left out: MiSS adapts nn.Linear only.
DEFAULT_TARGET_MODULES = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}


def _matches(name: str, patterns: Union[str, Iterable[str]]) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _layer_index(name: str, layers_pattern: Optional[Union[str, list]]) -> Optional[int]:
    """The first number after ``layers_pattern`` (any module name when it is empty) in name."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
            if match:
                break
    return int(match.group(1)) if match else None


def _in_modules_to_save(name: str, modules_to_save: Optional[list]) -> bool:
    """Modules trained in full (and their children) are never adapted too, as in PEFT."""
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def _output_layer_names(model: nn.Module, config: MissConfig) -> set:
    excluded = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    heads = [output] if output is not None else []
    if output is None and config.task_type == "SEQ_CLS":
        heads = [getattr(model, n) for n in SEQUENCE_CLASSIFICATION_HEADS if getattr(model, n, None) is not None][:1]
    for name, module in model.named_modules():
        if any(module is head for head in heads):
            excluded.add(name)
    return excluded


def resolve_target_patterns(model: nn.Module, config: MissConfig) -> Union[str, list]:
    """target_modules with None and "all-linear" resolved to explicit names or suffixes."""
    from .layer import MissLinear

    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"target_modules is None and there are no default targets for model_type {model_type!r}: "
                "set target_modules (names, a regex, or 'all-linear')"
            )
        return list(DEFAULT_TARGET_MODULES[model_type])
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        inner = {f"{prefix}.{child}" for prefix, m in model.named_modules() if isinstance(m, MissLinear)
                 for child, _ in m.named_modules() if child}
        linear = {
            name for name, m in model.named_modules() if isinstance(m, (nn.Linear, MissLinear)) and name not in inner
        }
        return sorted(linear - _output_layer_names(model, config))
    return targets


def find_targets(model: nn.Module, config: MissConfig) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every module the config adapts, in model order.

    Raises ValueError when nothing matches, TypeError when a match is not an nn.Linear (or a
    MissLinear adding an adapter); the model is not touched.
    """
    from .layer import MissLinear
    from .modules_to_save import ModulesToSaveWrapper

    patterns = resolve_target_patterns(model, config)
    layers = config.layers_to_transform
    if isinstance(layers, int):
        layers = [layers]
    inside_adapters = set()
    for prefix, module in model.named_modules():
        if isinstance(module, (MissLinear, ModulesToSaveWrapper)):
            inside_adapters |= {f"{prefix}.{child}" for child, _ in module.named_modules() if child}
    found = []
    for name, module in model.named_modules():
        if not name or name in inside_adapters or not _matches(name, patterns):
            continue
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        if _in_modules_to_save(name, config.modules_to_save):
            continue
        if layers is not None and _layer_index(name, config.layers_pattern) not in layers:
            continue
        if not isinstance(module, (nn.Linear, MissLinear)):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}: MiSS adapts nn.Linear layers only "
                "(narrow target_modules or add it to exclude_modules)"
            )
        found.append((name, module))
    if not found:
        sample = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(
            f"Target modules {patterns!r} not found in the base model (exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r}); some module names: {sample}"
        )
    return found


def find_modules_to_save(model: nn.Module, names: Optional[list]) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every module named (exactly or as a suffix) in modules_to_save."""
    if not names:
        return []
    found = [(n, m) for n, m in model.named_modules() if n and _matches(n, names)]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n, _ in found)]
    if missing:
        raise ValueError(f"modules_to_save {missing} not found in the model")
    return found
