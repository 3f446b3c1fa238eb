"""miss_ext: MiSS (Matrix Shard Sharing) adapters on hand-written CPU and CUDA kernels.

Importing the package loads the compiled library, which registers ``torch.ops.miss.*``.
"""

import torch

from . import ops
from .config import MissConfig
from .export import export_lora
from .layer import MissLinear
from .model import MissModel, get_miss_model
from .ops import (
    bat_block_grad,
    bat_linear,
    bat_weight,
    bat_weight_grad,
    dropout_seed,
    merge_,
    shard_delta_add,
    shard_fold,
    shard_linear,
    shard_tile_add,
    unmerge_,
)

__version__ = "0.1.0"


def has_cuda_kernels() -> bool:
    """Whether this build of miss_ext carries CUDA kernels (independent of a GPU being present)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("miss::shard_fold", "CUDA")


__all__ = [
    "MissConfig",
    "MissLinear",
    "MissModel",
    "get_miss_model",
    "export_lora",
    "ops",
    "has_cuda_kernels",
    "dropout_seed",
    "shard_fold",
    "shard_tile_add",
    "shard_linear",
    "shard_delta_add",
    "bat_weight",
    "bat_block_grad",
    "bat_weight_grad",
    "bat_linear",
    "merge_",
    "unmerge_",
]
