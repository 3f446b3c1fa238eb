"""What the CUDA path of an op issues, recorded on the emulated CUDA device: every ATen call of
the op body and every kernel launch, in order (torch.profiler; kernel launches and CUDA-only
ATen calls appear as the ranges `miss::cuda_kernel::<name>` and
`miss::cuda_stand_in::<call>`). These tests pin down design decisions of the CUDA path that
no numeric test would notice if they regressed:
- no CPU-sized chunking: one GEMM and one kernel per step, whatever N;
- bat's G = dy^T x straight from the bf16 activations (one mm.dtype), no float32 copy of x
  or dy.
The same recordings on the CPU path (torch.ops.miss) show the other decision, so each test
can fail.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import miss_ext  # noqa: F401

from conftest import bat_block, generator, rand

if not hasattr(torch.ops, "miss_emulated_cuda") or not hasattr(torch.ops.miss_emulated_cuda, "shard_fold"):
    pytest.skip("miss_ext was built without the CUDA emulator (MISS_WITH_EMULATOR=1)", allow_module_level=True)

EMU = torch.ops.miss_emulated_cuda
KERNEL, STAND_IN = "miss::cuda_kernel::", "miss::cuda_stand_in::"


@pytest.fixture(autouse=True)
def fast_emulator():
    """Bounds checks only: these tests read the sequence, test_emulated_cuda.py the results."""
    EMU.configure(seed=0, detect_races=False, sm_count=2, preempt=0.0)
    yield
    EMU.configure()


def recorded_sequence(op_name: str, fn) -> list:
    """(name, input shapes) of what the op `op_name` issued, in order: its ATen calls and
    kernel launches, without what happens inside a launch or a stand-in."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    roots = [e for e in prof.events() if e.name == op_name]
    assert len(roots) == 1, [e.name for e in prof.events()][:20]
    sequence = []

    def walk(event):
        for child in sorted(event.cpu_children, key=lambda e: e.time_range.start):
            sequence.append((child.name, [tuple(s) for s in child.input_shapes]))
            if not child.name.startswith((KERNEL, STAND_IN)):
                walk(child)

    walk(roots[0])
    return sequence


def calls(sequence, name):
    return [entry for entry in sequence if entry[0] == name]


def test_bat_backward_computes_G_from_bf16_activations():
    rows, in_features, out_features, r = 64, 32, 48, 8
    gen = generator(1)
    x = rand((rows, in_features), dtype=torch.bfloat16, gen=gen)
    weight = rand((out_features, in_features), dtype=torch.bfloat16, gen=gen)
    block, grad_out = bat_block(out_features, r, gen=gen), rand((rows, out_features), dtype=torch.bfloat16, gen=gen)
    args = (grad_out, x, weight, block, [True, True, True])

    def activation_copies(sequence):  # conversions of x or dy ([rows, *]) outside the stand-ins
        return [e for e in sequence if e[0] == "aten::_to_copy" and e[1] and len(e[1][0]) == 2 and rows in e[1][0]]

    cuda = recorded_sequence("miss_emulated_cuda::bat_linear_backward", lambda: EMU.bat_linear_backward(*args))
    assert len(calls(cuda, STAND_IN + "mm.dtype")) == 1, cuda
    assert activation_copies(cuda) == [], cuda
    cpu = recorded_sequence("miss::bat_linear_backward", lambda: torch.ops.miss.bat_linear_backward(*args))
    assert len(activation_copies(cpu)) == 2  # the CPU's choice: float32 copies, float32 GEMM


def test_no_cpu_sized_chunks_on_cuda():
    """A bf16 layer with an fp32 block above the CPU's 4 MiB chunk (1100 rows of 1024): the CUDA
    path issues one delta GEMM and one out-tiled add, the CPU path one of each per chunk."""
    rows, in_features, out_features = 1100, 8, 1024
    gen = generator(2)
    x = rand((rows, in_features), dtype=torch.bfloat16, gen=gen)
    weight = rand((out_features, in_features), dtype=torch.bfloat16, gen=gen)
    block = rand((4, out_features), gen=gen)  # float32: the delta is added through a float32 temporary
    args = (x, weight, None, block, 0.0, None)
    def delta_gemms(sequence):  # fold [rows, r] @ block; the base GEMM reads x [rows, in]
        return [shapes for _, shapes in calls(sequence, "aten::mm") if shapes[0][1] == block.shape[0]]

    cuda = recorded_sequence("miss_emulated_cuda::shard_linear", lambda: EMU.shard_linear(*args))
    assert delta_gemms(cuda) == [[(rows, 4), (4, out_features)]]
    assert [name for name, _ in cuda if name.startswith(KERNEL)] == [
        KERNEL + "shard_fold_kernel<scalar_t>", KERNEL + "update_rows_kernel<kVec>"]
    cpu = recorded_sequence("miss::shard_linear", lambda: torch.ops.miss.shard_linear(*args))
    assert len(delta_gemms(cpu)) == 2
