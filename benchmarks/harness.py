"""Shared measurement helpers of the benchmarks: side-by-side timing, saved-for-backward
bytes, peak CUDA memory, and the machine description every result file carries.

Timing follows one rule: candidates are measured side by side in one process, in round-robin
order (each repeat runs every candidate once, the starting candidate rotating), after a
warm-up, and the median is reported. Ratios to a baseline are the median over rounds of the
ratio within each round; absolute times depend on the machine's load.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Callable, Dict

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call; CUDA is timed with events around the call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def round_robin_samples(candidates: Dict[str, Callable[[], object]], device: torch.device, repeats: int,
                        warmup: int = 1) -> Dict[str, list]:
    """Seconds per call of every candidate, one sample per round, in rotating round-robin order."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    synchronize(device)
    samples = {name: [] for name in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            samples[name].append(time_once(candidates[name], device))
    return samples


def round_robin(candidates: Dict[str, Callable[[], object]], device: torch.device, repeats: int,
                warmup: int = 1) -> Dict[str, float]:
    """Median seconds per candidate, measured in rotating round-robin order."""
    samples = round_robin_samples(candidates, device, repeats, warmup)
    return {name: statistics.median(values) for name, values in samples.items()}


def paired_ratios(samples: Dict[str, list], baseline: str) -> Dict[str, float]:
    """Median over rounds of (candidate / baseline in the same round): a slow spell of a shared
    machine that hits one round hits both sides of its ratio."""
    return {name: statistics.median(t / b for t, b in zip(values, samples[baseline]))
            for name, values in samples.items()}


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: tuple = ()) -> int:
    """Bytes autograd saves for backward while ``fn`` runs its forward, deduplicated by
    storage, not counting the storages of ``exclude`` (parameters that exist anyway)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def peak_cuda_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory allocated during ``fn`` above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _write_atomically(path: str, text: str) -> None:
    """Written beside, then renamed over: a run killed mid-write (a timeout) leaves the previous
    complete file, never a truncated one."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_results(name: str, payload: dict, markdown: str, out_dir: str = RESULTS) -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, name + ".json")
    md_path = os.path.join(out_dir, name + ".md")
    _write_atomically(json_path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    _write_atomically(md_path, markdown)
    return json_path, md_path


def add_layer_size_args(parser) -> None:
    """--device and the sizes of one adapted Linear (DESIGN.md's CPU sizes by default)."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--in", dest="in_features", type=int, default=2048)
    parser.add_argument("--out", dest="out_features", type=int, default=2048)
    parser.add_argument("--r", type=int, default=64)


def add_run_args(parser, repeats: int) -> None:
    """Repeats, threads and where the results go."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--name", default=None, help="results file name (default: from device and sizes)")
    parser.add_argument("--out-dir", default=RESULTS)


def start_run(args) -> tuple[torch.device, dict]:
    """Applies --threads; returns the device and the machine description of the results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    return device, machine_info(device)


def header_markdown(title: str, info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']}, {info['torch_threads']} threads"
    return (
        f"# {title}\n\n"
        f"Measured {info['date']} on {where}; torch {info['torch']}, peft {info['peft']}, "
        f"commit {info['git_commit']}.\n\n"
        f"Command: `{info['command']}`\n\n"
    )
