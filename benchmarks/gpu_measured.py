"""A GPU measurement beside the cost model's predictions (`gpu_cost_model.py --measured FILE`,
FILE a bench_layer.py JSON result written on a GPU, e.g. by benchmarks/gpu_suite.sh).

Two things come out of one measurement:
- the two efficiencies every predicted ratio turns on, as the GPU showed them: the frozen
  Linear's fwd+bwd (two bf16 GEMMs of 2 x tokens x in x out FLOPs each, all of its time counted
  as GEMM time) against the bf16 peak, and one `W.copy_()` of the bf16 weight (read and written
  once) against the HBM bandwidth;
- per implementation, the measured fwd+bwd ratio beside the prediction at the model's
  efficiencies and the prediction at the measured ones. The second separates what the model
  prices wrong in its structure (calls, bytes, launches) from what it assumed of the GPU.
"""

from __future__ import annotations

import json
from typing import Dict, Optional


def load(path: str) -> Dict:
    with open(path) as f:
        measured = json.load(f)
    measured["path"] = path
    return measured


def gpu_name_of(measured: Dict) -> str:
    """The cost model's GPU for a measurement: an H200 when the device says so, else an H100."""
    return "H200 SXM" if "H200" in measured.get("machine", {}).get("gpu", "") else "H100 SXM"


def implied_efficiencies(measured: Dict, gpu: Dict) -> Dict[str, Optional[float]]:
    """{"gemm_efficiency": ..., "memory_efficiency": ...} as the measurement implies them, for
    its bf16 model with fp32 adapter rows; None where the file has no such row (a run with
    --no-merge has no copy)."""
    size = measured["args"]
    tokens, in_features, out_features = size["tokens"], size["in_features"], size["out_features"]
    frozen = next((r for r in measured.get("rows", [])
                   if r.get("candidate") == "Linear (frozen)" and r.get("dtype") == "bf16-fp32"), None)
    copy = next((r for r in measured.get("merge", []) if r.get("dtype") == "bf16-fp32"), None)
    gemm = memory = None
    if frozen:
        flops = 2 * (2 * tokens * in_features * out_features)
        gemm = flops / (frozen["fwd_bwd_ms"] * 1e-3 * gpu["bf16_tflops"] * 1e12)
    if copy:
        memory = 2 * (2 * in_features * out_features) / (copy["copy_ms"] * 1e-3 * gpu["hbm_tb_s"] * 1e12)
    return {"gemm_efficiency": gemm, "memory_efficiency": memory}


def _model_name(row: Dict, r: int) -> Optional[str]:
    key = (row.get("candidate"), row.get("variant"), row.get("dropout"))
    names = {("ours (kernels)", "standard", 0.0): "miss_ext standard",
             ("ours (kernels)", "standard", 0.1): "miss_ext standard dropout 0.1",
             ("ours (kernels)", "mini", 0.0): "miss_ext mini", ("ours (kernels)", "bat", 0.0): "miss_ext bat",
             ("PEFT MiSS", "standard", 0.0): "PEFT MiSS standard",
             ("PEFT MiSS", "standard", 0.1): "PEFT MiSS standard dropout 0.1",
             ("PEFT MiSS", "mini", 0.0): "PEFT MiSS mini", ("PEFT MiSS", "bat", 0.0): "PEFT MiSS bat",
             (f"PEFT LoRA r={r}", "standard", 0.0): "PEFT LoRA"}
    return names.get(key)


def compare(results: Dict, analysis: Dict, measured: Dict, shape) -> str:
    """The lines `--measured` prints: the implied efficiencies, then per implementation the
    measured ratio beside both predictions."""
    gpu_name = gpu_name_of(measured)
    device = measured.get("machine", {}).get("gpu") or "unknown device"
    lines = [f"prediction ({gpu_name}) vs measurement ({device}, {measured['path']})"]
    size = measured["args"]
    measured_shape = (size["tokens"], size["in_features"], size["out_features"], size["r"])
    if measured_shape != (shape.tokens, shape.in_features, shape.out_features, shape.r):
        lines.append(f"  WARNING: measured at tokens, in, out, r = {measured_shape}, predicted at "
                     f"{(shape.tokens, shape.in_features, shape.out_features, shape.r)}")
    calibrated = analysis[gpu_name].get("at_measured_efficiencies", {})
    if calibrated:
        said = []
        for kind, what in (("gemm", "GEMM"), ("memory", "memory")):
            value, model = calibrated["implied"][f"{kind}_efficiency"], calibrated[f"model_{kind}_efficiency"]
            said.append(f"{what} efficiency {value:.3f} (the model assumes {model})" if value is not None else
                        f"{what} efficiency: none in the file (no {'frozen Linear' if kind == 'gemm' else 'merge'} "
                        f"row), the model's {model} used")
        lines.append("  implied by the measurement: " + ", ".join(said))
    for row in measured.get("rows", []):
        name = _model_name(row, size["r"])
        if name and row.get("dtype") == "bf16-fp32":
            at_measured = f", at the measured efficiencies {calibrated[name]:.2f}x" if name in calibrated else ""
            lines.append(f"  {name}: predicted {results[gpu_name][name]['ratio']:.2f}x{at_measured}, "
                         f"measured {row['fwd_bwd_ratio']:.2f}x")
    return "\n".join(lines)
