"""The compiled library uses the LibTorch stable ABI only, so that one build loads on every
torch from 2.11 on: it may reference torch's C shims (aoti_torch_*, torch_*), CUDA and the
C/C++ runtime, never a mangled libtorch/c10 C++ symbol. Such a symbol is what makes an
extension fail with "undefined symbol" after a torch upgrade; a C++ symbol of libtorch in the
library's exports could interpose with libtorch's own.

The check runs on the installed miss_ext._C (whatever build the suite tests: the editable dev
build, or the one wheel CI builds against torch 2.11 and installs into other torch versions).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import miss_ext._C as C

# After demangling. Undefined: any mention (also typeinfo/vtable for c10::..., and templates
# instantiated over libtorch types, which only libtorch could define). Exported: entities of
# those namespaces themselves; a std:: template instantiated over a stable-ABI type (a
# shared_ptr deleter of torch::stable::Tensor, kept weak by the C++ runtime's rules) is ours.
FORBIDDEN = re.compile(r"\b(c10|at|torch|caffe2)::")
FORBIDDEN_EXPORT = re.compile(r"^(typeinfo (name )?for |vtable for |guard variable for )?(c10|at|torch|caffe2)::")

needs_binutils = pytest.mark.skipif(not (shutil.which("nm") and shutil.which("c++filt")),
                                    reason="nm and c++filt (binutils) are needed")


def dynamic_symbols(path: str, which: str) -> list:
    """Names of the dynamic symbols of `path`, `which` = "--undefined-only" or "--defined-only"."""
    out = subprocess.run(["nm", "-D", which, path], check=True, capture_output=True, text=True).stdout
    return [line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()]


def libtorch_cxx_symbols(names: list, pattern: re.Pattern = FORBIDDEN) -> list:
    """The names among `names` whose demangled form matches `pattern` (a libtorch/c10/ATen C++ entity)."""
    mangled = [n for n in names if n.startswith("_Z")]
    if not mangled:
        return []
    demangled = subprocess.run(["c++filt"], input="\n".join(mangled), check=True, capture_output=True,
                               text=True).stdout.splitlines()
    return sorted({d for d in demangled if pattern.search(d)})


@needs_binutils
def test_no_libtorch_cxx_symbol_is_undefined():
    bad = libtorch_cxx_symbols(dynamic_symbols(C.__file__, "--undefined-only"))
    assert not bad, f"{len(bad)} libtorch/c10 C++ symbols are undefined in {C.__file__}:\n" + "\n".join(bad)


@needs_binutils
def test_torch_is_reached_through_its_c_shims():
    undefined = dynamic_symbols(C.__file__, "--undefined-only")
    shims = {n for n in undefined if n.startswith(("aoti_torch_", "torch_", "aoti_record_function_"))}
    # the registration, the dispatcher, the tensor accessors and the parallel loop
    assert {"torch_library_impl", "torch_call_dispatcher", "aoti_torch_get_sizes", "torch_parallel_for"} <= shims
    # torch's C++ parallel backend is not compiled in: no OpenMP runtime of our own
    assert not [n for n in undefined if n.startswith(("GOMP_", "omp_"))]


@needs_binutils
def test_no_libtorch_cxx_symbol_is_exported():
    bad = libtorch_cxx_symbols(dynamic_symbols(C.__file__, "--defined-only"), FORBIDDEN_EXPORT)
    assert not bad, f"{C.__file__} exports libtorch/c10 C++ symbols:\n" + "\n".join(bad)


@needs_binutils
def test_the_check_finds_a_libtorch_cxx_symbol():
    """The check can fail: the symbols of a build against libtorch's C++ API are found."""
    names = ["_ZN3c1019UndefinedTensorImpl10_singletonE", "_ZTIN3c105ErrorE",
             "_ZN2at4_ops2mm4callERKNS_6TensorES4_", "aoti_torch_get_sizes", "_ZNSt6chrono3_V212system_clock3nowEv"]
    found = libtorch_cxx_symbols(names)
    assert len(found) == 3 and any("c10::Error" in f for f in found) and any("at::_ops::mm" in f for f in found)
