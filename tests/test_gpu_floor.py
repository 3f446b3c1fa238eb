"""The floor of the CUDA path's design class (benchmarks/gpu_floor.py): what it counts, and the
claim the docs make from it at the benchmark shape. Pure arithmetic: no trace is recorded."""

import importlib.util
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)
gpu_floor = pytest.importorskip("gpu_floor")


def _cost_model():
    spec = importlib.util.spec_from_file_location("gpu_cost_model", os.path.join(BENCHMARKS, "gpu_cost_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


model = _cost_model()
BENCHMARK_SHAPE = model.gpu_trace.Shape(8192, 4096, 4096, 64, 16)


def floors(gpu_name, shape=BENCHMARK_SHAPE):
    return gpu_floor.floor_ratios(shape, model.GPUS[gpu_name], model.GEMM_EFFICIENCY, model.MEMORY_EFFICIENCY,
                                  model.KERNEL_FLOOR_US, model.LAUNCH_GAP_US)


def test_standard_floor_counts_five_activation_passes_and_the_fold():
    """x, y, dy twice and dx (bf16, tokens x 4096 each) and the fold written and read once."""
    gpu = model.GPUS["H100 SXM"]
    terms = floors("H100 SXM")["standard"]["terms"]
    bandwidth = gpu["hbm_tb_s"] * 1e12 * model.MEMORY_EFFICIENCY
    expected = (5 * 2 * 8192 * 4096 + 2 * 4 * 8192 * 64) / bandwidth * 1e6
    assert terms["3 kernels: x, y, dy twice, dx"] == pytest.approx(expected + 3 * model.LAUNCH_GAP_US)


def test_frozen_floor_is_its_two_gemms_and_the_prediction_of_the_frozen_linear():
    """The floors' ratios share their denominator with the predictions: the frozen Linear's two
    GEMMs, priced the same way (796 us on either GPU at the model's 0.7 of the bf16 peak)."""
    rows = floors("H100 SXM")
    assert rows["frozen Linear"]["ratio"] == 1.0
    assert rows["frozen Linear"]["us"] == pytest.approx(795.8, abs=0.1)


def test_the_h100_targets_of_standard_and_bat_lie_below_the_floor():
    """docs/gpu-performance.md says so: at the model's rates no path built on cuBLAS GEMMs meets
    standard <= 1.15x or bat <= 1.6x on an H100; on an H200 the floor is under every target."""
    h100, h200 = floors("H100 SXM"), floors("H200 SXM")
    assert 1.15 < h100["standard"]["ratio"] < 1.16
    assert 1.60 < h100["bat"]["ratio"] < 1.61
    assert h100["mini"]["ratio"] < 1.15
    assert h200["standard"]["ratio"] < 1.15 and h200["mini"]["ratio"] < 1.15 and h200["bat"]["ratio"] < 1.6


def test_mini_reads_dy_once():
    standard, mini = floors("H100 SXM")["standard"], floors("H100 SXM")["mini"]
    gpu = model.GPUS["H100 SXM"]
    one_pass = 2 * 8192 * 4096 / (gpu["hbm_tb_s"] * 1e12 * model.MEMORY_EFFICIENCY) * 1e6
    assert (standard["terms"]["3 kernels: x, y, dy twice, dx"] - mini["terms"]["3 kernels: x, y, dy, dx"]
            == pytest.approx(one_pass))


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="no floor for variant 'lora'"):
        gpu_floor.floor_terms("lora", BENCHMARK_SHAPE, model.GPUS["H100 SXM"], 0.7, 0.85, 2.0, 1.0)
