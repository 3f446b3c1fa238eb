"""Builds miss_ext._C: the CPU kernels always, the CUDA kernels when they can be compiled.

CUDA is built when torch has CUDA and a toolkit is found (CUDA_HOME), or when FORCE_CUDA=1
(no GPU is needed to compile). FORCE_CUDA=0 builds CPU only. With no GPU visible and
TORCH_CUDA_ARCH_LIST unset, the kernels are compiled for build_checks.DEFAULT_CUDA_ARCH_LIST
(printed). MAX_JOBS bounds parallel compile jobs (ninja). Every check that can fail (toolkit,
nvcc version against torch's CUDA, architectures, setuptools) runs first, in build_checks.py,
and stops with one message before any compiler starts.

MISS_WITH_EMULATOR=1 also builds the CUDA emulator and torch.ops.miss_emulated_cuda (the CUDA
kernels compiled for the host and run under a race detector, csrc/emulator/): for the test
suite (scripts/setup_env.sh and CI set it), not for users' installs.

Release build: optimised, without debug info (-g0 overrides the -g in Python's own CFLAGS,
which would make the library ~10 MB larger). The CMake build (CMakeLists.txt) is the one for
debugging.
"""

import glob
import os
import shutil
import sys

import setuptools

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # build_checks.py, beside this file (setuptools' backend does not add it)
import build_checks  # noqa: E402


def fail(error: build_checks.BuildConfigError):
    # One message, no traceback: pip shows it as the output of the failed build.
    sys.exit(str(error))


try:
    build_checks.check_setuptools(setuptools.__version__)
except build_checks.BuildConfigError as error:
    fail(error)

import torch  # noqa: E402

try:
    build_checks.check_torch(torch.__version__)
except build_checks.BuildConfigError as error:
    fail(error)
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cuda_plan() -> build_checks.CudaPlan:
    try:
        plan = build_checks.plan_cuda(
            os.environ,
            torch_version=torch.__version__,
            torch_cuda=torch.version.cuda,
            cuda_home=CUDA_HOME,
            which_nvcc=shutil.which("nvcc"),
            nvcc_version=build_checks.nvcc_version_output,
            gpu_count=torch.cuda.device_count,
        )
    except build_checks.BuildConfigError as error:
        fail(error)
    if plan.arch_list is not None:
        # Read by torch.utils.cpp_extension when it writes the nvcc flags.
        os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list
    print(f"{build_checks.PREFIX} {plan.summary}", flush=True)
    return plan


def cuda_include_dirs() -> list:
    # ATen's CUDA headers include cublas_v2.h / cusparse.h, which the pip torch ships in
    # nvidia/*/include rather than in the toolkit.
    import nvidia  # noqa: F401  (only present with a CUDA build of torch from pip)

    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return dirs


def want_emulator() -> bool:
    try:
        return build_checks.read_flag(os.environ, "MISS_WITH_EMULATOR") == "1"
    except build_checks.BuildConfigError as error:
        fail(error)


# The LibTorch stable ABI only (csrc/torch_api.h): TORCH_TARGET_VERSION makes every header
# outside it (ATen, torch/library.h) an error and keeps the stable headers to what torch 2.11
# has, so the library loads on every torch from 2.11 on (pyproject.toml's torch>=2.11). A
# release wheel is built against torch 2.11 itself: the library passes the torch version of
# its headers to torch_call_dispatcher, and a torch older than that may refuse it.
STABLE_ABI = ["-DTORCH_STABLE_ONLY", f"-DTORCH_TARGET_VERSION={build_checks.TORCH_TARGET_VERSION}"]


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fvisibility=hidden: the inline functions of torch's header-only code stay private to
    # this library instead of interposing with another build's.
    cxx = ["-O3", "-fvisibility=hidden", "-DMISS_PYTHON_MODULE"] + STABLE_ABI
    if want_emulator():
        sources += sorted(glob.glob("csrc/emulator/*.cpp"))
        cxx.append("-DMISS_WITH_EMULATOR")
    # -g0 after everything else: it overrides the -g that setuptools takes from Python's CFLAGS.
    if not cuda_plan().build_cuda:
        return CppExtension("miss_ext._C", sources, extra_compile_args={"cxx": cxx + ["-g0"]}, py_limited_api=True)
    include_dirs = []
    try:
        include_dirs = cuda_include_dirs()
    except ImportError:
        pass
    # USE_CUDA: the CUDA parts of the stable C shims (the current stream, the CUDA GEMMs).
    cuda_defines = ["-DMISS_WITH_CUDA", "-DUSE_CUDA"]
    nvcc = ["-O3", "-lineinfo", "-Xcompiler", "-fvisibility=hidden"] + cuda_defines + STABLE_ABI
    nvcc += ["-DMISS_WITH_EMULATOR"] if want_emulator() else []
    return CUDAExtension(
        "miss_ext._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + cuda_defines + ["-g0"], "nvcc": nvcc},
        py_limited_api=True,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
