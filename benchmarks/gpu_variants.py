"""The layer steps benchmarks/gpu_cost_model.py prices: one forward+backward of a bf16 layer
with an fp32 adapter (the benchmark setting), for miss_ext's CUDA path (replayed on the
emulated CUDA device: the ops MissLinear calls, with the arguments its autograd passes, see
tests/test_gpu_cost_model.py), PEFT's MiSS and LoRA, and the frozen nn.Linear.
"""

from __future__ import annotations

from typing import Dict

import torch

import miss_ext  # noqa: F401  (loads torch.ops.miss_emulated_cuda)

import gpu_trace

DTYPE = torch.bfloat16


def _inputs(shape: gpu_trace.Shape, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.tokens, shape.in_features, generator=gen).to(DTYPE)
    weight = (torch.randn(shape.out_features, shape.in_features, generator=gen) * 0.02).to(DTYPE)
    dy = torch.randn(shape.tokens, shape.out_features, generator=gen).to(DTYPE)
    return x, weight, dy, gen


def _ours(variant: str, shape: gpu_trace.Shape, p: float = 0.0):
    emu = torch.ops.miss_emulated_cuda
    x, weight, dy, gen = _inputs(shape)
    r = shape.r
    if variant == "bat":
        block = torch.randn(shape.out_features // r, r, r, generator=gen) * 0.02

        def step():
            y = emu.bat_linear(x, weight, None, block)
            emu.bat_linear_backward(dy, x, weight, block, [True, False, True])
            del y

        return step, ("miss_emulated_cuda::bat_linear", "miss_emulated_cuda::bat_linear_backward")
    m = shape.mini_r if variant == "mini" else shape.out_features
    block = torch.randn(r, m, generator=gen) * 0.02
    seed = torch.tensor([1234], dtype=torch.int64) if p else None

    def step():
        y, fold = emu.shard_linear(x, weight, None, block, p, seed)
        emu.shard_linear_backward(dy, fold, weight, block, shape.in_features, p, seed, None, [True, True])
        del y, fold

    return step, ("miss_emulated_cuda::shard_linear", "miss_emulated_cuda::shard_linear_backward")


def _autograd_step(module, x, dy):
    x = x.clone().requires_grad_(True)

    def step():
        y = module(x)
        y.backward(dy)
        x.grad = None
        for param in module.parameters():
            param.grad = None

    return step


def _peft(config, shape: gpu_trace.Shape):
    import peft

    x, weight, dy, gen = _inputs(shape)
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(shape.in_features, shape.out_features, bias=False, dtype=DTYPE))
    base.proj.weight.data.copy_(weight)
    model = peft.get_peft_model(base, config)
    for name, param in model.named_parameters():  # a trained adapter: non-zero blocks
        if param.requires_grad:
            param.data.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return _autograd_step(model, x, dy)


def _frozen(shape: gpu_trace.Shape):
    x, weight, dy, _ = _inputs(shape)
    linear = torch.nn.Linear(shape.in_features, shape.out_features, bias=False, dtype=DTYPE)
    linear.weight.data.copy_(weight)
    linear.weight.requires_grad_(False)
    return _autograd_step(linear, x, dy)


def record_all(target: gpu_trace.Shape, scale: int) -> Dict[str, gpu_trace.Trace]:
    """name -> trace at the target shape, recorded at target / scale."""
    import peft

    probe = target.divided(scale)
    emu = torch.ops.miss_emulated_cuda
    emu.configure(seed=0, detect_races=False, sm_count=132, preempt=0.0)
    log = lambda: emu.launch_log(clear=True)  # noqa: E731
    traces = {"frozen Linear": gpu_trace.record(_frozen(probe), probe, scale)}
    for name, variant, p in (("miss_ext standard", "standard", 0.0), ("miss_ext standard dropout 0.1", "standard", 0.1),
                             ("miss_ext mini", "mini", 0.0), ("miss_ext bat", "bat", 0.0)):
        step, roots = _ours(variant, probe, p)
        traces[name] = gpu_trace.record(step, probe, scale, roots, log, variant)
    miss = dict(r=probe.r, target_modules=["proj"])
    traces["PEFT MiSS standard"] = gpu_trace.record(_peft(peft.MissConfig(**miss), probe), probe, scale)
    traces["PEFT MiSS standard dropout 0.1"] = gpu_trace.record(
        _peft(peft.MissConfig(**miss, miss_dropout=0.1), probe), probe, scale)
    traces["PEFT MiSS mini"] = gpu_trace.record(
        _peft(peft.MissConfig(**miss, init_weights="mini", mini_r=probe.mini_r), probe), probe, scale, variant="mini")
    traces["PEFT MiSS bat"] = gpu_trace.record(_peft(peft.MissConfig(**miss, init_weights="bat"), probe), probe, scale)
    traces["PEFT LoRA"] = gpu_trace.record(
        _peft(peft.LoraConfig(r=probe.r, lora_alpha=2 * probe.r, target_modules=["proj"]), probe), probe, scale)
    emu.configure()
    return traces


def record_merges(target: gpu_trace.Shape, scale: int) -> Dict[str, gpu_trace.Trace]:
    """Merge and unmerge of a bf16 weight with an fp32 adapter, against one W.copy_()."""
    probe = target.divided(scale)
    emu = torch.ops.miss_emulated_cuda
    emu.configure(seed=0, detect_races=False, sm_count=132, preempt=0.0)
    log = lambda: emu.launch_log(clear=True)  # noqa: E731
    _, weight, _, gen = _inputs(probe)
    source = weight.clone()
    r = probe.r
    shard = torch.randn(r, probe.out_features, generator=gen) * 0.02
    bat = torch.randn(probe.out_features // r, r, r, generator=gen) * 0.02
    traces = {"W.copy_()": gpu_trace.record(lambda: weight.copy_(source), probe, scale)}
    for name, op, block in (("miss_ext merge standard", "merge_", shard), ("miss_ext unmerge standard", "unmerge_", shard),
                            ("miss_ext merge bat", "merge_", bat), ("miss_ext unmerge bat", "unmerge_", bat)):
        args = (weight, block, False) if op == "merge_" else (weight, block)
        traces[name] = gpu_trace.record(lambda: getattr(emu, op)(*args), probe, scale,
                                        (f"miss_emulated_cuda::{op}",), log)
    emu.configure()
    return traces
