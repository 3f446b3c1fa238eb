"""scripts/setup_env.sh shows that it is alive (scripts/progress.sh): pip's and the compiler's
progress lines, each with the elapsed time, errors kept, noise dropped, and a line when a
step has been quiet for a while."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROGRESS = REPO / "scripts" / "progress.sh"
pytestmark = [
    pytest.mark.skipif(not PROGRESS.is_file(), reason="scripts/ are in the source tree only"),
    pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash"),
]


def progress(filter_name: str, script: str, interval: int = 60) -> list:
    """Runs ``script`` (shell producing output) through show_progress with ``filter_name``."""
    command = (f'repo=/src; progress_label=setup; progress_start=$SECONDS; source "{PROGRESS}"; '
               f"{{\n{script.strip()}\n}} | show_progress {filter_name}")
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "MISS_PROGRESS_INTERVAL": str(interval)})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # Each line starts with the elapsed time; compared without it (a loaded machine shifts it).
    assert all(re.match(r"^\[setup \+\d+s\] ", line) for line in lines), lines
    return [re.sub(r"^\[setup \+\d+s\] ", "", line) for line in lines]


def test_build_output_becomes_one_timed_line_per_compiled_file():
    lines = progress("build_lines", r"""
        echo '  running build_ext'
        echo '  miss_ext build: CPU kernels only (FORCE_CUDA=0)'
        echo '  [1/3] c++ -MMD -MF /src/build/x.o.d -O3 -c -c /src/csrc/cpu/shard_kernels.cpp -o /src/build/x.o'
        echo '  [2/3] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -c /src/csrc/cuda/bat_kernels.cu -o y.o'
        echo '  copying miss_ext/ops.py -> build/lib/miss_ext'
        echo "  /src/csrc/cpu/a.cpp:12:3: error: 'foo' was not declared in this scope"
        echo '  g++ -shared -Wl,-O1 build/x.o -o build/lib/miss_ext/_C.abi3.so'
    """)
    assert lines == [
        "miss_ext build: CPU kernels only (FORCE_CUDA=0)",
        "compile [1/3] csrc/cpu/shard_kernels.cpp",
        "compile [2/3] csrc/cuda/bat_kernels.cu",
        "/src/csrc/cpu/a.cpp:12:3: error: 'foo' was not declared in this scope",
        "link miss_ext/_C",
    ]


def test_pip_output_keeps_what_it_fetches_and_installs_and_drops_the_noise():
    lines = progress("pip_lines", r"""
        echo "WARNING: Location 'file:///wheels' is ignored: it is either a non-existing path or lacks a specific scheme."
        echo 'Collecting torch==2.14.1'
        echo '  Downloading torch-2.14.1-cp311-manylinux.whl (900.1 MB)'
        echo 'Requirement already satisfied: numpy in ./venv/lib/python3.11/site-packages (2.4.6)'
        echo 'Installing collected packages: torch'
        echo 'ERROR: No matching distribution found for torch==9.9'
    """)
    assert lines == [
        "pip: Collecting torch==2.14.1",
        "pip: Downloading torch-2.14.1-cp311-manylinux.whl (900.1 MB)",
        "pip: Installing collected packages: torch",
        "pip: ERROR: No matching distribution found for torch==9.9",
    ]


def test_a_quiet_step_says_it_is_still_running_and_keeps_a_line_split_by_the_wait():
    lines = progress("build_lines", r"""
        echo '[1/2] c++ -c /src/csrc/a.cpp -o a.o'
        printf '[2/2] c++ -c /src/csr'; sleep 2.5; echo 'c/b.cpp -o b.o'
    """, interval=1)
    assert lines[0] == "compile [1/2] csrc/a.cpp"
    waits = lines[1:-1]
    assert waits and all("... still running" in w and "since: compile [1/2] csrc/a.cpp" in w for w in waits)
    assert lines[-1].endswith("compile [2/2] csrc/b.cpp")


def test_a_step_printing_only_dropped_lines_still_says_it_is_running():
    # pip's "Attempting uninstall" lines or setuptools' "copying ..." lines are read and dropped;
    # they must not keep the step looking silent-but-busy forever.
    lines = progress("build_lines", r"""
        echo '[1/1] c++ -c /src/csrc/a.cpp -o a.o'
        for i in 1 2 3 4 5 6 7 8 9 10; do echo '  copying x.py -> build/lib'; sleep 0.3; done
    """, interval=1)
    assert lines[0] == "compile [1/1] csrc/a.cpp"
    assert len([w for w in lines[1:] if "... still running" in w]) >= 2


def test_a_line_repeated_at_once_is_shown_once():
    lines = progress("build_lines", r"""
        echo 'miss_ext build: CPU kernels only (FORCE_CUDA=0)'
        echo 'running egg_info'
        echo 'miss_ext build: CPU kernels only (FORCE_CUDA=0)'
    """)
    assert lines == ["miss_ext build: CPU kernels only (FORCE_CUDA=0)"]
