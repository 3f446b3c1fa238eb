"""Why a bf16 layer's backward does not take the weight path (csrc/ops/shard_ops.cpp
use_weight_path): dx = dy @ bf16(W + dW) would skip g = dy B^T and the tile of g (about 30 us of
the standard variant's predicted 148 us over the frozen Linear on an H100), but rounding
W + dW to bf16 drops the part of dW below half an ulp of W, the same way in every element.

This script measures, on the CPU, the error of dx against a float64 oracle for the two ways:
- activation path (what the CUDA path computes): dy W accumulated in float32 over the tile of
  g rounded to bf16, one rounding at the end (cuBLAS with beta = 1 over the written tile);
- weight path: dy @ bf16(W + dW), float32 accumulation, one rounding.
and the same-precision reference of the suite's 2x rule (the CPU kernels: bf16 dy W, then the
tile of g added in float32 and rounded once). A random block leaves the two close; a block of
one sign with a dy of one sign makes the dropped parts add up, and the weight path's error
passes twice the reference's (the suite's bound, tests/conftest.py assert_close_to_oracle).

    python benchmarks/weight_path_numerics.py
"""

from __future__ import annotations

import argparse

import torch


def errors(dy: torch.Tensor, weight: torch.Tensor, block: torch.Tensor) -> dict:
    in_features = weight.shape[1]
    delta = block.t().repeat(1, in_features // block.shape[0])  # dW[o, i] = B[i % r, o]
    oracle = dy.double() @ (weight.double() + delta.double())
    g_tiled = (dy.float() @ block.t()).repeat(1, in_features // block.shape[0])
    activation = (dy.float() @ weight.float() + g_tiled.bfloat16().float()).bfloat16()
    reference = ((dy.float() @ weight.float()).bfloat16().float() + g_tiled).bfloat16()
    weight_path = (dy.float() @ (weight.float() + delta).bfloat16().float()).bfloat16()

    def err(t):
        return (t.double() - oracle).abs().max().item()

    return {"reference": err(reference), "activation path": err(activation), "weight path": err(weight_path)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--r", type=int, default=64)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    n, fin, fout, r = args.tokens, args.in_features, args.out_features, args.r
    weight = (torch.randn(fout, fin, generator=gen) / fin ** 0.5).bfloat16()
    cases = {"random block, random dy": (torch.randn(n, fout, generator=gen).bfloat16(),
                                         lambda c: torch.randn(r, fout, generator=gen) * c / fin ** 0.5)}
    positive_dy = torch.randn(n, fout, generator=gen).abs().bfloat16()
    cases["block of one sign, dy >= 0"] = (positive_dy, lambda c: torch.full((r, fout), c / fin ** 0.5))
    print(f"dx = dy @ (W + dW), bf16, tokens {n}, in {fin}, out {fout}, r {r}; max |error| vs float64")
    print("| case | |B| / |W| | reference (CPU kernels) | activation path | weight path | weight path / reference |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for name, (dy, make_block) in cases.items():
        for c in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
            e = errors(dy, weight, make_block(c))
            ratio = e["weight path"] / e["reference"]
            worst = max(worst, ratio)
            print(f"| {name} | {c:g} | {e['reference']:.3e} | {e['activation path']:.3e} | {e['weight path']:.3e} | "
                  f"{ratio:.2f} |")
    print(f"worst weight path / reference: {worst:.2f} (the suite allows 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
