"""benchmarks/gpu_suite.sh's dry run on this CPU (MISS_GPU_SUITE_DRY_RUN=1): every phase of the
one command the GPU machine runs (the build skipped for the miss_ext that already imports, the
CUDA test files with MISS_INTEGRATION_DEVICE=cpu, the benchmarks at tiny sizes on --device cpu),
keeping to the device tool's rules: at most 8 files come back from $OUT, and each is named after
the device. Its numbers are not checked (nothing here runs on a GPU)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_suite.sh")


def header() -> str:
    with open(SCRIPT) as f:
        return "".join(line for line in f if line.startswith("#"))


def test_header_states_the_time_budget():
    text = header()
    assert "Time budget on an H200: an ESTIMATE" in text
    for phase in ("build", "CUDA tests", "bench bf16", "bench fp32", "bench mlp"):
        assert re.search(rf"^#\s+{phase}\s+~\d+ s\s+\d+\s", text, re.M), phase
    total = re.search(r"^#\s+total\s+~(\d+) min\s+(\d+)\s", text, re.M)
    assert total and int(total.group(1)) < 7
    limit = re.search(r"^SUITE_LIMIT=(\d+)", open(SCRIPT).read(), re.M)
    # The overall cap, plus timeout's 10 s grace after TERM, stays under 7 minutes.
    assert limit and int(limit.group(1)) == int(total.group(2)) and int(limit.group(1)) + 10 < 7 * 60


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run(tmp_path):
    pytest.importorskip("peft")
    import miss_ext

    if os.path.dirname(os.path.abspath(miss_ext.__file__)) != os.path.join(REPO, "miss_ext"):
        # scripts/test_other_torch.sh: an installed miss_ext and a source copy without a build;
        # the suite runs from the checkout's root, where the unbuilt source would shadow it.
        pytest.skip("the suite runs this checkout's build of miss_ext, and this process imports another")
    out = tmp_path / "out"
    env = dict(os.environ, MISS_GPU_SUITE_DRY_RUN="1", OUT=str(out), PYTHON=sys.executable)
    env.pop("MISS_INTEGRATION_DEVICE", None)  # the script must set it itself
    proc = subprocess.run(["bash", SCRIPT], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]

    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files
    assert all(re.fullmatch(r"cpu_[A-Za-z0-9._-]+", f) for f in files), files  # the device: "cpu" here
    names = ["bf16_64x64x64", "fp32_64x64x64", "mlp_64x64x176"]
    assert files == sorted(["cpu_suite.log"] + [f"cpu_layer_{n}.{ext}" for n in names for ext in ("json", "md")])
    # the listing it prints last names every file it wrote
    listing = output[output.rindex("file(s) under"):]
    assert "wrote 7 file(s) under" in output and all(f in listing for f in files)

    log = (out / "cpu_suite.log").read_text()
    assert "from-source build skipped" in log and "CUDA kernels:" in log
    assert re.search(r"\d+ passed, \d+ skipped", log), "the CUDA test files did not run"
    assert "FAILED" not in log and "TIMED OUT" not in log and "SKIPPED" not in log
    for n in names:
        result = json.loads((out / f"cpu_layer_{n}.json").read_text())
        assert result["complete"] and result["args"]["device"] == "cpu"
        assert result["rows"] and "ours (reference)" not in {r["candidate"] for r in result["rows"]}
