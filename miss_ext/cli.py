"""The ``miss-ext`` command: ``miss-ext demo [...]`` (the fine-tuning demo, see
``python -m miss_ext.demo --help``) and ``miss-ext bench [...]`` (a quick layer timing)."""

from __future__ import annotations

import argparse
import sys
import time

COMMANDS = {
    "demo": "fine-tune all-MiniLM-L6-v2 with MiSS (standard, mini, bat) and LoRA; compare, save, reload, merge",
    "bench": "time one layer's forward+backward: frozen nn.Linear vs MissLinear on the kernels and the reference",
}


def bench(argv=None) -> int:
    """Forward+backward time of one layer per variant: a frozen nn.Linear (x needs a gradient,
    as inside a network), MissLinear on miss_ext's kernels and MissLinear on the pure-PyTorch
    reference; median of ``--repeats`` after a warm-up, and the ratios."""
    parser = argparse.ArgumentParser(prog="miss-ext bench", description=bench.__doc__)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of x (batch * sequence), default 2048")
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--out-features", type=int, default=1024)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--mini-r", type=int, default=64)
    parser.add_argument("--variants", default="standard,mini,bat")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    import torch
    from torch import nn

    from . import MissLinear

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = nn.Linear(args.in_features, args.out_features, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(args.tokens, args.in_features, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(args.tokens, args.out_features, device=device, dtype=dtype)

    def median_ms(layer) -> float:
        times = []
        for i in range(args.repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            layer(x).backward(grad)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first call warms up
                times.append(time.perf_counter() - start)
            x.grad = None
            for p in layer.parameters():
                p.grad = None
        times.sort()
        return 1e3 * times[len(times) // 2]

    print(f"miss-ext bench: x [{args.tokens}, {args.in_features}] -> [{args.tokens}, {args.out_features}], "
          f"{args.dtype}, r={args.r}, device {device}"
          + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
          + f"; forward+backward, median of {args.repeats}")
    linear_ms = median_ms(base)
    print(f"{'variant':<9}{'nn.Linear':>11}{'kernels':>11}{'reference':>11}{'kernels/Linear':>16}{'reference/kernels':>19}")
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        init = {"standard": True, "mini": "mini", "bat": "bat"}[variant]
        layer = MissLinear(base, r=args.r, mini_r=args.mini_r, init_weights=init)
        with torch.no_grad():  # a trained-looking block, not zeros
            for block in layer.miss_block.values():
                block.normal_(0, 0.02)
        kernels_ms = median_ms(layer)
        layer.backend = "reference"
        reference_ms = median_ms(layer)
        print(f"{variant:<9}{linear_ms:>9.2f}ms{kernels_ms:>9.2f}ms{reference_ms:>9.2f}ms"
              f"{kernels_ms / linear_ms:>15.2f}x{reference_ms / kernels_ms:>18.2f}x")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: miss-ext {demo,bench} [options]   (miss-ext COMMAND --help for a command's options)\n\n" + \
        "\n".join(f"  {name:<6} {text}" for name, text in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest, prog="miss-ext demo")
    if command == "bench":
        return bench(rest)
    print(f"miss-ext: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
