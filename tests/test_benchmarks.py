"""The benchmark scripts run end to end on tiny sizes (their numbers are not checked here:
speed is shown by the committed results, not by timed tests)."""

import importlib.util
import json
import os

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_layer_tiny(tmp_path):
    pytest.importorskip("peft")
    bench_layer = load("bench_layer")
    assert bench_layer.main(["--tokens", "16", "--in", "32", "--out", "48", "--r", "8", "--mini-r", "4",
                             "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path), "--name", "t"]) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    ours = [r for r in result["rows"] if r["candidate"] == "ours (kernels)"]
    assert {(r["variant"], r["dropout"]) for r in ours} == {
        ("standard", 0.0), ("standard", 0.1), ("mini", 0.0), ("mini", 0.1), ("bat", 0.0)}
    assert all(r["target_ratio"] is not None for r in ours)
    assert {r["candidate"] for r in result["merge"]} == {"PEFT MiSS", "ours (kernels)"}
    assert "| fp32 | bat | 0.0 | ours (kernels) |" in (tmp_path / "t.md").read_text()
    pytest.importorskip("matplotlib")
    assert load("plot_results").main([str(tmp_path / "t.json"), "--out", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_bench_model_tiny(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    bench_model = load("bench_model")
    assert bench_model.main(["--layers", "1", "--hidden", "32", "--intermediate", "64", "--heads", "2",
                             "--vocab", "50", "--batch", "1", "--seq", "8", "--r", "8", "--mini-r", "4",
                             "--repeats", "1", "--warmup", "0", "--out-dir", str(tmp_path), "--name", "m"]) == 0
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    names = [r["candidate"] for r in rows]
    assert names[0] == "no adapter (frozen)" and "ours bat" in names and "PEFT LoRA r=4" in names
    assert all(r["speedup_vs_peft"] > 0 for r in rows if r["candidate"].startswith("ours"))


def test_cost_breakdown_tiny(tmp_path):
    cost_breakdown = load("cost_breakdown")
    assert cost_breakdown.main(["--tokens", "16", "--in", "32", "--out", "64", "--r", "8", "--repeats", "1",
                                "--out-dir", str(tmp_path), "--name", "c"]) == 0
    result = json.loads((tmp_path / "c.json").read_text())
    assert set(result["floor_extra_ms"]) == {"standard (weight path)", "standard, dropout 0.1", "bat"}
    assert result["weight_path_crossover_rows"] > 0


def test_cpu_dtype_costs_tiny(tmp_path):
    cpu_dtype_costs = load("cpu_dtype_costs")
    assert cpu_dtype_costs.main(["--gemm-size", "16", "--weight-size", "64", "--repeats", "1",
                                 "--out-dir", str(tmp_path), "--name", "d"]) == 0
    result = json.loads((tmp_path / "d.json").read_text())
    assert len(result["gemm_ms"]) == 6 and len(result["pass_ms"]) == 9


def test_gpu_cost_model_tiny(tmp_path, capsys):
    """The cost model records every implementation and writes its predictions, labelled as
    predictions; the scaled trace has the target's shapes (base GEMM, every column of bat's G);
    given a GPU measurement (here a made-up bench_layer file) it prints both side by side."""
    pytest.importorskip("peft")
    import torch

    if not hasattr(torch.ops.miss_emulated_cuda, "shard_fold"):
        pytest.skip("miss_ext was built without the CUDA emulator")
    model = load("gpu_cost_model")
    # A made-up H200 measurement whose frozen Linear ran its two GEMMs at exactly half the bf16
    # peak and whose W.copy_() ran at 0.9 of the HBM bandwidth.
    h200 = model.GPUS["H200 SXM"]
    gemm_ms = 2 * 2 * 1536 * 768 * 768 / (0.5 * h200["bf16_tflops"] * 1e12) * 1e3
    copy_ms = 2 * 2 * 768 * 768 / (0.9 * h200["hbm_tb_s"] * 1e12) * 1e3
    measured = tmp_path / "layer_cuda.json"
    measured.write_text(json.dumps({
        "machine": {"gpu": "NVIDIA H200"},
        "args": {"tokens": 1536, "in_features": 768, "out_features": 768, "r": 48, "mini_r": 16},
        "rows": [{"dtype": "bf16-fp32", "candidate": "Linear (frozen)", "variant": "bat", "dropout": 0.0,
                  "fwd_bwd_ms": gemm_ms, "fwd_bwd_ratio": 1.0},
                 {"dtype": "bf16-fp32", "candidate": "ours (kernels)", "variant": "bat", "dropout": 0.0,
                  "fwd_bwd_ms": 1.7 * gemm_ms, "fwd_bwd_ratio": 1.7}],
        "merge": [{"dtype": "bf16-fp32", "variant": "standard", "candidate": "ours (kernels)", "copy_ms": copy_ms}]}))
    assert model.main(["--tokens", "1536", "--in-features", "768", "--out-features", "768", "--r", "48",
                       "--mini-r", "16", "--scale", "4", "--results-dir", str(tmp_path), "--measured", str(measured)]) == 0
    printed = capsys.readouterr().out
    assert "prediction (H200 SXM) vs measurement (NVIDIA H200" in printed
    assert ("implied by the measurement: GEMM efficiency 0.500 (the model assumes 0.7), "
            "memory efficiency 0.900 (the model assumes 0.85)") in printed
    assert "miss_ext bat: predicted" in printed and "at the measured efficiencies" in printed
    assert "measured 1.70x" in printed and "WARNING" not in printed
    stem = tmp_path / "gpu_cost_model_predictions_1536x768x768_r48"
    result = json.loads(stem.with_suffix(".json").read_text())
    assert result["label"].startswith("PREDICTION")
    h100 = result["results"]["H100 SXM"]
    assert set(h100) == {"frozen Linear", "miss_ext standard", "miss_ext standard dropout 0.1", "miss_ext mini",
                         "miss_ext bat", "PEFT MiSS standard", "PEFT MiSS standard dropout 0.1", "PEFT MiSS mini",
                         "PEFT MiSS bat", "PEFT LoRA"}
    assert [c["shapes"] for c in h100["frozen Linear"]["calls"] if c["call"] == "aten::mm"][0] == [[1536, 768], [768, 768]]
    g_columns = [c["shapes"][1][1] for c in h100["miss_ext bat"]["calls"] if c["call"] == "mm.dtype"]
    assert sum(g_columns) == 768
    assert "PREDICTIONS (no GPU used)" in stem.with_suffix(".md").read_text()
    # The floor of the design class is a lower bound of what the path issues, at the same rates.
    for gpu_name, part in result["analysis"].items():
        for name, row in part["targets"].items():
            assert row["floor"] <= row["predicted_gpu"], (gpu_name, name)
        assert len(part["sensitivity"]) == 9
        nominal = [r for r in part["sensitivity"] if (r["gemm_efficiency"], r["memory_efficiency"]) == (0.7, 0.85)]
        assert nominal[0]["miss_ext bat"] == pytest.approx(part["targets"]["miss_ext bat"]["predicted"])


def test_measurement_without_a_copy_says_the_model_s_memory_efficiency_is_used():
    """A GPU run with --no-merge times no W.copy_(): the comparison says so instead of printing
    the model's assumption as if the GPU had shown it."""
    measured_module = load("gpu_measured")
    measured = {"path": "m.json", "machine": {"gpu": "NVIDIA H200"},
                "args": {"tokens": 64, "in_features": 32, "out_features": 32, "r": 8},
                "rows": [{"dtype": "bf16-fp32", "candidate": "Linear (frozen)", "variant": "bat", "dropout": 0.0,
                          "fwd_bwd_ms": 1.0, "fwd_bwd_ratio": 1.0}]}
    implied = measured_module.implied_efficiencies(measured, {"bf16_tflops": 989.4, "hbm_tb_s": 4.8})
    assert implied["memory_efficiency"] is None and implied["gemm_efficiency"] == pytest.approx(
        2 * 2 * 64 * 32 * 32 / (1e-3 * 989.4e12))
    analysis = {"H200 SXM": {"at_measured_efficiencies": {
        "implied": implied, "model_gemm_efficiency": 0.7, "model_memory_efficiency": 0.85}}}
    shape = type("Shape", (), {"tokens": 64, "in_features": 32, "out_features": 32, "r": 8})
    text = measured_module.compare({"H200 SXM": {}}, analysis, measured, shape)
    assert "memory efficiency: none in the file (no merge row), the model's 0.85 used" in text
    assert "WARNING" not in text


def test_weight_path_numerics_tiny(capsys):
    """The script behind the bf16 weight path's refusal prints its table and its worst ratio."""
    numerics = load("weight_path_numerics")
    assert numerics.main(["--tokens", "8", "--in-features", "64", "--out-features", "128", "--r", "16"]) == 0
    printed = capsys.readouterr().out
    assert "| block of one sign, dy >= 0 |" in printed and "worst weight path / reference" in printed
