"""What the CUDA path of a layer step issues, recorded on the emulated CUDA device by the
recorder the GPU cost model prices (benchmarks/gpu_trace.py): every ATen call of the op bodies,
every kernel launch and every cuBLAS call the CPU stands in for. These tests pin down design
decisions of the CUDA path that no numeric test would notice if they regressed:
- the launches of one layer step, per variant (no CPU-sized chunking: their number does not
  grow with N);
- no float32 GEMM and no dtype conversion over an activation-sized ([N, in] or [N, out])
  operand: the thin GEMMs of standard run on bf16 pieces, bat's G comes from the bf16
  activations (mm.dtype);
- bat's G in slabs (its peak memory), the same number at every size.
The same checks on the CPU path (torch.ops.miss, whose choices are the opposite) show that
each check can fail.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

import miss_ext  # noqa: F401

if not hasattr(torch.ops, "miss_emulated_cuda") or not hasattr(torch.ops.miss_emulated_cuda, "shard_fold"):
    pytest.skip("miss_ext was built without the CUDA emulator (MISS_WITH_EMULATOR=1)", allow_module_level=True)

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)
gpu_trace = importlib.import_module("gpu_trace")
gpu_variants = importlib.import_module("gpu_variants")

EMU = torch.ops.miss_emulated_cuda
SHAPE = gpu_trace.Shape(tokens=512, in_features=256, out_features=256, r=16, mini_r=4)


@pytest.fixture(autouse=True)
def fast_emulator():
    """Bounds checks only: these tests read the sequence, test_emulated_cuda.py the results."""
    EMU.configure(seed=0, detect_races=False, sm_count=2, preempt=0.0)
    yield
    EMU.configure()


def recorded(variant: str, p: float = 0.0, shape: gpu_trace.Shape = SHAPE) -> gpu_trace.Trace:
    step, roots = gpu_variants._ours(variant, shape, p)
    return gpu_trace.record(step, shape, 1, roots, lambda: EMU.launch_log(clear=True))


def names(trace, phase=None):
    return [c.name for c in trace.calls if phase is None or c.phase == phase]


def activation_sized(trace, shape):
    """Calls that convert, or run a float32 GEMM over, an [N, in] or [N, out] operand."""
    wide = {shape.in_features, shape.out_features}
    found = []
    for call in trace.calls:
        big = [(s, d) for s, d in zip(call.shapes, call.dtypes)
               if len(s) == 2 and shape.tokens in s and wide & set(s)]
        if not big:
            continue
        if call.name in ("aten::copy_", "aten::_to_copy"):
            found.append((call.name, call.shapes, call.dtypes))
        elif call.name in ("aten::mm", "aten::addmm", "aten::addmm_", "mm.dtype") and any(d == "float" for _, d in big):
            found.append((call.name, call.shapes, call.dtypes))
    return found


def read_write_passes(trace, shape):
    """Our kernels that read and write back an activation-sized array ([N, in] or [N, out], 16-bit)."""
    smallest = shape.tokens * min(shape.in_features, shape.out_features) * 2
    return [(c.name, name) for c in trace.calls for name, role, size in c.buffers if role == "inout" and size >= smallest]


# The MiSS term is written first (y: f @ B on tensor cores; dx: the tile of g, a write-only
# kernel) and the base GEMM accumulates x W^T (dy W) into it: no read-and-write pass over y
# or dx after the GEMM.
STANDARD_FORWARD = ["shard_fold_kernel<8>", "bf16_pieces_kernel", "bf16_pieces_kernel", "mm", "addmm_"]
STANDARD_BACKWARD = ["bf16_pieces_kernel", "mm.dtype", "aten::sum", "bf16_pieces_kernel", "mm.dtype", "aten::sum",
                     "write_rows_kernel<kVec>", "addmm_"]


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_standard_step(p):
    trace = recorded("standard", p)
    assert names(trace, "forward") == STANDARD_FORWARD
    assert names(trace, "backward") == STANDARD_BACKWARD
    assert activation_sized(trace, SHAPE) == []
    assert read_write_passes(trace, SHAPE) == []
    # dropout: one Philox call per 8 columns of x in the fold and again in the tile-add
    philox = {c.name: c.philox_calls for c in trace.calls if c.philox_calls}
    expected = SHAPE.tokens * SHAPE.in_features // 8
    assert philox == ({"shard_fold_kernel<8>": expected, "write_rows_kernel<kVec>": expected} if p else {})


def test_mini_step():
    trace = recorded("mini")
    assert names(trace, "forward") == ["shard_fold_kernel<8>", "aten::mm", "write_rows_kernel<kVec>", "addmm_"]
    # dy folded along out to [N, mini_r] once; g and dB are small float32 GEMMs over it
    assert names(trace, "backward") == ["aten::fill_", "shard_fold_kernel<1>", "aten::mm", "aten::addmm_",
                                        "write_rows_kernel<kVec>", "addmm_"]
    assert activation_sized(trace, SHAPE) == []
    assert read_write_passes(trace, SHAPE) == []


@pytest.mark.parametrize("tokens", [512, 2048])
def test_bat_step(tokens):
    """W' and G built a slab at a time (csrc/ops/bat_ops.cpp slab_lines), whole r blocks each:
    the forward's W' and G of at most x's bytes (G and dB before dx exists), dx's W' of at most
    1/8 of dy's. At in = out = N / 2, the benchmark's ratio, the forward's W' and G are whole
    and dx's W' is in 4 slabs of columns: a GEMM per slab, and the step's peak memory within 5%
    of standard's."""
    shape = gpu_trace.Shape(tokens, 256, 256, 16, 4)
    trace = recorded("bat", shape=shape)
    x_bytes = shape.tokens * shape.in_features * 2
    slabs = {512: (1, 1, 4), 2048: (1, 1, 1)}[tokens]  # (forward W', G, dx's W'): never fewer than one r block
    # W' per slab from one kernel that reads each tile of the bf16 W once and writes it once
    # in bf16, its products on tensor cores (r % 16 == 0), B_k as two bf16 pieces:
    # 2 * r^3 / 2048 m16n8k16 products per tile
    transform = "bat_transform_mma_kernel<kRank>"
    assert names(trace, "forward") == [transform, "aten::mm"] * slabs[0]
    for c in trace.calls:
        if c.name == "aten::mm":  # x or dy against a slab of W' (bf16)
            w_slab = c.shapes[1]
            budget = x_bytes if c.phase == "forward" else x_bytes // 8
            assert w_slab[0] * w_slab[1] * 2 <= max(budget, shape.r * shape.in_features * 2), c
    g_slabs = [c for c in trace.calls if c.name == "mm.dtype"]
    for c in g_slabs:
        cols = c.shapes[1][1]
        assert cols % shape.r == 0 and shape.out_features * cols * 4 <= max(x_bytes, shape.r * shape.out_features * 4)
    assert sum(c.shapes[1][1] for c in g_slabs) == shape.in_features  # every column of G once
    assert len(g_slabs) == slabs[1]
    assert trace.peak_bytes <= 1.05 * recorded("standard", shape=shape).peak_bytes
    grad = ["mm.dtype", "bat_block_grad_mma_kernel<kRank>"]
    assert names(trace, "backward") == grad * slabs[1] + [transform, "aten::mm"] * slabs[2]
    products = shape.out_features * shape.in_features * shape.r // (16 * 8 * 16)  # one piece, whole W
    kernels = [c for c in trace.calls if c.name == transform]
    assert sum(c.fmas for c in kernels) == 0 and sum(c.mmas for c in kernels) == 2 * 2 * products
    assert sum(c.mmas for c in trace.calls if c.name == grad[1]) == 3 * products
    assert activation_sized(trace, shape) == []


