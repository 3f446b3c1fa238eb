"""LoRA factors of a BAT adapter by truncated SVD (SPEC.md sec. 8).

A BAT adapter's update ``dW = W' - W`` (tile ``W_kj B_k + B_k``) depends on the base weight
and is not low-rank, so no LoRA holds it exactly. The best rank-k approximation in the
Frobenius norm is the truncated SVD (Eckart-Young): ``dW ~ (U_k S_k) V_k^T``, exported as
``lora_B = U_k S_k`` ``[out, k]`` and ``lora_A = V_k^T`` ``[k, in]`` with scaling 1, as PEFT's
``convert_to_lora`` does. ``rank`` is either that k (an int) or an energy fraction (a float
in (0, 1]): the smallest k whose singular values hold that fraction of ``sum(S**2)``, so each
layer gets the rank its update needs. The relative Frobenius error of each layer's exported
factors, ``||dW - lora_B @ lora_A|| / ||dW||``, is measured on the factors as stored (in the
block's dtype), so it includes their rounding.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

Rank = Union[int, float]


def check_rank(rank: Optional[Rank]) -> None:
    """None, an int >= 1, or a float in (0, 1]; anything else raises, naming ``rank``."""
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"rank must be an int (a fixed rank) or a float in (0, 1] (an energy fraction), "
                        f"got {type(rank).__name__} {rank!r}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"rank must be at least 1 when it is an int, got {rank}")
    if isinstance(rank, float) and not 0.0 < rank <= 1.0:
        raise ValueError(f"rank must be in (0, 1] when it is a float (a fraction of the energy), got {rank}")


def energy_rank(singular_values: Tensor, fraction: float) -> int:
    """The smallest k such that the k largest singular values hold ``fraction`` of the total
    energy ``sum(S**2)`` (singular values sorted in decreasing order, as torch.linalg.svd
    returns them)."""
    cumulative = torch.cumsum(singular_values.double() ** 2, dim=0)
    # float64: the cut must not move because the running sum rounded differently
    k = int(torch.searchsorted(cumulative, fraction * cumulative[-1]).item()) + 1
    return min(k, singular_values.numel())


def svd_lora_factors(delta: Tensor, rank: Rank, dtype: torch.dtype, layer: str = "") -> tuple[Tensor, Tensor, float]:
    """``(lora_A [k, in], lora_B [out, k], relative_error)`` of ``delta`` (``[out, in]``) in
    ``dtype``, by truncated SVD with ``rank`` (an int k or an energy fraction)."""
    check_rank(rank)
    if rank is None:
        raise ValueError("rank is required for an SVD export")
    work = delta.detach().to(torch.float64 if delta.dtype == torch.float64 else torch.float32)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    k = rank if isinstance(rank, int) else energy_rank(s, rank)
    if k > s.numel():
        raise ValueError(f"rank ({k}) must be at most min(out_features, in_features) = {s.numel()}"
                         f"{f' for layer {layer!r}' if layer else ''}")
    lora_b = (u[:, :k] * s[:k]).to(dtype).contiguous()
    lora_a = vh[:k].to(dtype).contiguous()
    reference = work.double()
    norm = torch.linalg.matrix_norm(reference).item()
    residual = torch.linalg.matrix_norm(reference - lora_b.double() @ lora_a.double()).item()
    return lora_a, lora_b, (residual / norm if norm > 0 else 0.0)
