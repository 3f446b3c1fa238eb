"""One adapted Linear, side by side: frozen nn.Linear, PEFT's MissLinear, ours on the
reference backend, ours on the kernels, and PEFT LoRA at the same and at half the rank.

For every variant (standard, mini, bat; with and without dropout) it reports the forward and
forward+backward time as a ratio to the frozen Linear measured in the same rounds, the bytes
autograd saves for backward beyond the Linear's, the peak CUDA memory of a training step,
and the time of merge and unmerge against one W.copy_(). Results go to benchmarks/results/
as JSON and markdown, with the machine, versions and command.

    python benchmarks/bench_layer.py                      # CPU defaults (DESIGN.md's sizes)
    python benchmarks/bench_layer.py --device cuda --tokens 8192 --in 4096 --out 4096 --dtypes bf16-fp32
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from typing import Dict, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import miss_ext  # noqa: E402

# dtype modes: (model dtype, adapter dtype)
DTYPE_MODES = {
    "fp32": (torch.float32, torch.float32),
    "bf16-fp32": (torch.bfloat16, torch.float32),  # PEFT's default for a bf16 model
    "bf16": (torch.bfloat16, torch.bfloat16),
}
INIT_WEIGHTS = {"standard": True, "mini": "mini", "bat": "bat"}

# DESIGN.md's fwd+bwd targets for ours (kernels), as a multiple of the frozen Linear.
CPU_TARGETS = {
    "fp32": {"standard": 1.05, "mini": 1.05, "dropout": 1.08, "bat": 1.55},
    "bf16-fp32": {"standard": 1.15, "mini": 1.15, "dropout": 1.2, "bat": 1.8},
}
MERGE_TARGET = 1.3  # merge and unmerge of standard and mini, as a multiple of one W.copy_()
MERGE_ROUNDS = 21
GPU_TARGETS = {"standard": 1.15, "mini": 1.15, "dropout": 1.15, "bat": 1.6}


def target_for(device: torch.device, mode: str, variant: str, p: float) -> Optional[float]:
    key = "dropout" if p > 0 and variant != "bat" else variant
    if device.type == "cuda":
        return GPU_TARGETS[key] if mode in ("bf16", "bf16-fp32") else None
    return CPU_TARGETS.get(mode, {}).get(key)


class Holder(nn.Module):
    """A one-layer model, so that PEFT's get_peft_model can adapt the layer."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def random_like_(t: torch.Tensor, generator: torch.Generator) -> None:
    """Non-zero block values (a zero block is a special case no training run stays in)."""
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=generator) * 0.02)


def make_candidates(args, variant: str, p: float, mode: str, device) -> Dict[str, nn.Module]:
    model_dtype, adapter_dtype = DTYPE_MODES[mode]
    generator = torch.Generator().manual_seed(0)
    base = nn.Linear(args.in_features, args.out_features).to(device=device, dtype=model_dtype)
    base.requires_grad_(False)
    extra = {"mini_r": args.mini_r} if variant == "mini" else {}
    candidates: Dict[str, nn.Module] = {"Linear (frozen)": Holder(copy.deepcopy(base))}

    ours = miss_ext.MissLinear(copy.deepcopy(base), r=args.r, miss_dropout=p, init_weights=INIT_WEIGHTS[variant],
                               block_dtype=adapter_dtype, **extra)
    random_like_(ours.miss_block["default"], generator)
    block = ours.miss_block["default"].detach()
    try:
        import peft

        config = peft.MissConfig(r=args.r, miss_dropout=p, target_modules=["lin"], init_weights=INIT_WEIGHTS[variant],
                                 **extra)
        peft_model = peft.get_peft_model(Holder(copy.deepcopy(base)), config,
                                         autocast_adapter_dtype=adapter_dtype == torch.float32)
        with torch.no_grad():
            peft_model.base_model.model.lin.miss_block["default"].copy_(block)
        candidates["PEFT MiSS"] = peft_model
    except ImportError:
        pass
    if args.reference:
        reference = copy.deepcopy(ours)
        reference.backend = "reference"
        candidates["ours (reference)"] = reference
    candidates["ours (kernels)"] = ours
    if variant == "standard" and "peft" in sys.modules:
        import peft

        for rank in (args.r, args.r // 2):
            lora = peft.get_peft_model(
                Holder(copy.deepcopy(base)), peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=p, target_modules=["lin"]),
                autocast_adapter_dtype=adapter_dtype == torch.float32)
            for name, param in lora.named_parameters():
                if "lora_B" in name:
                    random_like_(param, generator)
            candidates[f"PEFT LoRA r={rank}"] = lora
    for module in candidates.values():
        module.train()
    return candidates


def trainable(module: nn.Module):
    return [p for p in module.parameters() if p.requires_grad]


