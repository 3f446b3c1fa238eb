"""Predicted GPU time and memory of one adapted layer's forward+backward: PREDICTIONS, made
without a GPU, from what each implementation issues (benchmarks/gpu_trace.py) priced by a
roofline per call. Ours (miss_ext's CUDA path, recorded on the emulated CUDA device) against
the frozen nn.Linear, PEFT's MiSS and PEFT's LoRA, on an H100 SXM and an H200 SXM.

    python benchmarks/gpu_cost_model.py              # tokens 8192, in = out = 4096, r 64, bf16
    python benchmarks/gpu_cost_model.py --measured benchmarks/results/layer_cuda_<...>.json
    (also prints the efficiencies the measurement implies and the predictions at those:
    benchmarks/gpu_measured.py)

The model (every figure is an assumption, stated here and in the results file):
- A GEMM takes max(FLOPs / (peak * GEMM_EFFICIENCY), bytes / (HBM * MEMORY_EFFICIENCY)), with
  the peak of its operands' dtype: bf16/fp16 tensor cores, or float32 on the SIMT cores (torch
  does not use TF32 for float32 matmuls by default). Operands and output are read and written
  once.
- Every other call is memory-bound: bytes / (HBM * MEMORY_EFFICIENCY); for our kernels the
  bytes are the buffers the emulator saw each launch given (inputs read once, outputs written
  once, in-place buffers both).
- Our compute-bound kernels take the longer of their memory time and their arithmetic: the
  float32 multiply-adds they declare to the emulator at SIMT_KERNEL_EFFICIENCY of the float32
  peak, and their warp-wide bf16 tensor-core products (mma.sync m16n8k16, 4096 FLOPs each,
  counted by the emulator) at MMA_KERNEL_EFFICIENCY of the bf16 peak.
- A kernel whose grid has fewer blocks than the GPU has SMs runs on that many SMs only: its
  memory and arithmetic rates are that fraction of the GPU's (each SM's share of the
  bandwidth is what its loads in flight can draw, assumed no more than an even share).
- A latency-bound kernel (the inverse of unmerge: a chain of dependent steps in one block per
  matrix) takes at least its barriers per block (counted by the emulator) times
  BARRIER_PHASE_US, the time of one barrier-separated phase.
- A copy to the host that the host waits for (unmerge reads the condition numbers there)
  costs HOST_COPY_US, whatever its few bytes, and the GPU idles meanwhile.
- Dropout is integer work: each Philox4x32-10 call (counted per launch by the emulator for our
  kernels; one per 4 elements for torch's dropout) costs PHILOX_INT_OPS INT32 instructions,
  and a kernel takes the longer of its memory time and its integer time.
- Each GPU call costs at least KERNEL_FLOOR_US and adds LAUNCH_GAP_US between kernels.
- The host issues calls asynchronously: HOST_US_PER_ATEN_CALL per ATen call of the op bodies
  and HOST_US_PER_PYTHON_CALL per call from Python (op wrappers, autograd nodes). The step
  takes max(GPU time, host time).
- Peak memory: what the step allocates (outputs, saved tensors, temporaries), recorded by the
  profiler at the probe shape and scaled; inputs (x, W, dy) excluded.

Beside the predictions it prints, for the variants with a GPU target, the floor of the design
class at the same rates (benchmarks/gpu_floor.py: what no path built on cuBLAS GEMMs can avoid)
and the predicted ratios at other GEMM and memory efficiencies, the two assumptions that decide
whether a target is met: a GPU measures them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_floor  # noqa: E402
import gpu_measured  # noqa: E402
import gpu_trace  # noqa: E402
import gpu_variants  # noqa: E402

# Published peak rates, dense (no sparsity). Sources: NVIDIA H100 Tensor Core GPU datasheet
# (H100 SXM5: FP32 67 TFLOPS, TF32 494.7, BF16/FP16 989.4 dense, HBM3 3.35 TB/s) and NVIDIA
# H200 Tensor Core GPU datasheet (H200 SXM: same compute, HBM3e 4.8 TB/s); 132 SMs in both
# (NVIDIA Hopper architecture whitepaper: H100 SXM5; the H200 is the same GH100 die).
GPUS = {
    "H100 SXM": {"bf16_tflops": 989.4, "fp16_tflops": 989.4, "tf32_tflops": 494.7, "fp32_tflops": 66.9,
                 "fp64_tflops": 66.9, "int32_tops": 16.7, "hbm_tb_s": 3.35, "sms": 132},
    "H200 SXM": {"bf16_tflops": 989.4, "fp16_tflops": 989.4, "tf32_tflops": 494.7, "fp32_tflops": 66.9,
                 "fp64_tflops": 66.9, "int32_tops": 16.7, "hbm_tb_s": 4.8, "sms": 132},
}
GEMM_EFFICIENCY = 0.70  # fraction of the peak a large cuBLAS GEMM sustains (assumed)
MEMORY_EFFICIENCY = 0.85  # fraction of HBM bandwidth a streaming kernel sustains (assumed)
KERNEL_FLOOR_US = 2.0  # shortest kernel (assumed)
LAUNCH_GAP_US = 1.0  # idle GPU time between dependent kernels (assumed)
HOST_US_PER_ATEN_CALL = 1.5  # C++ dispatcher overhead per ATen call (assumed)
HOST_US_PER_PYTHON_CALL = 8.0  # Python op call or autograd node (assumed)
PHILOX_INT_OPS = 130  # integer instructions per Philox4x32-10 call: 10 rounds of 2 wide multiplies,
#                      xors and key updates (assumed; counted from the algorithm, not measured)
INT_EFFICIENCY = 0.7  # fraction of INT32 peak a Philox-bound kernel sustains (assumed)
# Fraction of the float32 (SIMT) peak our compute-bound kernels sustain (bat_transform_kernel:
# two multiply-adds per pair of shared-memory loads caps it at 0.5 of the peak; assumed 0.4).
SIMT_KERNEL_EFFICIENCY = 0.4
# Fraction of the bf16 tensor-core peak our mma.sync kernels sustain (assumed): the datasheet
# peak is for Hopper's warpgroup MMA (wgmma); warp-level mma.sync, staged through shared memory
# without an asynchronous pipeline, reaches well under it.
MMA_KERNEL_EFFICIENCY = 0.3
MMA_FLOPS = 2 * 16 * 8 * 16  # one m16n8k16 product
# One barrier-separated phase of a latency-bound kernel (assumed): a few dependent shared-memory
# round trips (~30 cycles each) and a barrier, ~200 cycles at the H100's/H200's ~1.98 GHz.
BARRIER_PHASE_US = 0.1
# A small synchronising device-to-host copy: the copy's PCIe/NVLink latency and the host's wait
# for the stream (assumed).
HOST_COPY_US = 10.0

ASSUMPTIONS = {
    "gemm_efficiency": GEMM_EFFICIENCY, "memory_efficiency": MEMORY_EFFICIENCY,
    "kernel_floor_us": KERNEL_FLOOR_US, "launch_gap_us": LAUNCH_GAP_US,
    "host_us_per_aten_call": HOST_US_PER_ATEN_CALL, "host_us_per_python_call": HOST_US_PER_PYTHON_CALL,
    "philox_int_ops": PHILOX_INT_OPS, "int_efficiency": INT_EFFICIENCY,
    "simt_kernel_efficiency": SIMT_KERNEL_EFFICIENCY, "mma_kernel_efficiency": MMA_KERNEL_EFFICIENCY,
    "barrier_phase_us": BARRIER_PHASE_US, "host_copy_us": HOST_COPY_US,
    "torch_dropout": "torch's CUDA dropout draws 4 uniforms per Philox call (one call per 4 elements)",
    "peak_sources": "NVIDIA H100 and H200 Tensor Core GPU datasheets (SXM, dense)",
    "fp32_matmul": "float32 GEMMs on SIMT cores (torch.backends.cuda.matmul.allow_tf32 defaults to False)",
    "small_grids": "a kernel of ours with fewer blocks than SMs (132) gets that fraction of the GPU's rates",
}

BYTES = {"c10::BFloat16": 2, "c10::Half": 2, "float": 4, "double": 8, "long int": 8, "int": 4, "bool": 1,
         "unsigned char": 1, "signed char": 1, "short int": 2, "": 0}
GEMMS = {"aten::mm": "mm", "aten::addmm": "addmm", "aten::addmm_": "addmm", "aten::bmm": "bmm",
         "aten::baddbmm": "baddbmm", "aten::baddbmm_": "baddbmm", "mm.dtype": "mm", "addmm_": "addmm", "mm": "mm"}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _peak_tflops(gpu: Dict, dtype: str) -> float:
    return gpu[{"c10::BFloat16": "bf16_tflops", "c10::Half": "fp16_tflops", "double": "fp64_tflops"}.get(
        dtype, "fp32_tflops")]


def gemm_cost(call: gpu_trace.Call):
    """(FLOPs, bytes, operand dtype) of a GEMM call from its input shapes."""
    kind = GEMMS[call.name]
    shapes, dtypes = call.shapes, call.dtypes
    if kind in ("addmm", "baddbmm"):  # (c, a, b): c is read (a bias broadcast, or the full output)
        c, a, b = shapes[:3]
        c_bytes = _numel(c) * BYTES[dtypes[0]]
        out_elements = _numel(a[:-1]) * b[-1]
        a_dtype, b_dtype, out_bytes = dtypes[1], dtypes[2], out_elements * BYTES[dtypes[0]]
    else:
        a, b = shapes[:2]
        c_bytes = 0
        a_dtype, b_dtype = dtypes[0], dtypes[1]
        out_elements = _numel(a[:-1]) * b[-1]
        out_bytes = out_elements * (4 if call.name == "mm.dtype" else BYTES[a_dtype])
    batch = a[0] if len(a) == 3 else 1
    m, k, n = a[-2], a[-1], b[-1]
    flops = 2 * batch * m * k * n
    bytes_ = _numel(a) * BYTES[a_dtype] + _numel(b) * BYTES[b_dtype] + c_bytes + out_bytes
    return flops, bytes_, a_dtype


def elementwise_bytes(call: gpu_trace.Call) -> int:
    """Bytes of a memory-bound ATen call: its tensor inputs read, and an output the size of
    its largest input written (reductions: of the first input divided by its reduced size is
    not known here, so a reduction is charged its input only)."""
    sizes = [_numel(s) * BYTES.get(d, 4) for s, d in zip(call.shapes, call.dtypes) if s]
    if not sizes:
        return 0
    if call.name in ("aten::sum", "aten::mean", "aten::all", "aten::any", "aten::amax", "aten::norm"):
        return sum(sizes)
    if call.name == "aten::copy_":  # (dst, src)
        return sum(sizes[:2])
    if call.name.endswith("_"):  # in place on the first input: read and written
        return sum(sizes) + sizes[0]
    return sum(sizes) + max(sizes)


def price(trace: gpu_trace.Trace, gpu: Dict, gemm_efficiency: float = GEMM_EFFICIENCY,
          memory_efficiency: float = MEMORY_EFFICIENCY) -> Dict:
    """Predicted microseconds of a trace on `gpu`, with its launches and dominant call (the two
    efficiencies are the model's unless a sensitivity study asks for others)."""
    bandwidth = gpu["hbm_tb_s"] * 1e12 * memory_efficiency
    gpu_us, rows = 0.0, []
    for call in trace.calls:
        int_rate = gpu["int32_tops"] * 1e12 * INT_EFFICIENCY
        if call.buffers:  # our kernel
            bytes_ = sum(b * (2 if role == "inout" else 1) for _, role, b in call.buffers)
            philox_us = call.philox_calls * PHILOX_INT_OPS / int_rate * 1e6
            fma_us = 2 * call.fmas / (gpu["fp32_tflops"] * 1e12 * SIMT_KERNEL_EFFICIENCY) * 1e6
            mma_us = call.mmas * MMA_FLOPS / (gpu["bf16_tflops"] * 1e12 * MMA_KERNEL_EFFICIENCY) * 1e6
            latency_us = call.barriers * BARRIER_PHASE_US
            flops = 2 * call.fmas + call.mmas * MMA_FLOPS
            occupancy = min(1.0, call.blocks / gpu["sms"]) if call.blocks else 1.0
            throughput_us = max(bytes_ / bandwidth * 1e6, philox_us, fma_us, mma_us) / occupancy
            us, kind = max(throughput_us, latency_us), "kernel"
        elif call.name == "copy_to_host":
            bytes_, flops, kind, us = 0, 0, "host wait", HOST_COPY_US
        elif call.name in GEMMS:
            flops, bytes_, dtype = gemm_cost(call)
            compute = flops / (_peak_tflops(gpu, dtype) * 1e12 * gemm_efficiency)
            us, kind = max(compute, bytes_ / bandwidth) * 1e6, f"gemm {dtype}"
        else:
            bytes_, flops, kind = elementwise_bytes(call), 0, "memory"
            us = bytes_ / bandwidth * 1e6
            if call.name in ("aten::bernoulli_", "aten::native_dropout", "aten::bernoulli"):
                philox_us = _numel(call.shapes[0]) / 4 * PHILOX_INT_OPS / int_rate * 1e6
                us, kind = max(us, philox_us), "dropout"
        us = max(us, KERNEL_FLOOR_US) + LAUNCH_GAP_US
        gpu_us += us
        rows.append({"call": call.name, "phase": call.phase, "kind": kind, "us": round(us, 2),
                     "flops": flops, "bytes": bytes_, "shapes": [list(s) for s in call.shapes]})
    host_us = trace.host_calls * HOST_US_PER_ATEN_CALL + trace.python_calls * HOST_US_PER_PYTHON_CALL
    dominant = sorted(rows, key=lambda r: -r["us"])[:3]
    return {"us": max(gpu_us, host_us), "gpu_us": gpu_us, "host_us": host_us, "launches": len(trace.calls),
            "peak_mib": trace.peak_bytes / 2**20, "dominant": dominant, "calls": rows}


# The variants with a GPU target (docs/design.md: standard/mini <= 1.15x, bat <= 1.6x), and the
# efficiencies a sensitivity study varies: the two assumptions every ratio turns on.
TARGETS = {"miss_ext standard": ("standard", 1.15), "miss_ext mini": ("mini", 1.15), "miss_ext bat": ("bat", 1.6)}
SENSITIVITY = {"gemm_efficiency": (0.6, 0.7, 0.8), "memory_efficiency": (0.75, 0.85, 0.95)}


def analyse(traces: Dict[str, gpu_trace.Trace], shape: gpu_trace.Shape, results: Dict,
            calibration: Optional[Dict] = None) -> Dict:
    """Per GPU: each target variant's floor (benchmarks/gpu_floor.py, priced here like a recorded
    trace) beside its prediction (from `results`) and target, and its predicted ratio at every
    pair of the efficiencies of SENSITIVITY; with a `calibration` ({GPU name: efficiencies a
    measurement implies, None where it has none}, benchmarks/gpu_measured.py), every
    implementation's ratio at those efficiencies too."""
    analysis = {}
    for gpu_name, gpu in GPUS.items():
        floors = {variant: price(gpu_floor.floor_trace(variant, shape), gpu) for variant in gpu_floor.VARIANTS}
        predicted = results[gpu_name]
        # predicted: the step's time (the host's where it is longer); predicted_gpu: the GPU's
        # alone, which is what the floor bounds.
        rows = {name: {"target": target, "predicted": predicted[name]["ratio"],
                       "predicted_gpu": predicted[name]["gpu_us"] / predicted["frozen Linear"]["gpu_us"],
                       "floor": floors[variant]["gpu_us"] / floors["frozen Linear"]["gpu_us"],
                       "floor_terms_us": {f"{c['phase']} {c['call']}": c["us"] for c in floors[variant]["calls"]}}
                for name, (variant, target) in TARGETS.items()}
        grid = []
        for gemm in SENSITIVITY["gemm_efficiency"]:
            for memory in SENSITIVITY["memory_efficiency"]:
                frozen = price(traces["frozen Linear"], gpu, gemm, memory)["us"]
                grid.append({"gemm_efficiency": gemm, "memory_efficiency": memory,
                             **{name: price(traces[name], gpu, gemm, memory)["us"] / frozen for name in TARGETS}})
        analysis[gpu_name] = {"targets": rows, "sensitivity": grid}
        if calibration and gpu_name in calibration:
            implied = calibration[gpu_name]
            gemm = implied["gemm_efficiency"] if implied["gemm_efficiency"] is not None else GEMM_EFFICIENCY
            memory = implied["memory_efficiency"] if implied["memory_efficiency"] is not None else MEMORY_EFFICIENCY
            frozen = price(traces["frozen Linear"], gpu, gemm, memory)["us"]
            analysis[gpu_name]["at_measured_efficiencies"] = {
                "implied": implied, "gemm_efficiency": gemm, "memory_efficiency": memory,
                "model_gemm_efficiency": GEMM_EFFICIENCY, "model_memory_efficiency": MEMORY_EFFICIENCY,
                **{name: price(trace, gpu, gemm, memory)["us"] / frozen for name, trace in traces.items()}}
    return analysis


def predict(shape: gpu_trace.Shape, scale: int, calibration: Optional[Dict] = None):
    """(the predicted tables per GPU, and analyse()'s floors, sensitivity and calibration)."""
    traces = gpu_variants.record_all(shape, scale)
    results = {}
    for gpu_name, gpu in GPUS.items():
        priced = {name: price(trace, gpu) for name, trace in traces.items()}
        base = priced["frozen Linear"]
        results[gpu_name] = {
            name: {"ratio": p["us"] / base["us"], "us": p["us"], "gpu_us": p["gpu_us"], "host_us": p["host_us"],
                   "launches": p["launches"], "peak_mib": p["peak_mib"], "peak_vs_frozen_mib": p["peak_mib"] - base["peak_mib"],
                   "dominant": [f"{d['phase']} {d['call']} {d['shapes']}: {d['us']:.1f} us" for d in p["dominant"]],
                   "calls": p["calls"]}
            for name, p in priced.items()}
    merges = gpu_variants.record_merges(shape, scale)
    for gpu_name, gpu in GPUS.items():
        priced = {name: price(trace, gpu) for name, trace in merges.items()}
        base = priced["W.copy_()"]
        results[gpu_name + " merge"] = {
            name: {"ratio": p["us"] / base["us"], "us": p["us"], "gpu_us": p["gpu_us"], "host_us": p["host_us"],
                   "launches": p["launches"], "peak_mib": p["peak_mib"], "peak_vs_frozen_mib": 0.0,
                   "dominant": [f"{d['call']} {d['shapes']}: {d['us']:.1f} us" for d in p["dominant"]],
                   "calls": p["calls"]}
            for name, p in priced.items()}
    return results, analyse(traces, shape, results, calibration)


def report(results: Dict, shape: gpu_trace.Shape, analysis: Dict) -> str:
    import datetime
    import platform

    import peft
    import torch

    lines = [f"PREDICTIONS (no GPU used): fwd+bwd of one layer, tokens {shape.tokens}, in {shape.in_features}, "
             f"out {shape.out_features}, r {shape.r}, mini_r {shape.mini_r}; bf16 model, fp32 adapter", "",
             f"`python benchmarks/gpu_cost_model.py`, traces recorded on {platform.machine()} {platform.node()} "
             f"({datetime.date.today()}, torch {torch.__version__}, peft {peft.__version__}); each row is priced by "
             "the model in the docstring of benchmarks/gpu_cost_model.py.", ""]
    for gpu_name, rows in results.items():
        baseline = "W.copy_()" if gpu_name.endswith("merge") else "frozen Linear"
        lines += [f"## {gpu_name} (predicted)", "",
                  f"| implementation | predicted ratio to {baseline} | predicted us | launches | predicted peak MiB | dominant call |",
                  "|---|---|---|---|---|---|"]
        for name, row in rows.items():
            lines.append(f"| {name} | {row['ratio']:.2f}x | {row['us']:.0f} | {row['launches']} | "
                         f"{row['peak_mib']:.0f} | {row['dominant'][0] if row['dominant'] else ''} |")
        lines.append("")
    lines += report_analysis(analysis)
    lines += ["Assumptions: " + json.dumps(ASSUMPTIONS), ""]
    return "\n".join(lines)


def report_analysis(analysis: Dict) -> List[str]:
    lines = []
    for gpu_name, part in analysis.items():
        lines += [f"## {gpu_name}: targets, predictions and the design floor (predicted)", "",
                  "The floor: the least a CUDA path whose large GEMMs are cuBLAS's can take, at the model's rates "
                  "(benchmarks/gpu_floor.py says what it counts and why). It bounds the GPU's time; where the host's "
                  "is longer (small shapes), the step's ratio is the host's.", "",
                  "| variant | target | predicted | predicted, GPU time alone | floor of the GPU time | floor's terms (us) |",
                  "|---|---|---|---|---|---|"]
        for name, row in part["targets"].items():
            terms = ", ".join(f"{k} {v:.1f}" for k, v in row["floor_terms_us"].items())
            lines.append(f"| {name} | <= {row['target']:.2f}x | {row['predicted']:.3f}x | {row['predicted_gpu']:.3f}x | "
                         f"{row['floor']:.3f}x | {terms} |")
        lines += ["", f"Predicted ratio at other efficiencies ({gpu_name}; the model's: GEMM {GEMM_EFFICIENCY}, "
                  f"memory {MEMORY_EFFICIENCY}):", "",
                  "| GEMM efficiency | memory efficiency | " + " | ".join(TARGETS) + " |",
                  "|---|---|" + "---|" * len(TARGETS)]
        for row in part["sensitivity"]:
            lines.append(f"| {row['gemm_efficiency']} | {row['memory_efficiency']} | "
                         + " | ".join(f"{row[name]:.3f}x" for name in TARGETS) + " |")
        lines.append("")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--in-features", type=int, default=4096)
    parser.add_argument("--out-features", type=int, default=4096)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--mini-r", type=int, default=16)
    parser.add_argument("--scale", type=int, default=4, help="the probe shape is the target divided by this")
    parser.add_argument("--results-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--measured", help="a bench_layer.py JSON result measured on a GPU, to compare with")
    args = parser.parse_args(argv)
    shape = gpu_trace.Shape(args.tokens, args.in_features, args.out_features, args.r, args.mini_r)
    measured = gpu_measured.load(args.measured) if args.measured else None
    calibration = None
    if measured:
        gpu_name = gpu_measured.gpu_name_of(measured)
        calibration = {gpu_name: gpu_measured.implied_efficiencies(measured, GPUS[gpu_name])}
    results, analysis = predict(shape, args.scale, calibration)
    text = report(results, shape, analysis)
    print(text)
    if measured:
        print(gpu_measured.compare(results, analysis, measured, shape))
    stem = os.path.join(args.results_dir, f"gpu_cost_model_predictions_{shape.tokens}x{shape.in_features}x"
                                          f"{shape.out_features}_r{shape.r}")
    os.makedirs(args.results_dir, exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump({"label": "PREDICTION, not a measurement", "shape": vars(shape) if hasattr(shape, "__dict__") else
                   shape.__dict__, "assumptions": ASSUMPTIONS, "gpus": GPUS, "results": results,
                   "analysis": analysis}, f, indent=1)
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
