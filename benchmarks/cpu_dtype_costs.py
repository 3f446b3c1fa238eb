"""Two properties of torch's CPU kernels that shape the bf16 results of bench_layer.py, measured
on the machine at hand: the time of a bf16 GEMM in each operand layout against fp32 (without
AVX-512 BF16 some layouts fall back to a slow path), and the time of one in-place pass over a
weight (torch's own ``w.mul_(1.0)``, and miss_ext's merge) against one ``W.copy_()``.

    python benchmarks/cpu_dtype_costs.py
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import miss_ext  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemm-size", type=int, default=1024)
    parser.add_argument("--weight-size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="cpu_dtype_costs")
    parser.add_argument("--out-dir", default=harness.RESULTS)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    info = harness.machine_info(device)
    torch.manual_seed(0)
    n = args.gemm_size
    gemms = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        name = str(dtype).replace("torch.", "")
        gemms[f"{name} a @ b.t()  (x @ W^T, the forward)"] = lambda a=a, b=b: a @ b.t()
        gemms[f"{name} a @ b      (dy @ W, the dx GEMM)"] = lambda a=a, b=b: a @ b
        gemms[f"{name} a.t() @ b  (dy^T @ x, a weight gradient)"] = lambda a=a, b=b: a.t() @ b
    gemm_ms = {k: v * 1e3 for k, v in harness.round_robin(gemms, device, args.repeats).items()}

    m = args.weight_size
    passes = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        weight, other = torch.randn(m, m).to(dtype), torch.empty(m, m, dtype=dtype)
        block = torch.randn(64, m) * 0.02
        name = str(dtype).replace("torch.", "")
        passes[f"{name} W.copy_()"] = lambda w=weight, o=other: o.copy_(w)
        passes[f"{name} w.mul_(1.0) (torch, in place)"] = lambda w=weight: w.mul_(1.0)
        passes[f"{name} miss_ext.merge_ (standard, r=64)"] = lambda w=weight, b=block: miss_ext.merge_(w, b)
    pass_ms = {k: v * 1e3 for k, v in harness.round_robin(passes, device, max(args.repeats, 21)).items()}

    text = harness.header_markdown("CPU dtype costs: bf16 GEMM layouts, in-place passes", info)
    text += f"GEMMs: {n} x {n} x {n}, median of {args.repeats} round-robin repeats.\n\n| GEMM | ms |\n|---|---|\n"
    text += "".join(f"| `{k}` | {v:.1f} |\n" for k, v in gemm_ms.items())
    text += (f"\nOne pass over a {m} x {m} weight, median of {max(args.repeats, 21)} round-robin repeats; ratio "
             "to the W.copy_() of the same dtype.\n\n| pass | ms | / copy |\n|---|---|---|\n")
    for k, v in pass_ms.items():
        copy = pass_ms[k.split(" ")[0] + " W.copy_()"]
        text += f"| `{k}` | {v:.2f} | {v / copy:.2f}x |\n"
    json_path, md_path = harness.write_results(
        args.name, {"machine": info, "args": vars(args), "gemm_ms": gemm_ms, "pass_ms": pass_ms}, text, args.out_dir)
    print(text)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
