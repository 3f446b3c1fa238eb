"""What setup.py decides before any compiler runs: CPU or CUDA, and for CUDA the toolkit, its
version and the GPU architectures. Every problem found here stops the build with one message
that names what was found and the ways out, instead of an error from deep inside the compiler
or torch.utils.cpp_extension (IndexError with no GPU, CCCL's "CUDA compiler and CUDA toolkit
headers are incompatible" with an older nvcc, "-lcudart not found" with a wrong CUDA_HOME).

Kept free of torch and of process state: setup.py passes in the environment, torch's versions,
the CUDA_HOME torch resolved and a way to run nvcc, so tests/test_build_checks.py can try every
case without a toolkit or a compiler.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

# Compiled for when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset (a build machine or
# CI box). sm_80 code runs on every 8.x GPU (A100, A10, RTX 30xx/40xx), sm_90 on H100/H200;
# the PTX of 9.0 is compiled by the driver for newer GPUs (Blackwell). Two architectures keep
# the build to a few minutes on two cores.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"

# The oldest torch the library loads on: it is built for the LibTorch stable ABI of this
# version (setup.py passes TORCH_TARGET_VERSION), which every later torch keeps.
MIN_TORCH = (2, 11)
TORCH_TARGET_VERSION = "0x%02x%02x000000000000" % MIN_TORCH

PREFIX = "miss_ext build:"
CPU_ONLY_FIX = "build the CPU kernels only with FORCE_CUDA=0"


class BuildConfigError(Exception):
    """A build that cannot succeed; the message says why and what to do (setup.py prints it
    and exits, no traceback)."""


@dataclass(frozen=True)
class CudaPlan:
    build_cuda: bool
    # One line for the build log: what is built and why.
    summary: str
    # TORCH_CUDA_ARCH_LIST to set for torch's build machinery, or None to leave it alone.
    arch_list: Optional[str] = None


def read_flag(env: Mapping[str, str], name: str) -> Optional[str]:
    """``"0"``, ``"1"`` or None (unset or empty) for a 0/1 build variable."""
    value = env.get(name, "")
    if value == "":
        return None
    if value not in ("0", "1"):
        raise BuildConfigError(f"{PREFIX} {name} must be 0 or 1 (or unset), got {value!r}")
    return value


def cuda_home_origin(env: Mapping[str, str], which_nvcc: Optional[str]) -> str:
    """Where torch.utils.cpp_extension took CUDA_HOME from (its _find_cuda_home order)."""
    if env.get("CUDA_HOME"):
        return "set by CUDA_HOME"
    if env.get("CUDA_PATH"):
        return "set by CUDA_PATH"
    if which_nvcc:
        return f"found from the nvcc on PATH, {which_nvcc}"
    return "torch's default"


def is_toolkit(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def toolkit_candidates(patterns: Sequence[str] = ("/usr/local/cuda", "/usr/local/cuda-*", "/opt/cuda")) -> list:
    """Directories on this machine that hold a CUDA toolkit, for the error message."""
    found = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if is_toolkit(path) and path not in found:
                found.append(path)
    return found


def check_toolkit(cuda_home: str, origin: str, candidates: Sequence[str]) -> None:
    """``cuda_home`` must hold nvcc and the CUDA runtime headers."""
    missing = [p for p in ("bin/nvcc", "include/cuda_runtime.h") if not os.path.isfile(os.path.join(cuda_home, p))]
    if not missing:
        return
    where = f" (here: {', '.join(candidates)})" if candidates else ""
    raise BuildConfigError(
        f"{PREFIX} CUDA_HOME is {cuda_home} ({origin}), which is not a CUDA toolkit: "
        f"{' and '.join(os.path.join(cuda_home, p) for p in missing)} missing. "
        f"Either set CUDA_HOME to the toolkit's directory{where}, or {CPU_ONLY_FIX}."
    )


def nvcc_release(version_output: str) -> tuple:
    """(major, minor) from ``nvcc --version``'s "Cuda compilation tools, release 13.0, V13.0.88"."""
    match = re.search(r"release (\d+)\.(\d+)", version_output)
    if match is None:
        raise BuildConfigError(
            f"{PREFIX} cannot read the CUDA version from `nvcc --version`, which printed: "
            f"{version_output.strip()[:300]!r}"
        )
    return int(match.group(1)), int(match.group(2))


def torch_cuda_release(torch_cuda: str) -> tuple:
    major, minor = torch_cuda.split(".")[:2]
    return int(major), int(minor)


def check_nvcc_matches_torch(nvcc: tuple, torch_cuda: str, torch_version: str, cuda_home: str) -> Optional[str]:
    """Stops when nvcc cannot compile against torch's CUDA headers: a different major version
    (torch refuses it too), or an older minor one (the headers torch's wheel ships, which
    setup.py puts on the include path, are newer than the compiler: CCCL refuses them). A newer
    nvcc of the same major version works; the returned note says so for the log."""
    torch_release = torch_cuda_release(torch_cuda)
    if nvcc == torch_release:
        return None
    found = f"{nvcc[0]}.{nvcc[1]}"
    if nvcc[0] != torch_release[0] or nvcc < torch_release:
        relation = "a different major version than" if nvcc[0] != torch_release[0] else "older than"
        raise BuildConfigError(
            f"{PREFIX} the CUDA toolkit at {cuda_home} is CUDA {found} (bin/nvcc), {relation} the "
            f"CUDA {torch_cuda} that torch {torch_version} was built with; nvcc {found} cannot "
            f"compile against torch's CUDA {torch_cuda} headers. Either install the CUDA "
            f"{torch_cuda} toolkit and set CUDA_HOME to it, or {CPU_ONLY_FIX}."
        )
    return f"nvcc {found} is newer than torch's CUDA {torch_cuda} (same major version: compatible)"


