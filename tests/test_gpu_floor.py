"""The floor of the CUDA path's design class (benchmarks/gpu_floor.py, priced by the cost model
like a recorded trace): what it counts, and the claim the docs make from it at the benchmark
shape. No trace is recorded."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
gpu_floor = pytest.importorskip("gpu_floor")
model = pytest.importorskip("gpu_cost_model")
BENCHMARK_SHAPE = model.gpu_trace.Shape(8192, 4096, 4096, 64, 16)


def floor(variant, gpu_name="H100 SXM"):
    return model.price(gpu_floor.floor_trace(variant, BENCHMARK_SHAPE), model.GPUS[gpu_name])


def ratio(variant, gpu_name):
    return floor(variant, gpu_name)["gpu_us"] / floor("frozen Linear", gpu_name)["gpu_us"]


def kernels_us(priced):
    """The time of the kernels of ours in a priced floor (not the GEMMs); price() rounds each
    call's to 0.01 us, hence the tolerance of the checks below."""
    return sum(c["us"] for c in priced["calls"] if c["kind"] == "kernel")


def test_standard_floor_counts_five_activation_passes_and_the_fold():
    """x, y, dy twice and dx (bf16, tokens x 4096 each) and the fold written and read once, in
    3 kernels, each followed by a launch gap."""
    gpu = model.GPUS["H100 SXM"]
    bandwidth = gpu["hbm_tb_s"] * 1e12 * model.MEMORY_EFFICIENCY
    expected = (5 * 2 * 8192 * 4096 + 2 * 4 * 8192 * 64) / bandwidth * 1e6
    priced = floor("standard")
    assert priced["launches"] == 5
    assert kernels_us(priced) == pytest.approx(expected + 3 * model.LAUNCH_GAP_US, abs=0.02)


def test_frozen_floor_is_the_prediction_of_the_frozen_linear():
    """The floors' ratios share their denominator with the predictions: the frozen Linear's two
    GEMMs, priced the same way (796 us on either GPU at the model's 0.7 of the bf16 peak)."""
    assert floor("frozen Linear")["gpu_us"] == pytest.approx(795.8, abs=0.1)
    assert floor("frozen Linear", "H200 SXM")["gpu_us"] == pytest.approx(795.8, abs=0.1)


def test_the_h100_targets_of_standard_and_bat_lie_below_the_floor():
    """docs/gpu-performance.md says so: at the model's rates no path built on cuBLAS GEMMs meets
    standard <= 1.15x or bat <= 1.6x on an H100; on an H200 the floor is under every target."""
    assert 1.15 < ratio("standard", "H100 SXM") < 1.16
    assert 1.60 < ratio("bat", "H100 SXM") < 1.61
    assert ratio("mini", "H100 SXM") < 1.15
    assert ratio("standard", "H200 SXM") < 1.15 and ratio("mini", "H200 SXM") < 1.15
    assert ratio("bat", "H200 SXM") < 1.6


def test_mini_reads_dy_once():
    gpu = model.GPUS["H100 SXM"]
    one_pass = 2 * 8192 * 4096 / (gpu["hbm_tb_s"] * 1e12 * model.MEMORY_EFFICIENCY) * 1e6
    assert kernels_us(floor("standard")) - kernels_us(floor("mini")) == pytest.approx(one_pass, abs=0.02)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="no floor for variant 'lora'"):
        gpu_floor.floor_trace("lora", BENCHMARK_SHAPE)
