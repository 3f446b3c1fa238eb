"""The floor of the CUDA path's design class, priced by the cost model's own rates: the least
time one layer's forward+backward can take on a GPU when its large GEMMs are cuBLAS's and the
rest are kernels of ours. A PREDICTION, like every figure of benchmarks/gpu_cost_model.py.

A cuBLAS GEMM reads its operands and an accumulated C from memory and writes its result there:
it takes no operand built on the fly and computes nothing else in its epilogue. So, beside the
base GEMMs, a variant issues at least the kernels listed below, moving at least these bytes.
floor_trace() writes them down as a trace, and gpu_cost_model.py prices it like any recorded
one (GPU time only: the host's, which bounds small shapes, is not a floor of the design).
What is counted, and why it cannot go:

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

from typing import List

import gpu_trace

BF16 = "c10::BFloat16"
VARIANTS = ("frozen Linear", "standard", "mini", "bat")


def _kernel(name: str, phase: str, **buffers: int) -> gpu_trace.Call:
    """A kernel of ours that moves `buffers` (name: bytes; a name ending in _out is written,
    any other read), memory-bound, on every SM."""
    roles = [(key, "out" if key.endswith("_out") else "in", bytes_) for key, bytes_ in buffers.items()]
    return gpu_trace.Call(name, [], [], buffers=roles, phase=phase)


def _gemm(name: str, phase: str, a, b) -> gpu_trace.Call:
    return gpu_trace.Call(name, [a, b], [BF16, BF16], phase=phase)


def floor_trace(variant: str, shape: gpu_trace.Shape) -> gpu_trace.Trace:
    """The least `variant` ("frozen Linear", "standard", "mini", "bat") issues for one
    forward+backward at `shape`."""
    t, i, o, r = shape.tokens, shape.in_features, shape.out_features, shape.r
    x, dx, y, dy = 2 * t * i, 2 * t * i, 2 * t * o, 2 * t * o  # bf16 activations
    fold, weight = 4 * t * r, 2 * o * i
    calls: List[gpu_trace.Call] = [_gemm("aten::mm", "forward", (t, i), (i, o)),
                                   _gemm("aten::mm", "backward", (t, o), (o, i))]
    if variant == "standard":
        calls += [_kernel("fold and delta", "forward", x=x, y_out=y, fold_out=fold),
                  _kernel("g and its tile", "backward", dy=dy, dx_out=dx),
                  _kernel("dB", "backward", dy=dy, fold=fold)]
    elif variant == "mini":
        calls += [_kernel("fold and tiled delta", "forward", x=x, y_out=y, fold_out=fold),
                  _kernel("fold of dy, g and dB", "backward", dy=dy, fold=fold),
                  _kernel("tile of g", "backward", dx_out=dx)]
    elif variant == "bat":
        calls += [_kernel("transform", "forward", w=weight, w_transformed_out=weight),
                  gpu_trace.Call("mm.dtype", [(o, t), (t, i)], [BF16, BF16], phase="backward"),  # G, float32
                  _kernel("block gradient", "backward", g=2 * weight, w=weight),  # G is float32
                  _kernel("transform for dx", "backward", w=weight, w_transformed_out=weight)]
    elif variant != "frozen Linear":
        raise ValueError(f"gpu_floor: no floor for variant {variant!r}")
    return gpu_trace.Trace(calls, host_calls=0, python_calls=0, peak_bytes=0)