def arch_list(env: Mapping[str, str], gpu_count: Callable[[], int]) -> tuple:
    """(TORCH_CUDA_ARCH_LIST to set or None, note for the log). torch detects the visible GPUs
    when the variable is unset or "native", and fails (IndexError) when there is none."""
    value = env.get("TORCH_CUDA_ARCH_LIST", "")
    if value and value != "native":
        return None, f"TORCH_CUDA_ARCH_LIST={value}"
    count = gpu_count()
    if count > 0:
        return None, f"those of the {count} visible GPU(s)"
    if value == "native":
        raise BuildConfigError(
            f"{PREFIX} TORCH_CUDA_ARCH_LIST=native but no GPU is visible to detect. Either set "
            f"TORCH_CUDA_ARCH_LIST to the architectures to compile for (e.g. \"{DEFAULT_CUDA_ARCH_LIST}\"), "
            f"or {CPU_ONLY_FIX}."
        )
    return DEFAULT_CUDA_ARCH_LIST, (
        f"the default \"{DEFAULT_CUDA_ARCH_LIST}\", since no GPU is visible and TORCH_CUDA_ARCH_LIST "
        f"is unset (set it to choose)"
    )


def plan_cuda(
    env: Mapping[str, str],
    torch_version: str,
    torch_cuda: Optional[str],
    cuda_home: Optional[str],
    which_nvcc: Optional[str],
    nvcc_version: Callable[[str], str],
    gpu_count: Callable[[], int],
    candidates: Callable[[], Sequence[str]] = toolkit_candidates,
) -> CudaPlan:
    """CPU only or CUDA, decided by what can be compiled, never by torch.cuda.is_available():
    a build machine without a GPU must still produce the CUDA kernels.

    ``torch_cuda`` is torch.version.cuda, ``cuda_home`` the CUDA_HOME torch resolved (None when
    it found none), ``nvcc_version(path)`` returns what ``path --version`` prints."""
    force = read_flag(env, "FORCE_CUDA")
    if force == "0":
        return CudaPlan(False, "CPU kernels only (FORCE_CUDA=0)")
    if torch_cuda is None:
        if force == "1":
            raise BuildConfigError(
                f"{PREFIX} FORCE_CUDA=1 but torch {torch_version} is a CPU-only build. Either install "
                f"a CUDA build of torch, or {CPU_ONLY_FIX}."
            )
        return CudaPlan(False, f"CPU kernels only: torch {torch_version} has no CUDA")
    if cuda_home is None:
        if force == "1":
            raise BuildConfigError(
                f"{PREFIX} FORCE_CUDA=1 but no CUDA toolkit was found (no CUDA_HOME, no nvcc on PATH, "
                f"no /usr/local/cuda). Either set CUDA_HOME to a CUDA {torch_cuda} toolkit, or {CPU_ONLY_FIX}."
            )
        return CudaPlan(False, f"CPU kernels only: torch {torch_version} has CUDA {torch_cuda} but no CUDA "
                               f"toolkit was found (set CUDA_HOME to build the CUDA kernels)")
    check_toolkit(cuda_home, cuda_home_origin(env, which_nvcc), candidates())
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    version_note = check_nvcc_matches_torch(nvcc_release(nvcc_version(nvcc)), torch_cuda, torch_version, cuda_home)
    archs, arch_note = arch_list(env, gpu_count)
    notes = [f"CPU and CUDA kernels, compiled with {nvcc}; architectures: {arch_note}"]
    notes += [version_note] if version_note else []
    return CudaPlan(True, "; ".join(notes), archs)


def nvcc_version_output(nvcc: str) -> str:
    """What ``nvcc --version`` prints; a failure to run it is a build error with its output."""
    try:
        proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildConfigError(f"{PREFIX} could not run {nvcc} --version: {error}") from None
    if proc.returncode != 0:
        raise BuildConfigError(
            f"{PREFIX} {nvcc} --version failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[:300]}"
        )
    return proc.stdout


def check_setuptools(version: str, minimum: str = "77") -> None:
    """pyproject.toml's ``license = "Apache-2.0"`` (a license expression) needs setuptools >= 77;
    an older one fails with an obscure validation error. With --no-build-isolation pip does not
    install build-system.requires, so the venv's own setuptools is the one used."""
    def release(v):
        return tuple(int(p) for p in re.findall(r"\d+", v)[:3])

    if release(version) < release(minimum):
        raise BuildConfigError(
            f"{PREFIX} setuptools {version} is too old: miss_ext needs setuptools >= {minimum} "
            f"(pip install \"setuptools>={minimum}\")."
        )


def check_torch(version: str) -> None:
    """The stable ABI headers of a torch older than MIN_TORCH lack what csrc/ uses; say so
    instead of failing in the compiler."""
    release = tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:2])
    if release < MIN_TORCH:
        wanted = ".".join(map(str, MIN_TORCH))
        raise BuildConfigError(
            f"{PREFIX} torch {version} is too old: miss_ext is built for the LibTorch stable ABI of "
            f"torch {wanted} and loads on torch >= {wanted} (pip install \"torch>={wanted}\")."
        )
