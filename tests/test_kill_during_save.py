"""A save_pretrained killed (SIGKILL) at any moment over an older adapter: the directory then
loads the old adapter, loads the new one, or is refused with a clear error; never new weights
with the old config (issue 12: 11 of 20 random kills loaded such a mix).

A child process saves the "new" adapter over the "old" one. Two ways of choosing the moment:
- stepwise: after every file-system call that changes or flushes the directory (os.replace,
  os.unlink, os.fsync) the child prints the call's name and waits for a line on stdin; the
  parent answers until the k-th call and then kills it, for every k of a complete save. So
  every moment between two steps is hit, deterministically, without knowing the steps.
- racing: no pause; the parent polls the directory and kills as soon as the first file is
  replaced or removed.
Every killed directory is then loaded in one fresh process, by miss_ext and by PEFT.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from miss_ext import MissConfig, MissModel, get_miss_model
from miss_ext.files import interrupted_save_leftovers

import models as M

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SEEDS = {"old": 1, "new": 2}

PRELUDE = f"""
import os, sys, time, json
sys.path.insert(0, {TESTS_DIR!r})
import torch
import models as M
from miss_ext import MissConfig, MissModel, get_miss_model

def adapter(marker):
    mm = get_miss_model(M.make_mlp(), MissConfig(r=8, target_modules=["fc1", "fc2"], base_model_name_or_path=marker))
    M.randomize_blocks(mm, seed={SEEDS!r}[marker])
    return mm
"""

SAVER = PRELUDE + r"""
directory, stepwise = sys.argv[1], sys.argv[2] == "stepwise"
mm = adapter("new")
if stepwise:
    def pausing(name, call):
        def wrapped(*args, **kwargs):
            result = call(*args, **kwargs)
            print("STEP", name, flush=True)
            sys.stdin.readline()
            return result
        return wrapped
    for name in ("replace", "unlink", "fsync"):
        setattr(os, name, pausing(name, getattr(os, name)))
print("READY", flush=True)
mm.save_pretrained(directory)
print("DONE", flush=True)
"""

LOADER = PRELUDE + r"""
results = {}
for directory in sys.argv[1:]:
    outcome = {}
    try:
        mm = MissModel.from_pretrained(M.make_mlp(), directory)
        outcome["miss_ext"] = [mm.peft_config["default"].base_model_name_or_path, M.run(mm, "mlp").tolist()]
    except Exception as error:
        outcome["miss_ext"] = ["refused", f"{type(error).__name__}: {error}"]
    try:
        import peft
    except ImportError:
        peft = None
    if peft is not None:
        try:
            theirs = peft.PeftModel.from_pretrained(M.make_mlp(), directory)
            outcome["peft"] = [theirs.peft_config["default"].base_model_name_or_path, M.run(theirs, "mlp").tolist()]
        except Exception as error:
            outcome["peft"] = ["refused", f"{type(error).__name__}: {error}"]
    results[directory] = outcome
print(json.dumps(results))
"""


def adapter(marker: str):
    mm = get_miss_model(M.make_mlp(), MissConfig(r=8, target_modules=["fc1", "fc2"], base_model_name_or_path=marker))
    M.randomize_blocks(mm, seed=SEEDS[marker])
    return mm


def start_saver(directory: str, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SAVER, directory, mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=directory)


def wait_ready(child: subprocess.Popen) -> None:
    assert child.stdout.readline().strip() == "READY", child.stderr.read()


def next_step(child: subprocess.Popen) -> str:
    line = child.stdout.readline().strip()
    assert line.startswith("STEP"), (line, child.stderr.read() if child.poll() is not None else "")
    return line


def resume(child: subprocess.Popen) -> None:
    child.stdin.write("\n")
    child.stdin.flush()


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)


def state(directory: str) -> dict:
    """(inode, mtime) of each file, to see the first one replaced or removed."""
    found = {}
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        try:
            info = os.stat(os.path.join(directory, name))
            found[name] = (info.st_ino, info.st_mtime_ns)
        except FileNotFoundError:  # removed by the save while we look
            found[name] = None
    return found


@pytest.fixture(scope="module")
def expected_outputs():
    return {marker: M.run(adapter(marker), "mlp") for marker in SEEDS}


def test_killed_save_never_loads_a_mix(tmp_path, expected_outputs):
    template = tmp_path / "template"
    adapter("old").save_pretrained(str(template))

    def fresh_copy(name: str) -> str:
        path = tmp_path / name
        shutil.copytree(template, path)
        return str(path)

    # A complete stepwise save, to count its steps.
    calibration = start_saver(fresh_copy("calibration"), "stepwise")
    wait_ready(calibration)
    steps = []
    while True:
        line = calibration.stdout.readline().strip()
        if not line.startswith("STEP"):
            break
        steps.append(line)
        resume(calibration)
    assert line == "DONE" and steps and calibration.wait(timeout=60) == 0, calibration.stderr.read()

    # Kill after step k, for every k: the children start together, each waits at its steps.
    children = [(k, start_saver(fresh_copy(f"stepwise-{k}"), "stepwise")) for k in range(1, len(steps) + 1)]
    killed = []
    for k, child in children:
        wait_ready(child)
        for _ in range(k - 1):
            next_step(child)
            resume(child)
        assert next_step(child) == steps[k - 1]
        kill(child)
        killed.append((f"after step {k} ({steps[k - 1]})", child.args[3]))
    for attempt in range(2):
        directory = fresh_copy(f"racing-{attempt}")
        before = state(directory)
        child = start_saver(directory, "racing")
        wait_ready(child)
        deadline = time.monotonic() + 60
        while state(directory) == before and child.poll() is None and time.monotonic() < deadline:
            pass
        kill(child)
        killed.append((f"racing {attempt}", directory))

    # Offline: PEFT looks a directory without adapter_config.json up on the Hub otherwise.
    loaded = subprocess.run([sys.executable, "-c", LOADER] + [d for _, d in killed], capture_output=True,
                            text=True, timeout=300, cwd=str(tmp_path), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    results = json.loads(loaded.stdout.strip().splitlines()[-1])
    seen = set()
    for moment, directory in killed:
        for loader, (marker, payload) in results[directory].items():
            where = f"killed {moment}, loaded by {loader}"
            if marker == "refused":
                assert "adapter_config.json" in payload, f"{where}: unclear refusal {payload!r}"
                if loader == "miss_ext":
                    assert "interrupted" in payload, f"{where}: {payload!r}"
            else:
                # The config says which adapter this is; the weights must be that adapter's
                # (PEFT computes in its own way: equal within rounding, not bit for bit).
                torch.testing.assert_close(torch.tensor(payload), expected_outputs[marker], rtol=1e-5, atol=1e-6,
                                           msg=f"{where}: config of the {marker} adapter with other weights")
            seen.add(marker)
    assert "old" in seen and "new" in seen, f"the kills never hit before and after the save: {seen}"

    # The next save into a killed directory completes and leaves no temporary file behind.
    for _, directory in killed:
        adapter("new").save_pretrained(directory)
        assert interrupted_save_leftovers(directory) == []
        assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]
        reloaded = MissModel.from_pretrained(M.make_mlp(), directory)
        assert torch.equal(M.run(reloaded, "mlp"), expected_outputs["new"])
