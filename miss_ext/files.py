"""Adapter files: atomic writes and safe reads.

Every file is written to a temporary name in the same directory, flushed to disk and renamed
over the target, so a crash mid-save leaves either the old file or the new one, never a
truncated adapter that loads. Weights are read from safetensors; a legacy adapter_model.bin
is read only with ``torch.load(weights_only=True)`` (no arbitrary pickles).
"""

from __future__ import annotations

import os
import tempfile

import torch

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 & ~umask).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Writes a safetensors file atomically (contiguous CPU copies of the tensors)."""
    from safetensors.torch import save

    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write_bytes(path, data)


def load_tensors(directory: str) -> dict[str, torch.Tensor]:
    """The adapter weights of a directory: safetensors, else a legacy .bin read safely."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        from safetensors.torch import load_file

        return load_file(path)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) in {directory!r}")
