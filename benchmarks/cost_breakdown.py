"""Where the time of an adapted layer goes: each piece of DESIGN.md's cost model timed alone,
side by side with the frozen Linear's two GEMMs, and the floor each variant adds up to.

The pieces are the ones miss_ext's ops run (shard_linear, shard_linear_backward, bat_linear,
bat_linear_backward): the fold of x (with and without dropout, whose Philox mask is drawn
again in backward), the thin GEMMs of the activation path (f @ B into y, g = dy @ B^T,
dB = f^T @ dy), the tile-add into dx, the merged weight W + dW of the weight path, and BAT's
W' and dB and its full G = dy^T x. A floor is the frozen Linear plus the pieces a variant
cannot skip; bench_layer.py's measured ratio can be read against it.

    python benchmarks/cost_breakdown.py                     # tokens=in=out=2048, r=64, fp32
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import miss_ext  # noqa: E402


def pieces(args, device) -> dict:
    """name -> a function timing one piece, on random non-zero data."""
    torch.manual_seed(0)
    n, i, o, r = args.tokens, args.in_features, args.out_features, args.r
    x = torch.randn(n, i, device=device)
    dy = torch.randn(n, o, device=device)
    w = torch.randn(o, i, device=device) * 0.02
    bias = torch.randn(o, device=device)
    block = torch.randn(r, o, device=device) * 0.02
    bat_block = torch.randn(o // r, r, r, device=device) * 0.02
    fold = torch.randn(n, r, device=device)
    g = torch.randn(n, r, device=device)
    y = torch.randn(n, o, device=device)
    grad_w = torch.randn(o, i, device=device)
    seed = miss_ext.dropout_seed(device)
    dx = torch.empty(n, i, device=device)
    return {
        "base: y = x W^T + b (addmm)": lambda: torch.addmm(bias, x, w.t()),
        "base: dx = dy W (mm)": lambda: torch.mm(dy, w),
        "fold of x": lambda: miss_ext.shard_fold(x, r),
        "fold of x, dropout 0.1 (mask drawn)": lambda: miss_ext.shard_fold(x, r, 0.1, seed),
        "tile-add into dx": lambda: miss_ext.shard_tile_add(dx, g),
        "tile-add into dx, dropout 0.1 (mask drawn again)": lambda: miss_ext.shard_tile_add(dx, g, 0.1, seed),
        "clone of dx (inside the tile-add op above)": lambda: dx.clone(),
        "thin GEMM y += f @ B": lambda: y.addmm_(fold, block),
        "thin GEMM g = dy @ B^T": lambda: torch.mm(dy, block.t()),
        "thin GEMM dB = f^T @ dy": lambda: torch.mm(fold.t(), dy),
        "merged weight W + dW (weight path)": lambda: miss_ext.merge_(w.clone(), block),
        "W.clone() (inside the line above)": lambda: w.clone(),
        "BAT W' (batched r x r products)": lambda: miss_ext.bat_weight(w, bat_block),
        "BAT G = dy^T x (full GEMM)": lambda: torch.mm(dy.t(), x),
        "BAT dB from G and W": lambda: miss_ext.bat_block_grad(grad_w, w, r),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_layer_size_args(parser)
    harness.add_run_args(parser, repeats=15)
    args = parser.parse_args(argv)
    device, info = harness.start_run(args)
    fns = pieces(args, device)
    ms = {k: v * 1e3 for k, v in harness.round_robin(fns, device, args.repeats, args.warmup + 1).items()}
    linear = ms["base: y = x W^T + b (addmm)"] + ms["base: dx = dy W (mm)"]
    merged = ms["merged weight W + dW (weight path)"] - ms["W.clone() (inside the line above)"]
    tile = ms["tile-add into dx, dropout 0.1 (mask drawn again)"] - ms["clone of dx (inside the tile-add op above)"]
    # The weight path's cost (W' twice) does not depend on N; what it saves (two thin GEMMs and
    # the tile-add pass) grows with N: where they meet is the row count above which it pays.
    saved_by_weight_path = ms["thin GEMM y += f @ B"] + ms["thin GEMM g = dy @ B^T"] + \
        ms["tile-add into dx"] - ms["clone of dx (inside the tile-add op above)"]
    crossover_rows = args.tokens * 2 * merged / saved_by_weight_path
    floors = {
        # weight path: W' built in forward and again in backward, plus the fold and dB
        "standard (weight path)": ms["fold of x"] + 2 * merged + ms["thin GEMM dB = f^T @ dy"],
        # activation path: the three thin GEMMs, the mask twice, the tile-add
        "standard, dropout 0.1": ms["fold of x, dropout 0.1 (mask drawn)"] + ms["thin GEMM y += f @ B"]
        + ms["thin GEMM g = dy @ B^T"] + ms["thin GEMM dB = f^T @ dy"] + tile,
        # W' in forward and again in backward, the full G, dB from G and W
        "bat": 2 * ms["BAT W' (batched r x r products)"] + ms["BAT G = dy^T x (full GEMM)"]
        + ms["BAT dB from G and W"],
    }
    text = harness.header_markdown("Cost breakdown: the pieces of an adapted layer, timed alone", info)
    text += (f"tokens={args.tokens}, in={args.in_features}, out={args.out_features}, r={args.r}, fp32; median of "
             f"{args.repeats} round-robin repeats. The frozen Linear's fwd+bwd (two GEMMs) is {linear:.1f} ms.\n\n")
    text += "| piece | ms | share of the frozen Linear's fwd+bwd |\n|---|---|---|\n"
    for name, value in ms.items():
        text += f"| {name} | {value:.2f} | {value / linear * 100:.1f}% |\n"
    text += "\n| variant | extra ms its pieces add | floor (fwd+bwd / frozen Linear) |\n|---|---|---|\n"
    for name, extra in floors.items():
        text += f"| {name} | {extra:.1f} | {(linear + extra) / linear:.3f}x |\n"
    text += (f"\nWeight path against activation path (no dropout, fp32): W + dW twice costs {2 * merged:.2f} ms "
             f"whatever N; the thin GEMMs f @ B and dy @ B^T and the tile-add it replaces cost "
             f"{saved_by_weight_path:.2f} ms at N={args.tokens}, so it pays above N ~ {crossover_rows:.0f} rows "
             f"(rows * r >= {crossover_rows * args.r / args.in_features:.0f} * in: csrc/ops/shard_ops.cpp, "
             "kWeightPathCrossover).\n")
    name = args.name or f"cost_breakdown_{device.type}_{args.tokens}x{args.in_features}x{args.out_features}_r{args.r}"
    json_path, md_path = harness.write_results(
        name, {"machine": info, "args": vars(args), "pieces_ms": ms, "floor_extra_ms": floors,
               "linear_fwd_bwd_ms": linear,
               "weight_path_crossover_rows": crossover_rows}, text, args.out_dir)
    print(text)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
