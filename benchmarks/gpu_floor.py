"""The floor of the CUDA path's design class, priced by the cost model's own rates: the least
time one layer's forward+backward can take on a GPU when its large GEMMs are cuBLAS's and the
rest are kernels of ours. A PREDICTION, like every figure of benchmarks/gpu_cost_model.py.

A cuBLAS GEMM reads its operands and an accumulated C from memory and writes its result there:
it takes no operand built on the fly and computes nothing else in its epilogue. So, beside the
base GEMMs, a variant pays at least for the passes listed below, each at the model's bandwidth,
and one launch gap for each kernel it needs at least. What is counted, and why it cannot go:

standard (y = x W^T + fold(x) B; dx = dy W + tile(dy B^T); dB = fold(x)^T dy):
- x read by the fold: the base GEMM reads x too, but returns no fold;
- y written with the delta (then the GEMM adds x W^T to it, beta = 1), and dx with the tile of
  g: cuBLAS adds only a C that is in memory; the other order is a read and a write after it;
- dy read for g = dy B^T and read again for dB = fold^T dy: g sums dy over out and dB over the
  tokens, so one pass would need partial sums across blocks (atomics, or a workspace of
  tokens / band x r x out floats);
- the fold written by the forward and read by the backward (N x r float32, kept for it);
- 3 kernels beyond the base GEMMs: fold and delta in one, g and its tile in one, dB.
mini: as standard, but dy is read once (its fold along out gives both g and dB): x, y, dy, dx,
  the fold; 3 kernels (fold and tiled delta; fold of dy; the tile of g).
bat (y = x W'^T with W' = the transform of W; dx = dy W'; G = dy^T x; dB from G and W):
- the G GEMM, a third base GEMM (its float32 output written under its arithmetic);
- W read and W' written by the forward's transform, and again by dx's: cuBLAS multiplies only
  a W' in memory, and the backward rebuilds it (nothing weight-sized is kept for backward);
- G (float32) and W read by the block gradient;
- 3 kernels: two transforms and the block gradient.
"""

from __future__ import annotations

from typing import Dict

BF16, FP32 = 2, 4


def floor_terms(variant: str, shape, gpu: Dict, gemm_efficiency: float, memory_efficiency: float,
                kernel_floor_us: float, launch_gap_us: float) -> Dict[str, float]:
    """Microseconds of each term of `variant`'s floor ("frozen Linear", "standard", "mini",
    "bat") at `shape` (tokens, in_features, out_features, r) on `gpu`: GPU time, as the cost
    model prices it (every call at least kernel_floor_us, plus launch_gap_us after it); the
    host's time, which bounds small shapes, is not a floor of the design."""
    t, i, o, r = shape.tokens, shape.in_features, shape.out_features, shape.r
    bandwidth = gpu["hbm_tb_s"] * 1e12 * memory_efficiency

    def gemm(m: int, k: int, n: int, out_bytes: int = BF16) -> float:
        flops = 2 * m * k * n
        bytes_ = BF16 * (m * k + k * n) + out_bytes * m * n
        us = max(flops / (gpu["bf16_tflops"] * 1e12 * gemm_efficiency), bytes_ / bandwidth) * 1e6
        return max(us, kernel_floor_us) + launch_gap_us

    def kernels(count: int, bytes_: int) -> float:  # `count` kernels of ours moving `bytes_` in all
        return max(bytes_ / bandwidth * 1e6, count * kernel_floor_us) + count * launch_gap_us

    terms = {"base GEMMs": gemm(t, i, o) + gemm(t, o, i)}
    fold = 2 * FP32 * t * r  # written by the forward, read by the backward
    if variant == "standard":
        terms["3 kernels: x, y, dy twice, dx"] = kernels(3, BF16 * t * (i + o + 2 * o + i) + fold)
    elif variant == "mini":
        terms["3 kernels: x, y, dy, dx"] = kernels(3, BF16 * t * (i + o + o + i) + fold)
    elif variant == "bat":
        terms["G GEMM"] = gemm(o, t, i, out_bytes=FP32)
        terms["3 kernels: W and W' twice, G and W"] = kernels(3, 2 * (BF16 * i * o + BF16 * i * o) + FP32 * i * o
                                                              + BF16 * i * o)
    elif variant != "frozen Linear":
        raise ValueError(f"gpu_floor: no floor for variant {variant!r}")
    return terms


def floor_ratios(shape, gpu: Dict, gemm_efficiency: float, memory_efficiency: float, kernel_floor_us: float,
                 launch_gap_us: float) -> Dict[str, Dict]:
    """Each variant's floor: its terms, its microseconds and its ratio to the frozen Linear's
    (its two GEMMs: the cost model's GPU time of the frozen Linear)."""
    rows = {}
    for variant in ("frozen Linear", "standard", "mini", "bat"):
        terms = floor_terms(variant, shape, gpu, gemm_efficiency, memory_efficiency, kernel_floor_us, launch_gap_us)
        rows[variant] = {"terms": terms, "us": sum(terms.values())}
    frozen = rows["frozen Linear"]["us"]
    for row in rows.values():
        row["ratio"] = row["us"] / frozen
    return rows
