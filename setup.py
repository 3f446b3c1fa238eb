"""Builds miss_ext._C: the CPU kernels always, the CUDA kernels when they can be compiled.

CUDA is built when torch has CUDA and a toolkit is found (CUDA_HOME), or when FORCE_CUDA=1
(no GPU is needed to compile; set TORCH_CUDA_ARCH_LIST then, e.g. "8.0;9.0"). FORCE_CUDA=0
builds CPU only. MAX_JOBS bounds parallel compile jobs (ninja).

MISS_WITH_EMULATOR=1 also builds the CUDA emulator and torch.ops.miss_emulated_cuda (the CUDA
kernels compiled for the host and run under a race detector, csrc/emulator/): for the test
suite (scripts/setup_env.sh and CI set it), not for users' installs.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        return False
    if force == "1":
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        if torch.version.cuda is None:
            raise RuntimeError(f"FORCE_CUDA=1 but torch {torch.__version__} is a CPU-only build")
        return True
    # Decided by what can be compiled, never by torch.cuda.is_available(): a build machine
    # without a GPU must still produce the CUDA kernels.
    return torch.version.cuda is not None and CUDA_HOME is not None


def cuda_include_dirs() -> list:
    # ATen's CUDA headers include cublas_v2.h / cusparse.h, which the pip torch ships in
    # nvidia/*/include rather than in the toolkit.
    import nvidia  # noqa: F401  (only present with a CUDA build of torch from pip)

    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return dirs


def want_emulator() -> bool:
    flag = os.environ.get("MISS_WITH_EMULATOR", "0")
    if flag not in ("0", "1"):
        raise RuntimeError(f"MISS_WITH_EMULATOR must be 0 or 1, got {flag!r}")
    return flag == "1"


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp at compile AND link time: without it at::parallel_for runs on one thread.
    cxx = ["-O3", "-fopenmp", "-DMISS_PYTHON_MODULE"]
    if want_emulator():
        sources += sorted(glob.glob("csrc/emulator/*.cpp"))
        cxx.append("-DMISS_WITH_EMULATOR")
    link = ["-fopenmp"]
    if not want_cuda():
        return CppExtension("miss_ext._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link, py_limited_api=True)
    include_dirs = []
    try:
        include_dirs = cuda_include_dirs()
    except ImportError:
        pass
    nvcc = ["-O3", "-lineinfo", "-DMISS_WITH_CUDA"] + (["-DMISS_WITH_EMULATOR"] if want_emulator() else [])
    return CUDAExtension(
        "miss_ext._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + ["-DMISS_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link,
        py_limited_api=True,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