def step_fns(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    inputs = ([x] if x.requires_grad else []) + trainable(module)

    def forward():
        return module(x)

    def forward_backward():
        y = module(x)
        if inputs:  # the frozen Linear with --no-x-grad has nothing to differentiate
            torch.autograd.grad(y, inputs, grad)

    return forward, forward_backward


def measure_case(args, variant: str, p: float, mode: str, device) -> list:
    model_dtype, _ = DTYPE_MODES[mode]
    candidates = make_candidates(args, variant, p, mode, device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.in_features, generator=generator).to(device=device, dtype=model_dtype)
    x.requires_grad_(args.x_grad)
    grad = torch.randn(args.tokens, args.out_features, generator=generator).to(device=device, dtype=model_dtype)
    fns = {name: step_fns(m, x, grad) for name, m in candidates.items()}
    fwd_samples = harness.round_robin_samples({n: f[0] for n, f in fns.items()}, device, args.repeats, args.warmup)
    fwd_bwd_samples = harness.round_robin_samples({n: f[1] for n, f in fns.items()}, device, args.repeats,
                                                  args.warmup)
    fwd = {n: statistics.median(v) for n, v in fwd_samples.items()}
    fwd_bwd = {n: statistics.median(v) for n, v in fwd_bwd_samples.items()}
    fwd_ratio = harness.paired_ratios(fwd_samples, "Linear (frozen)")
    fwd_bwd_ratio = harness.paired_ratios(fwd_bwd_samples, "Linear (frozen)")
    rows = []
    target = target_for(device, mode, variant, p)
    for name, module in candidates.items():
        saved = harness.saved_bytes(fns[name][0], exclude=tuple(module.parameters()))
        peak = harness.peak_cuda_bytes(fns[name][1], device) if device.type == "cuda" else None
        rows.append({
            "dtype": mode, "variant": variant, "dropout": p, "candidate": name,
            "fwd_ms": fwd[name] * 1e3, "fwd_ratio": fwd_ratio[name],
            "fwd_bwd_ms": fwd_bwd[name] * 1e3, "fwd_bwd_ratio": fwd_bwd_ratio[name],
            "saved_bytes": saved, "peak_bytes": peak,
            "target_ratio": target if name == "ours (kernels)" else None,
        })
    linear = next(r for r in rows if r["candidate"] == "Linear (frozen)")
    for row in rows:
        row["saved_beyond_linear_bytes"] = row["saved_bytes"] - linear["saved_bytes"]
        if row["peak_bytes"] is not None:
            row["peak_beyond_linear_bytes"] = row["peak_bytes"] - linear["peak_bytes"]
    return rows


def miss_layer_of(module: nn.Module) -> nn.Module:
    return module.base_model.model.lin if hasattr(module, "base_model") else module


def measure_merge(args, variant: str, mode: str, device) -> list:
    """merge() and unmerge() of ours and PEFT's, against one W.copy_() of the same weight, timed
    in the same rounds (each a few milliseconds: many rounds, as they are cheap)."""
    candidates = make_candidates(args, variant, 0.0, mode, device)
    weight = candidates["Linear (frozen)"].lin.weight
    other = torch.empty_like(weight)
    layers = {name: miss_layer_of(candidates[name]) for name in ("PEFT MiSS", "ours (kernels)") if name in candidates}
    errors = {}
    samples = {"copy": []} | {f"{name} {op}": [] for name in layers for op in ("merge", "unmerge")}
    rounds = max(args.repeats, MERGE_ROUNDS)
    for rep in range(args.warmup + rounds):
        timings = {"copy": harness.time_once(lambda: other.copy_(weight), device)}
        for name, layer in layers.items():
            if name in errors:
                continue
            try:
                timings[f"{name} merge"] = harness.time_once(layer.merge, device)
                timings[f"{name} unmerge"] = harness.time_once(layer.unmerge, device)
            except Exception as exc:  # PEFT's mini unmerge with bf16 blocks crashes on CPU
                errors[name] = f"{type(exc).__name__}: {str(exc)[:80]}"
        if rep >= args.warmup:
            for key, value in timings.items():
                samples[key].append(value)
    copy_time = statistics.median(samples["copy"])
    rows = []
    for name in layers:
        row = {"dtype": mode, "variant": variant, "candidate": name, "copy_ms": copy_time * 1e3,
               "error": errors.get(name), "rounds": rounds}
        if name not in errors:
            merge, unmerge = (statistics.median(samples[f"{name} {op}"]) for op in ("merge", "unmerge"))
            ratios = harness.paired_ratios({op: samples[f"{name} {op}"] for op in ("merge", "unmerge")} |
                                           {"copy": samples["copy"]}, "copy")
            row.update(merge_ms=merge * 1e3, unmerge_ms=unmerge * 1e3,
                       merge_ratio=ratios["merge"], unmerge_ratio=ratios["unmerge"])
        rows.append(row)
    return rows


def mib(value: Optional[float]) -> str:
    return "" if value is None else f"{value / 2**20:.1f}"


def to_markdown(info: dict, args, rows: list, merges: list) -> str:
    text = harness.header_markdown("Layer benchmark: one adapted Linear", info)
    text += (f"tokens={args.tokens}, in={args.in_features}, out={args.out_features}, r={args.r}, "
             f"mini_r={args.mini_r}; median of {args.repeats} round-robin repeats after {args.warmup} warm-up. "
             "A ratio is the median over rounds of the candidate's time over the frozen nn.Linear's in the "
             "same round ("
             + ("x requires grad, so its fwd+bwd is the two GEMMs" if args.x_grad else
                "x does not require grad (--no-x-grad), so its fwd+bwd is its forward GEMM and the others' "
                "backward computes the adapter's gradient only")
             + "). \"saved\": bytes autograd keeps for backward beyond the frozen "
             "Linear's, parameters not counted, deduplicated by storage.\n\n")
    cuda = any(r["peak_bytes"] is not None for r in rows)
    text += ("| dtype (model-adapter) | variant | dropout | candidate | fwd ms | fwd ratio | fwd+bwd ms "
             "| fwd+bwd ratio | target | saved MiB |" + (" peak MiB beyond Linear |" if cuda else "") + "\n")
    text += "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "") + "\n"
    for r in rows:
        text += (f"| {r['dtype']} | {r['variant']} | {r['dropout']} | {r['candidate']} | {r['fwd_ms']:.2f} | "
                 f"{r['fwd_ratio']:.2f}x | {r['fwd_bwd_ms']:.2f} | **{r['fwd_bwd_ratio']:.2f}x** | "
                 f"{'' if r['target_ratio'] is None else '<= %.2fx' % r['target_ratio']} | {mib(r['saved_beyond_linear_bytes'])} |"
                 + (f" {mib(r.get('peak_beyond_linear_bytes'))} |" if cuda else "") + "\n")
    if merges:
        text += (f"\nmerge() and unmerge() against one `W.copy_()` of the same weight, in "
                 f"{merges[0]['rounds']} rounds that time all three (ratio: median over rounds); target for ours, standard and mini: "
                 f"<= {MERGE_TARGET}x.\n\n")
        text += "| dtype | variant | candidate | merge ms | unmerge ms | W.copy_ ms | merge / copy | unmerge / copy |\n"
        text += "|---|---|---|---|---|---|---|---|\n"
        for r in merges:
            if r.get("error"):
                text += f"| {r['dtype']} | {r['variant']} | {r['candidate']} | {r['error']} | | {r['copy_ms']:.2f} | | |\n"
            else:
                text += (f"| {r['dtype']} | {r['variant']} | {r['candidate']} | {r['merge_ms']:.2f} | "
                         f"{r['unmerge_ms']:.2f} | {r['copy_ms']:.2f} | {r['merge_ratio']:.2f}x | "
                         f"{r['unmerge_ratio']:.2f}x |\n")
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_layer_size_args(parser)
    parser.add_argument("--mini-r", type=int, default=16)
    # bf16 GEMMs run ~7x slower than fp32 on a CPU without AVX-512 BF16, so the default (which
    # must finish in minutes on 2 cores) is fp32; benchmarks/results/ holds the bf16-fp32 runs.
    parser.add_argument("--dtypes", default="fp32", help=f"comma list of {list(DTYPE_MODES)}")
    parser.add_argument("--variants", default="standard,mini,bat")
    parser.add_argument("--dropouts", default="0,0.1", help="dropout values (bat always runs without)")
    harness.add_run_args(parser, repeats=5)
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip ours on the reference backend (the slowest candidate)")
    parser.add_argument("--no-merge", dest="merge", action="store_false")
    parser.add_argument("--save-each-case", action="store_true",
                        help="rewrite the JSON and markdown after every case, marked partial until the last, "
                             "so a run cut short (a timeout, a lease ending) keeps the cases that finished")
    parser.add_argument("--no-x-grad", dest="x_grad", action="store_false",
                        help="x does not require grad (the first adapted layer of a network): no dx GEMM, "
                             "the frozen Linear's fwd+bwd is its forward. For bf16 on CPUs without AVX-512 "
                             "BF16, where torch 2.14's dy @ W takes a single-threaded fallback (README)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, info = harness.start_run(args)
    name = args.name or f"layer_{device.type}_{args.tokens}x{args.in_features}x{args.out_features}_r{args.r}"
    rows, merges = [], []

    def save(complete: bool):
        payload = {"machine": info, "args": vars(args), "rows": rows, "merge": merges}
        markdown = to_markdown(info, args, rows, merges)
        if args.save_each_case:
            payload["complete"] = complete
            if not complete:
                markdown = "> **Partial**: the run has not finished (or was cut short); cases so far.\n\n" + markdown
        return markdown, harness.write_results(name, payload, markdown, args.out_dir)

    for mode in args.dtypes.split(","):
        for variant in args.variants.split(","):
            dropouts = [0.0] if variant == "bat" else [float(p) for p in args.dropouts.split(",")]
            for p in dropouts:
                print(f"[bench_layer] {mode} {variant} dropout={p}", flush=True)
                rows += measure_case(args, variant, p, mode, device)
                if args.save_each_case:
                    save(complete=False)
            if args.merge:
                merges += measure_merge(args, variant, mode, device)
                if args.save_each_case:
                    save(complete=False)
    markdown, (json_path, md_path) = save(complete=True)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
