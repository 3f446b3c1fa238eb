"""What each kind of base layer costs (miss_ext/base_layers.py), side by side in one run.

For standard and bat on one Linear: the frozen nn.Linear; ours on it (the fast path, one fused
op); ours on the same Linear with a no-op forward hook (the path that calls the layer:
standard adds its delta to ``base_layer(x)``, bat reads the weight and does not call it); and
PEFT's MiSS on the plain Linear. Forward+backward, ratio to the frozen Linear in the same
round. Also the host time of the check that picks the path, per call, against the fast
path's forward.

    python benchmarks/base_layer_paths.py                 # tokens = in = out = 2048, r = 64
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import timeit

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from miss_ext import MissLinear  # noqa: E402
from miss_ext.base_layers import reads_weight_directly  # noqa: E402

INIT_WEIGHTS = {"standard": True, "bat": "bat"}


def candidates_for(variant: str, args) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(args.in_features, args.out_features).requires_grad_(False)
    fast = MissLinear(copy.deepcopy(linear), r=args.r, init_weights=INIT_WEIGHTS[variant])
    hooked = copy.deepcopy(fast)
    hooked.base_layer.register_forward_hook(lambda module, inputs, output: None)
    for layer in (fast, hooked):
        with torch.no_grad():
            layer.miss_block["default"].normal_(0, 0.01)
    x = torch.randn(args.tokens, args.in_features, requires_grad=True)

    def step(module):
        def run():
            x.grad = None
            module(x).sum().backward()
        return run

    layers = {"Linear (frozen)": linear, "ours, plain Linear (fast path)": fast,
              "ours, hooked Linear (calls the layer)": hooked}
    try:
        import peft
    except ImportError:
        pass
    else:
        wrapped = peft.get_peft_model(nn.Sequential(copy.deepcopy(linear)),
                                      peft.MissConfig(r=args.r, target_modules=["0"], init_weights=INIT_WEIGHTS[variant]))
        layers["PEFT MiSS, plain Linear"] = wrapped
    return {name: step(module) for name, module in layers.items()}, fast, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_layer_size_args(parser)
    harness.add_run_args(parser, repeats=7)
    args = parser.parse_args()
    device, info = harness.start_run(args)
    rows, check_us = [], None
    for variant in INIT_WEIGHTS:
        print(f"[base_layer_paths] {variant}", flush=True)
        candidates, fast, x = candidates_for(variant, args)
        samples = harness.round_robin_samples(candidates, device, args.repeats, args.warmup)
        ratios = harness.paired_ratios(samples, "Linear (frozen)")
        for name in candidates:
            rows.append({"variant": variant, "candidate": name, "fwd_bwd_ms": 1e3 * sorted(samples[name])[len(samples[name]) // 2],
                         "ratio": ratios[name]})
        if check_us is None:
            calls = 20000
            check_us = 1e6 * min(timeit.repeat(lambda: reads_weight_directly(fast.base_layer), number=calls, repeat=5)) / calls
            with torch.no_grad():
                forward_ms = 1e3 * min(timeit.repeat(lambda: fast(x), number=3, repeat=3)) / 3
    lines = [harness.header_markdown("Base layer paths: the fast path, the hooked path, PEFT", info),
             f"tokens={args.tokens}, in={args.in_features}, out={args.out_features}, r={args.r}; float32; "
             f"fwd+bwd with x requiring grad; median of {args.repeats} round-robin repeats after {args.warmup} "
             "warm-up; ratio: median over rounds of the candidate's time over the frozen Linear's in the same round.\n",
             "| variant | candidate | fwd+bwd ms | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['candidate']} | {r['fwd_bwd_ms']:.2f} | **{r['ratio']:.2f}x** |" for r in rows]
    lines.append(f"\nThe check that picks the path (`reads_weight_directly`): {check_us:.2f} us per call, "
                 f"against {forward_ms:.2f} ms for the fast path's forward (no grad), "
                 f"{100 * check_us / (1e3 * forward_ms):.4f}% of it.\n")
    payload = {"info": info, "rows": rows, "check_us": check_us, "fast_forward_ms": forward_ms,
               "shape": vars(args)}
    name = args.name or f"base_layer_paths_{device.type}_{args.tokens}x{args.in_features}x{args.out_features}_r{args.r}"
    json_path, md_path = harness.write_results(name, payload, "\n".join(lines) + "\n", args.out_dir)
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
