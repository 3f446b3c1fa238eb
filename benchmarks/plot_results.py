"""Plot the forward+backward time ratio (to the frozen nn.Linear) per variant, PEFT's MissLinear
against ours, from result files of bench_layer.py: one panel per file, DESIGN.md's targets as
marks over our bars.

    python benchmarks/plot_results.py benchmarks/results/layer_cpu_2048x2048x2048_r64_fp32.json \\
        benchmarks/results/layer_cpu_2048x2048x2048_r64_bf16-fp32.json \\
        --out benchmarks/results/layer_cpu_fwd_bwd_ratios.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

CANDIDATES = ("PEFT MiSS", "ours (kernels)", "PEFT LoRA r=64")
CAP = 3.0  # bars above this are cut at it (their label still gives the value): PEFT's bf16 bat is ~10x
COLORS = {"PEFT MiSS": "#8c8c8c", "ours (kernels)": "#1f77b4", "PEFT LoRA r=64": "#d9a441"}


def case_label(row: dict) -> str:
    return row["variant"] + (f"\ndropout {row['dropout']:g}" if row["dropout"] else "")


def panel(ax, result: dict, title: str) -> None:
    rows = result["rows"]
    cases = []
    for row in rows:
        key = (row["dtype"], row["variant"], row["dropout"])
        if key not in cases:
            cases.append(key)
    width = 0.8 / len(CANDIDATES)
    for i, name in enumerate(CANDIDATES):
        xs, heights = [], []
        for c, key in enumerate(cases):
            row = next((r for r in rows if (r["dtype"], r["variant"], r["dropout"]) == key and r["candidate"] == name), None)
            if row is not None:
                xs.append(c + (i - (len(CANDIDATES) - 1) / 2) * width)
                heights.append(row["fwd_bwd_ratio"])
        bars = ax.bar(xs, [min(h, CAP) for h in heights], width, label=name, color=COLORS[name])
        ax.bar_label(bars, labels=[f"{h:.2f}" for h in heights], fontsize=7)
    for c, key in enumerate(cases):
        ours = next(r for r in rows if (r["dtype"], r["variant"], r["dropout"]) == key and r["candidate"] == "ours (kernels)")
        if ours.get("target_ratio"):
            x = c + (CANDIDATES.index("ours (kernels)") - (len(CANDIDATES) - 1) / 2) * width
            ax.hlines(ours["target_ratio"], x - width / 2, x + width / 2, colors="red", linewidth=2,
                      label="target (DESIGN.md)" if c == 0 else None)
    labels = [case_label({"variant": v, "dropout": p}) for _, v, p in cases]
    ax.set_xticks(range(len(cases)), labels, fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("fwd+bwd time / frozen nn.Linear")
    shown = [min(r["fwd_bwd_ratio"], CAP) for r in rows if r["candidate"] in CANDIDATES]
    shown += [r["target_ratio"] for r in rows if r.get("target_ratio")]
    bottom = min(0.8, min(shown) - 0.1)
    ax.set_ylim(bottom, bottom + (max(shown) - bottom) * 1.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncol=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="bench_layer.py JSON files")
    parser.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.results), figsize=(6.5 * len(args.results), 4.2), squeeze=False)
    for ax, path in zip(axes[0], args.results):
        with open(path) as f:
            result = json.load(f)
        a, m = result["args"], result["machine"]
        dtype = result["rows"][0]["dtype"]
        where = m.get("gpu") or f"{m['torch_threads']}-thread CPU"
        grad_note = "" if a.get("x_grad", True) else ", x without grad"
        title = (f"{dtype}: tokens={a['tokens']}, in={a['in_features']}, out={a['out_features']}, r={a['r']}{grad_note}\n"
                 f"{where}, torch {m['torch']}, peft {m['peft']}, {m['date']}")
        panel(ax, result, title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
