"""Host time per op call at shapes too small for the math to matter: what the C++ op layer
costs on top of its kernels (argument checks, ATen calls, dispatch). Compares builds of
miss_ext side by side: each build runs in its own worker process (two builds cannot share a
process, both register torch.ops.miss), the workers take turns, round after round, and the
ratio of each build to the first is the median of its per-round ratios.

    python benchmarks/host_overhead.py --build stable=. --build before=/path/to/old/checkout

A build is a directory whose miss_ext package (with its compiled _C) is imported (it is put
first on PYTHONPATH). Results go to benchmarks/results/host_overhead_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

CASES = ("standard fwd+bwd", "standard p=0.1 fwd+bwd", "bat fwd+bwd", "merge+unmerge standard", "merge+unmerge bat")


def _cases():
    torch.manual_seed(0)
    ops = torch.ops.miss
    x = torch.randn(4, 64)
    w = torch.randn(64, 64)
    block = torch.randn(8, 64) * 0.1
    bat_block = torch.randn(8, 8, 8) * 0.05
    dy = torch.randn(4, 64)
    seed = torch.tensor([7])

    def standard(p):
        y, fold = ops.shard_linear(x, w, None, block, p, seed)
        ops.shard_linear_backward(dy, fold, w, block, 64, p, seed, None, [True, True])

    def bat():
        ops.bat_linear(x, w, None, bat_block)
        ops.bat_linear_backward(dy, x, w, bat_block, [True, True, True])

    def merge(b):
        weight = w.clone()
        ops.merge_(weight, b, False)
        ops.unmerge_(weight, b)

    return {CASES[0]: lambda: standard(0.0), CASES[1]: lambda: standard(0.1), CASES[2]: bat,
            CASES[3]: lambda: merge(block), CASES[4]: lambda: merge(bat_block)}


def worker(calls: int) -> None:
    """Reads one line per round from stdin, answers with the microseconds per call of each case."""
    import miss_ext  # noqa: F401  (registers torch.ops.miss)

    torch.set_num_threads(1)
    cases = _cases()
    for fn in cases.values():  # warm-up
        for _ in range(20):
            fn()
    print(json.dumps({"miss_ext": os.path.dirname(miss_ext.__file__)}), flush=True)
    for _ in sys.stdin:
        result = {}
        for name, fn in cases.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            result[name] = (time.perf_counter() - start) / calls * 1e6
        print(json.dumps(result), flush=True)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({len(names)} logical CPUs)"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", action="append", default=[], help="NAME=DIR (at least one); the first is the baseline")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--name", default="host_overhead_cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.calls)
        return 0
    if not args.build:
        parser.error("give at least one --build NAME=DIR")
    builds = [b.split("=", 1) for b in args.build]
    workers = {}
    for name, path in builds:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(path), OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--calls", str(args.calls)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd="/")
        where = json.loads(proc.stdout.readline())["miss_ext"]
        workers[name] = proc
        print(f"{name}: miss_ext from {where}", flush=True)
    rounds = {name: [] for name, _ in builds}
    for _ in range(args.rounds):
        for name, proc in workers.items():
            proc.stdin.write("go\n")
            proc.stdin.flush()
            rounds[name].append(json.loads(proc.stdout.readline()))
    for proc in workers.values():
        proc.stdin.close()
        proc.wait()
    base = builds[0][0]
    table = {}
    for name, _ in builds:
        table[name] = {}
        for case in CASES:
            us = statistics.median(r[case] for r in rounds[name])
            ratio = statistics.median(r[case] / b[case] for r, b in zip(rounds[name], rounds[base]))
            table[name][case] = {"us_per_call": round(us, 1), "ratio_to_" + base: round(ratio, 3)}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _cpu_name(),
            "torch": torch.__version__, "threads": 1, "rounds": args.rounds, "calls_per_round": args.calls,
            "command": "benchmarks/host_overhead.py " + " ".join(f"--build {b}" for b in args.build),
            "shapes": "x [4, 64], W [64, 64], r 8 (standard) / bat block [8, 8, 8]; CPU, float32, one thread"}
    lines = [f"# Host time per op call, side by side\n", f"Measured {meta['date']} on {meta['machine']}, 1 thread; "
             f"torch {meta['torch']}. Command: `{meta['command']}`. {meta['shapes']}; median of {args.rounds} "
             f"rounds of {args.calls} calls, builds in turn; ratio = median per-round ratio to `{base}`.\n",
             "| case | " + " | ".join(f"{n} us" for n, _ in builds) + " | " +
             " | ".join(f"{n} / {base}" for n, _ in builds[1:]) + " |",
             "|---|" + "---|" * (2 * len(builds) - 1)]
    for case in CASES:
        cells = [f"{table[n][case]['us_per_call']:.1f}" for n, _ in builds]
        ratios = [f"{table[n][case]['ratio_to_' + base]:.2f}x" for n, _ in builds[1:]]
        lines.append(f"| {case} | " + " | ".join(cells + ratios) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.name)
    with open(out + ".json", "w") as f:
        json.dump({"meta": meta, "results": table}, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
