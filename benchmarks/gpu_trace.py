"""What one adapted layer's forward+backward issues on a GPU, recorded without a GPU.

- miss_ext: its ops run on the emulated CUDA device (torch.ops.miss_emulated_cuda, see
  docs/cuda-emulator.md), which takes every decision the CUDA path takes. torch.profiler
  records each ATen call of the op bodies (with shapes and dtypes), each kernel launch (the
  range `miss::cuda_kernel::<name>`, matched with the emulator's launch log, which lists the
  buffers the launch was given and their sizes) and each cuBLAS call the CPU stands in for
  (`miss::cuda_stand_in::<call>`).
- PEFT's MiSS and LoRA and the frozen nn.Linear: pure PyTorch, so their CPU trace is the
  sequence of ATen calls they would issue on CUDA (forward and autograd backward).

Recording runs at a probe shape: the target shape divided by `scale` (tokens, in, out, r and
mini_r alike). Every decision of the CUDA path is size-independent at fixed ratios (no
CPU-sized chunks on CUDA; bat's G slabs are a fixed fraction of x), so the same calls are
issued at the target shape, with each dimension that came from N, in, out, r or mini_r
multiplied by `scale` (dimensions such as out / r do not change), and every allocation,
being a product of two such dimensions, multiplied by scale^2; the multiply-adds a kernel
declares (bat's tile products, out * in * r) by scale^3.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

KERNEL, STAND_IN = "miss::cuda_kernel::", "miss::cuda_stand_in::"

# How a kernel's barriers per block grow from the probe to the target shape: as scale^e. The
# inverse of I + B_k takes 2r + 4 (e = 1). The others do not grow (e = 0): the fold's blocks
# take a row or two, the tile kernels' a share of a fixed number of tiles (out/r x in/r), and
# their barriers are far below their memory time anyway.
BARRIER_GROWTH = {"bat_inverse_kernel": 1}

# Kernels whose grid does not grow from the probe to the target shape: bat's are a share of a
# fixed number of tiles (out/r x in/r), one block per row-block (out/r) or per matrix. The
# others' grids follow the elements they cover (N x in and the like): scale^2, which at the
# target is far above the SM count whatever the cap their launcher puts on it.
FIXED_GRID_PREFIX = "bat_"


@dataclasses.dataclass
class Call:
    """One call that becomes GPU work: an ATen op, a stand-in for a cuBLAS call, or a kernel."""
    name: str
    shapes: List[Tuple[int, ...]]  # input shapes at the target shape ([] for a kernel)
    dtypes: List[str]
    buffers: List[Tuple[str, str, int]] = dataclasses.field(default_factory=list)  # kernels: (name, role, bytes)
    phase: str = ""  # "forward" or "backward"
    philox_calls: int = 0  # kernels: Philox4x32-10 evaluations (dropout), at the target shape
    fmas: int = 0  # kernels: float32 multiply-adds the kernel declared, at the target shape
    mmas: int = 0  # kernels: warp-wide m16n8k16 bf16 tensor-core products, at the target shape
    barriers: int = 0  # kernels: the most __syncthreads one block passes, at the target shape
    blocks: int = 0  # kernels: blocks in the grid, at the target shape


@dataclasses.dataclass
class Trace:
    calls: List[Call]
    host_calls: int  # every ATen call made on the host, views included
    python_calls: int  # calls made from Python (op wrappers, autograd nodes)
    peak_bytes: int  # peak of what the step allocates, at the target shape


@dataclasses.dataclass(frozen=True)
class Shape:
    tokens: int
    in_features: int
    out_features: int
    r: int
    mini_r: int

    def divided(self, scale: int) -> "Shape":
        fields = dataclasses.astuple(self)
        if any(v % scale for v in fields):
            raise ValueError(f"every dimension of {self} must be divisible by scale={scale}")
        return Shape(*(v // scale for v in fields))


# Calls that move no data: views, metadata, allocation. Everything else must have a cost rule
# (gpu_cost_model.py) or be a composite whose children are costed.
FREE = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::t", "aten::transpose", "aten::narrow",
    "aten::slice", "aten::as_strided", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::expand",
    "aten::permute", "aten::resolve_conj", "aten::resolve_neg", "aten::alias", "aten::detach", "aten::empty",
    "aten::empty_like", "aten::empty_strided", "aten::lift_fresh", "aten::_unsafe_view", "aten::unbind",
    "aten::split", "aten::chunk", "aten::view_as", "aten::numpy_T", "detach", "aten::result_type",
    "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::set_", "aten::unflatten",
}


def _events(prof):
    """Kineto events of the calling thread: (name, start, end, shapes, dtypes), by start time."""
    events = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        events.append((e.name(), e.start_ns(), e.start_ns() + e.duration_ns(), [tuple(s) for s in e.shapes()],
                       list(e.dtypes())))
    events.sort(key=lambda e: (e[1], -e[2]))
    return events


# ATen GEMMs, cuBLAS calls on a GPU: like a stand-in, only what outlives one counts toward the
# peak. On the CPU a bf16 GEMM makes float32 copies of its operands (a weight-sized temporary
# for a Linear); cuBLAS works in the workspace torch allocates once per handle.
CUBLAS_CALLS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_"}


def _memory_peak(prof, stand_in_ranges) -> int:
    """Peak of live bytes the step allocated. Inside a stand-in (or an ATen GEMM) only what
    outlives it counts: its float32 copies are the CPU's, cuBLAS makes none."""
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    inside = [any(a <= t <= b for a, b in stand_in_ranges) for t, _ in records]
    live = peak = 0
    pending = {}
    for (t, delta), in_stand_in in zip(records, inside):
        if in_stand_in:
            # pair allocations and frees inside a stand-in by size; unpaired allocations are
            # its outputs
            if delta > 0:
                pending[delta] = pending.get(delta, 0) + 1
            elif pending.get(-delta):
                pending[-delta] -= 1
                continue
            else:
                live += delta
                continue
            continue
        for size, count in list(pending.items()):  # the stand-in has ended: its outputs stay
            live += size * count
            peak = max(peak, live)
        pending.clear()
        live += delta
        peak = max(peak, live)
    return peak