def test_cpu_path_fails_the_same_checks():
    """The CPU path makes float32 copies of the activations (its measured choice): the check
    of the CUDA tests finds them."""
    x, weight, dy, gen = gpu_variants._inputs(SHAPE)
    block = torch.randn(SHAPE.r, SHAPE.out_features, generator=gen) * 0.02

    def step():
        y, fold = torch.ops.miss.shard_linear(x, weight, None, block, 0.0, None)
        torch.ops.miss.shard_linear_backward(dy, fold, weight, block, SHAPE.in_features, 0.0, None, None, [True, True])

    trace = gpu_trace.record(step, SHAPE, 1, ("miss::shard_linear", "miss::shard_linear_backward"))
    assert activation_sized(trace, SHAPE) != []


def test_launch_count_does_not_grow_with_tokens():
    """No chunking by CPU-sized temporaries on CUDA: a step at 8x the tokens issues the same."""
    small = recorded("standard")
    large = recorded("standard", shape=gpu_trace.Shape(8 * SHAPE.tokens, 256, 256, 16, 4))
    assert names(small) == names(large)


def test_bat_unmerge_is_one_inverse_one_wait_one_kernel():
    """A bf16 bat unmerge on the CUDA path: the inverses and condition numbers of every I + B_k
    in one launch, one copy of the condition numbers to the host (which must see them before
    it touches W), then the tensor-core kernel; no ATen linear algebra (on a GPU, a dozen
    launches and cuSOLVER/MAGMA loaded at the first call). Its barriers grow with r, which the
    cost model prices."""
    shape = gpu_trace.Shape(tokens=64, in_features=128, out_features=128, r=16, mini_r=4)
    weight = torch.randn(shape.out_features, shape.in_features).bfloat16()
    block = torch.randn(shape.out_features // shape.r, shape.r, shape.r) * 0.02
    trace = gpu_trace.record(lambda: EMU.unmerge_(weight, block), shape, 1, ("miss_emulated_cuda::unmerge_",),
                             lambda: EMU.launch_log(clear=True))
    assert names(trace) == ["bat_inverse_kernel<scalar_t>", "copy_to_host", "bat_untransform_mma_kernel<kRank>"]
    assert trace.calls[0].barriers == 2 * shape.r + 4


@pytest.mark.parametrize("tokens", [1, 8], ids=["decode-1-token", "training-8-tokens"])
def test_bat_weight_slabs_are_few_at_small_tokens(tokens):
    """The slab budgets follow x and dy, so at few tokens (decoding one token with an unmerged
    adapter, a short micro-batch) they alone would cut W' and G into single r blocks: out / r
    launches of each, where the GEMMs are tiny and the launches are the cost. However few the
    tokens, a temporary takes at most 4 slabs (a quarter of W', or of G, is small beside the
    weight the layer holds)."""
    shape = gpu_trace.Shape(tokens, 256, 320, 16, 4)  # out / r = 20 blocks, not a multiple of 4
    trace = recorded("bat", shape=shape)
    forward, backward = names(trace, "forward"), names(trace, "backward")
    transform = "bat_transform_mma_kernel<kRank>"
    assert forward == [transform, "aten::mm"] * 4
    assert 1 <= backward.count("mm.dtype") <= 4
    assert 1 <= backward.count(transform) <= 4
    g_columns = sum(c.shapes[1][1] for c in trace.calls if c.name == "mm.dtype")
    assert g_columns == shape.in_features  # every column of G once
    w_rows = sum(c.shapes[1][1] for c in trace.calls if c.name == "aten::mm" and c.phase == "forward")
    assert w_rows == shape.out_features  # every row of W' once
