"""setup.py's decisions before any compiler runs (build_checks.py): every case a user can meet
on a machine (no toolkit, a CUDA_HOME that is not one, an nvcc older than torch's CUDA, no GPU
to detect architectures from) builds, or stops with one message naming the fix. Fake toolkits
and nvcc outputs: nothing here compiles."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if not (REPO / "build_checks.py").is_file():
    pytest.skip("build_checks.py is in the source tree only", allow_module_level=True)
_spec = importlib.util.spec_from_file_location("build_checks", REPO / "build_checks.py")
# Loaded by path, not by putting the checkout on sys.path: that would make `import miss_ext`
# find the source tree instead of the installed package under test.
bc = sys.modules["build_checks"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bc)

NVCC_13_0 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""


def nvcc_says(release: str):
    return lambda path: NVCC_13_0.replace("13.0", release)


def fake_toolkit(root: Path, nvcc=True, header=True) -> str:
    if nvcc:
        (root / "bin").mkdir(parents=True)
        (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    if header:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("")
    return str(root)


def plan(env=None, torch_cuda="13.0", cuda_home=None, which_nvcc=None, nvcc="13.0", gpus=0, candidates=()):
    return bc.plan_cuda(env or {}, torch_version=f"2.15.0+cu{torch_cuda.replace('.', '') if torch_cuda else ''}",
                        torch_cuda=torch_cuda, cuda_home=cuda_home, which_nvcc=which_nvcc,
                        nvcc_version=nvcc_says(nvcc), gpu_count=lambda: gpus, candidates=lambda: list(candidates))


def test_force_cuda_0_builds_the_cpu_kernels_whatever_else_is_there(tmp_path):
    p = plan({"FORCE_CUDA": "0"}, cuda_home=fake_toolkit(tmp_path), nvcc="12.0")
    assert not p.build_cuda and "FORCE_CUDA=0" in p.summary and p.arch_list is None


def test_cpu_only_torch_builds_cpu_and_force_cuda_1_says_why_not():
    p = plan({}, torch_cuda=None)
    assert not p.build_cuda and "has no CUDA" in p.summary
    with pytest.raises(bc.BuildConfigError, match=r"FORCE_CUDA=1 but torch .* CPU-only build.*FORCE_CUDA=0"):
        plan({"FORCE_CUDA": "1"}, torch_cuda=None)


def test_no_toolkit_builds_cpu_and_says_so_and_force_cuda_1_stops():
    p = plan({}, cuda_home=None)
    assert not p.build_cuda and "no CUDA toolkit was found" in p.summary and "CUDA_HOME" in p.summary
    with pytest.raises(bc.BuildConfigError, match=r"no CUDA toolkit was found.*CUDA_HOME.*FORCE_CUDA=0"):
        plan({"FORCE_CUDA": "1"}, cuda_home=None)


def test_cuda_home_without_the_toolkit_names_it_where_it_came_from_and_the_fix(tmp_path):
    # This machine's case: /usr/local/bin/nvcc is a wrapper, so torch resolves CUDA_HOME to /usr/local.
    wrapper_home = fake_toolkit(tmp_path / "usr-local", header=False)
    real = fake_toolkit(tmp_path / "cuda-13.0")
    with pytest.raises(bc.BuildConfigError) as error:
        plan({}, cuda_home=wrapper_home, which_nvcc=f"{wrapper_home}/bin/nvcc", candidates=[real])
    message = str(error.value)
    assert message.startswith("miss_ext build: CUDA_HOME is " + wrapper_home)
    assert f"found from the nvcc on PATH, {wrapper_home}/bin/nvcc" in message
    assert "include/cuda_runtime.h missing" in message
    assert f"set CUDA_HOME to the toolkit's directory (here: {real})" in message and "FORCE_CUDA=0" in message
    with pytest.raises(bc.BuildConfigError, match=r"set by CUDA_HOME.*bin/nvcc and .*cuda_runtime.h missing"):
        plan({"CUDA_HOME": str(tmp_path)}, cuda_home=str(tmp_path))


def test_nvcc_older_than_torchs_cuda_stops_naming_both_and_the_two_ways_out(tmp_path):
    home = fake_toolkit(tmp_path)
    with pytest.raises(bc.BuildConfigError) as error:
        plan({}, torch_cuda="13.2", cuda_home=home, nvcc="13.0", gpus=1)
    message = str(error.value)
    assert f"the CUDA toolkit at {home} is CUDA 13.0 (bin/nvcc), older than the CUDA 13.2 that torch" in message
    assert "install the CUDA 13.2 toolkit and set CUDA_HOME to it" in message
    assert message.endswith("or build the CPU kernels only with FORCE_CUDA=0.")
    assert "\n" not in message


def test_nvcc_of_another_major_version_stops_either_way(tmp_path):
    home = fake_toolkit(tmp_path)
    for nvcc, torch_cuda in (("12.8", "13.0"), ("13.0", "12.8")):
        with pytest.raises(bc.BuildConfigError, match=f"CUDA {nvcc} .*a different major version than the CUDA {torch_cuda}"):
            plan({}, torch_cuda=torch_cuda, cuda_home=home, nvcc=nvcc)


def test_nvcc_newer_minor_version_builds_and_notes_it(tmp_path):
    p = plan({"TORCH_CUDA_ARCH_LIST": "9.0"}, torch_cuda="13.0", cuda_home=fake_toolkit(tmp_path), nvcc="13.2")
    assert p.build_cuda and "nvcc 13.2 is newer than torch's CUDA 13.0" in p.summary


def test_matching_nvcc_builds_cuda_with_the_given_arch_list(tmp_path):
    home = fake_toolkit(tmp_path)
    p = plan({"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}, cuda_home=home, nvcc="13.0")
    assert p.build_cuda and p.arch_list is None
    assert p.summary == f"CPU and CUDA kernels, compiled with {home}/bin/nvcc; architectures: TORCH_CUDA_ARCH_LIST=8.0;9.0"


def test_no_gpu_and_no_arch_list_compiles_for_the_default_list_and_says_so(tmp_path):
    # torch's own _get_cuda_arch_flags raises IndexError here (it finds no GPU to read).
    for i, env in enumerate(({}, {"TORCH_CUDA_ARCH_LIST": ""}, {"FORCE_CUDA": "1"})):
        p = plan(env, cuda_home=fake_toolkit(tmp_path / str(i)), gpus=0)
        assert p.build_cuda and p.arch_list == bc.DEFAULT_CUDA_ARCH_LIST
        assert f'architectures: the default "{bc.DEFAULT_CUDA_ARCH_LIST}", since no GPU is visible' in p.summary


def test_a_visible_gpu_leaves_the_architectures_to_torch(tmp_path):
    p = plan({}, cuda_home=fake_toolkit(tmp_path), gpus=2)
    assert p.build_cuda and p.arch_list is None and "architectures: those of the 2 visible GPU(s)" in p.summary


def test_native_arch_list_without_a_gpu_stops(tmp_path):
    with pytest.raises(bc.BuildConfigError, match="TORCH_CUDA_ARCH_LIST=native but no GPU is visible"):
        plan({"TORCH_CUDA_ARCH_LIST": "native"}, cuda_home=fake_toolkit(tmp_path), gpus=0)
    assert plan({"TORCH_CUDA_ARCH_LIST": "native"}, cuda_home=fake_toolkit(tmp_path / "g"), gpus=1).build_cuda


@pytest.mark.parametrize("name", ["FORCE_CUDA", "MISS_WITH_EMULATOR"])
def test_flags_other_than_0_or_1_are_refused_by_name(name):
    assert bc.read_flag({}, name) is None and bc.read_flag({name: ""}, name) is None
    assert bc.read_flag({name: "1"}, name) == "1"
    with pytest.raises(bc.BuildConfigError, match=f"{name} must be 0 or 1 \\(or unset\\), got 'yes'"):
        bc.read_flag({name: "yes"}, name)


def test_nvcc_release_is_read_from_its_banner_and_an_unreadable_one_is_reported():
    assert bc.nvcc_release(NVCC_13_0) == (13, 0)
    assert bc.nvcc_release(NVCC_13_0.replace("13.0", "12.10")) == (12, 10)
    with pytest.raises(bc.BuildConfigError, match="cannot read the CUDA version from `nvcc --version`"):
        bc.nvcc_release("command not found")


def test_an_nvcc_that_fails_to_run_is_a_build_error_with_its_output(tmp_path):
    broken = tmp_path / "nvcc"
    broken.write_text("#!/bin/sh\necho 'wrapped compiler missing' >&2\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(bc.BuildConfigError, match=r"--version failed \(exit 3\): wrapped compiler missing"):
        bc.nvcc_version_output(str(broken))
    with pytest.raises(bc.BuildConfigError, match="could not run"):
        bc.nvcc_version_output(str(tmp_path / "absent"))


def test_setuptools_older_than_77_is_refused_with_the_command_that_fixes_it():
    bc.check_setuptools("77.0.3")
    bc.check_setuptools("80.9.0")
    with pytest.raises(bc.BuildConfigError, match=r'setuptools 65.5.0 is too old.*pip install "setuptools>=77"'):
        bc.check_setuptools("65.5.0")


def test_the_minimum_setuptools_and_the_default_arch_list_are_the_documented_ones():
    pyproject = (REPO / "pyproject.toml").read_text()
    readme = (REPO / "README.md").read_text()
    assert '"setuptools>=77"' in pyproject and "setuptools>=77" in readme
    assert bc.DEFAULT_CUDA_ARCH_LIST in readme


@pytest.mark.skipif(not (REPO / "setup.py").is_file(), reason="needs the source tree")
def test_setup_py_stops_with_the_one_line_message_before_compiling(tmp_path):
    """The wiring: setup.py exits with build_checks' message (no traceback) at its first step."""
    home = fake_toolkit(tmp_path / "toolkit")
    (Path(home) / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 1.0, V1.0.0'\n")
    (Path(home) / "bin" / "nvcc").chmod(0o755)
    env = dict(os.environ, FORCE_CUDA="1", CUDA_HOME=home, TORCH_CUDA_ARCH_LIST="9.0")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    # A CUDA torch meets the fake nvcc 1.0; a CPU-only torch cannot build CUDA at all.
    assert last.startswith("miss_ext build: ") and "FORCE_CUDA=0" in last, proc.stderr
    assert "CUDA 1.0" in last or "CPU-only build" in last


def test_cmake_targets_the_stable_abi_version_of_build_checks():
    """The developer build (CMakeLists.txt) and setup.py must build for one stable ABI version."""
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert f"TORCH_TARGET_VERSION={bc.TORCH_TARGET_VERSION}" in cmake


@pytest.mark.parametrize("version", ["2.10.1", "2.9.0+cpu", "1.13.1"])
def test_torch_older_than_the_stable_abi_target_is_refused(version):
    with pytest.raises(bc.BuildConfigError, match=rf"torch {re.escape(version)} is too old.*torch>=2\.11"):
        bc.check_torch(version)


@pytest.mark.parametrize("version", ["2.11.0", "2.13.0+cpu", "2.15.0", "3.0.0"])
def test_supported_torch_versions_pass(version):
    bc.check_torch(version)