def _is_autograd_node(name: str) -> bool:
    """A backward node (MmBackward0, ...): its cost is that of the calls it makes."""
    return name.rstrip("0123456789").endswith("Backward") or name.startswith("torch::autograd::")


def dimension_map(probe: Shape, scale: int, variant: str = "") -> dict:
    """Probe dimension -> its factor to the target. Dimensions that scale: N, in, out, r and the
    2r and 3r of the bf16 pieces (csrc/ops/gemm.h); for variant "mini" also mini_r (out /
    mini_r does not); for "bat" bat's slabs (csrc/ops/bat_ops.cpp slab_lines, in whole r
    blocks: the forward's W' in N rows and G in N in / (2 out) columns, x's bf16 bytes, and
    dx's W' in N / 8 columns, 1/8 of dy's) and its partial dB sums (out / r x groups x r x r
    floats, the groups a fixed number). Dimensions that do not: out / r, in / r, the 3 pieces.
    A probe where a dimension of one kind equals one of the other would be read wrongly:
    refused."""
    if scale == 1:
        return {}
    scaling = {probe.tokens, probe.in_features, probe.out_features, probe.r, 2 * probe.r, 3 * probe.r}
    fixed = {probe.out_features // probe.r, probe.in_features // probe.r, 3, 1}
    if variant == "mini":
        scaling.add(probe.mini_r)
        fixed.add(probe.out_features // probe.mini_r)
    if variant == "bat":
        def whole_blocks(lines):
            return max(probe.r, lines // probe.r * probe.r)
        n_in_per_out = probe.tokens * probe.in_features // probe.out_features
        scaling |= {whole_blocks(probe.tokens), whole_blocks(n_in_per_out // 2), whole_blocks(probe.tokens // 8)}
    clash = scaling & fixed
    if clash:
        raise ValueError(f"probe {probe} (scale {scale}) makes dimensions {sorted(clash)} ambiguous: choose another scale")
    return {d: scale for d in scaling}


def record(step: Callable[[], None], probe: Shape, scale: int, roots: Optional[Tuple[str, ...]] = None,
           launch_log: Optional[Callable[[], List[str]]] = None, variant: str = "") -> Trace:
    """Runs `step` under the profiler and returns what it issues, scaled to the target shape.
    `roots`: names of the ops whose insides are recorded (our ops); None: every top-level call."""
    if launch_log is not None:
        launch_log()  # clear
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True) as prof:
        step()
    launches = [line.split() for line in launch_log()] if launch_log is not None else []
    events = _events(prof)
    dims = dimension_map(probe, scale, variant)

    def scaled(shape):
        return tuple(d * dims.get(d, 1) for d in shape)

    calls, host_calls, python_calls, stand_ins = [], 0, 0, []
    stack: List[Tuple[str, int, Optional[int]]] = []  # (name, end, index in calls) of enclosing events
    phase = "forward"
    skip_until = -1
    for name, start, end, shapes, dtypes in events:
        while stack and stack[-1][1] < start:
            stack.pop()
        if start < skip_until or name == "[memory]":
            continue
        if name.startswith("autograd::engine::evaluate_function") or (roots and name in roots and "backward" in name):
            phase = "backward"
        inside_root = roots is None or name in roots or any(n in roots for n, _, _ in stack)
        top_level = all(n.startswith(("autograd::engine", "ProfilerStep")) for n, _, _ in stack)
        index = None
        if inside_root and not name.startswith("autograd::"):
            if roots is not None and name in roots:
                python_calls += 1
            else:
                python_calls += top_level
                host_calls += 1
                if name.startswith(KERNEL):
                    line = launches.pop(0)
                    assert line[0] == name[len(KERNEL):], (line, name)
                    buffers = [(f.split(":")[0], f.split(":")[1], int(f.split(":")[2]) * scale * scale)
                               for f in line[3:] if ":" in f]
                    philox = sum(int(f.split("=")[1]) for f in line[3:] if f.startswith("philox="))
                    # multiply-adds of a tile product grow with out * in * r: three scaled dims
                    fmas = sum(int(f.split("=")[1]) for f in line[3:] if f.startswith("fma="))
                    mmas = sum(int(f.split("=")[1]) for f in line[3:] if f.startswith("mma="))
                    barriers = sum(int(f.split("=")[1]) for f in line[3:] if f.startswith("barriers="))
                    barriers *= scale ** BARRIER_GROWTH.get(line[0].split("<")[0], 0)
                    grid = [int(v) for v in line[1][len("grid=("):-1].split(",")]
                    blocks = grid[0] * grid[1] * grid[2]
                    if not line[0].startswith(FIXED_GRID_PREFIX):
                        blocks *= scale * scale
                    index = len(calls)
                    calls.append(Call(name[len(KERNEL):], [], [], buffers, phase, philox * scale * scale,
                                      fmas * scale ** 3, mmas * scale ** 3, barriers, blocks))
                    skip_until = end
                elif name not in FREE and name not in PASS_THROUGH and not _is_autograd_node(name):
                    index = len(calls)
                    calls.append(Call(name[len(STAND_IN):] if name.startswith(STAND_IN) else name,
                                      [scaled(s) for s in shapes], dtypes, [], phase))
                    skip_until = end  # priced as one GPU call, whatever the CPU does inside
                    if name.startswith(STAND_IN) or name in CUBLAS_CALLS:
                        stand_ins.append((start, end))
        stack.append((name, end, index))
    assert not launches, f"launches without a profiler range: {launches}"
    peak = _memory_peak(prof, stand_ins) * scale * scale
    return Trace(calls, host_calls, python_calls, peak)


# Composite ATen ops: not GPU work themselves; the calls they make are recorded (a to() of a
# tensor that has the dtype already makes none). Every other op is priced as one GPU call,
# and what its CPU implementation does inside is not recorded.
PASS_THROUGH = {
    "aten::linear", "aten::matmul", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone",
    "aten::dropout", "aten::repeat", "aten::pad", "aten::constant_pad_nd", "aten::sum_to_size", "aten::flatten",
    "aten::einsum", "aten::zeros", "aten::ones", "aten::full", "aten::zeros_like", "aten::ones_like",
    "aten::new_zeros", "aten::new_empty", "aten::new_empty_strided", "aten::reshape_as", "aten::type_as",
    "aten::mm.dtype", "torch::autograd::AccumulateGrad", "aten::numpy_T", "aten::linalg_inv_ex",
}
