"""Adapter files: an adapter directory replaced as a unit, and safe reads.

An adapter is two files, ``adapter_config.json`` and ``adapter_model.safetensors``; neither
means anything without the other. :func:`write_adapter_files` replaces both so that a save
killed at any moment leaves a directory that loads the old adapter, loads the new one, or is
refused with a clear error (no adapter_config.json), never new weights with an old config:

1. both files are serialised in memory (nothing on disk changes if that fails), written to
   temporary names in the directory and flushed to disk;
2. the old adapter_config.json is removed: from here until step 4 the directory has no config,
   and every loader (ours, PEFT's) refuses it;
3. the new weights are renamed over the old ones (an old file of the other format,
   adapter_model.bin or .safetensors, is removed first: loaders would prefer it);
4. the new config is renamed into place.

Temporaries left by a killed save are removed by the next save into the same directory.
Weights are read from safetensors; a legacy adapter_model.bin is read only with
``torch.load(weights_only=True)`` (no arbitrary pickles).
"""

from __future__ import annotations

import glob
import io
import os
import tempfile

import torch

from .config import CONFIG_NAME

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_pattern(name: str) -> str:
    return "." + name + ".*" + _TEMP_SUFFIX


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: str, name: str, data: bytes) -> str:
    """``data`` in a new temporary file beside ``name``, flushed to disk; returns its path."""
    fd, temp = tempfile.mkstemp(prefix="." + name + ".", suffix=_TEMP_SUFFIX, dir=directory)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 & ~umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    return temp


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Replaces one file atomically: the old content or the new, never a truncated file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temp = _write_temp(directory, os.path.basename(path), data)
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
    _fsync_directory(directory)


def interrupted_save_leftovers(directory: str) -> list[str]:
    """Temporary files that a killed adapter save left in ``directory``."""
    patterns = [os.path.join(directory, _temp_pattern(name)) for name in (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME)]
    return sorted(path for pattern in patterns for path in glob.glob(pattern))


def serialize_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """A safetensors file's bytes (contiguous CPU copies of the tensors)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def serialize_tensors_legacy(tensors: dict[str, torch.Tensor]) -> bytes:
    """An adapter_model.bin's bytes (torch.save of plain tensors, readable with weights_only)."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, buffer)
    return buffer.getvalue()


def write_adapter_files(directory: str, config_json: bytes, tensors: dict[str, torch.Tensor], *,
                        safe_serialization: bool = True) -> None:
    """Replaces the adapter in ``directory`` (config and weights) as a unit; see the module doc.

    ``safe_serialization=False`` writes adapter_model.bin, as PEFT does.
    """
    if not isinstance(safe_serialization, bool):
        raise TypeError(f"safe_serialization must be a bool, got {safe_serialization!r}")
    name, other = (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) if safe_serialization else (LEGACY_WEIGHTS_NAME, WEIGHTS_NAME)
    weights = serialize_tensors(tensors) if safe_serialization else serialize_tensors_legacy(tensors)
    os.makedirs(directory, exist_ok=True)
    for leftover in interrupted_save_leftovers(directory):
        os.unlink(leftover)
    temps = []
    try:
        temps.append(_write_temp(directory, name, weights))
        temps.append(_write_temp(directory, CONFIG_NAME, config_json))
        config_path = os.path.join(directory, CONFIG_NAME)
        if os.path.lexists(config_path):
            os.unlink(config_path)
            _fsync_directory(directory)
        # Loaders (ours and PEFT's) prefer the safetensors file: an old one beside a new .bin
        # would be loaded instead of it, so the other format goes while there is no config.
        if os.path.lexists(os.path.join(directory, other)):
            os.unlink(os.path.join(directory, other))
        os.replace(temps[0], os.path.join(directory, name))
        _fsync_directory(directory)
        os.replace(temps[1], config_path)
        _fsync_directory(directory)
    except BaseException:
        for temp in temps:
            if os.path.exists(temp):
                os.unlink(temp)
        raise


def _config_missing_message(directory: str) -> str:
    leftovers = interrupted_save_leftovers(directory)
    if leftovers:
        return (f"no {CONFIG_NAME} in {directory!r}: a save into it was interrupted (it left "
                f"{os.path.basename(leftovers[0])}), so the adapter there is incomplete; save it again")
    return f"no {CONFIG_NAME} in {directory!r}"


def check_config_present(directory: str) -> str:
    """The path of the directory's adapter_config.json; FileNotFoundError that says why not."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(_config_missing_message(directory))
    return path


def load_tensors(directory: str) -> dict[str, torch.Tensor]:
    """The adapter weights of a directory: safetensors, else a legacy .bin read safely."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own SafetensorError, not an OSError
            raise ValueError(f"{path!r} is not a readable safetensors file ({error}): it may be "
                             "truncated or not an adapter; save the adapter again") from error
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"{legacy!r} cannot be read as a weights-only torch file ({error})") from error
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) in {directory!r}")
