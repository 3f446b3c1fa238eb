"""The CUDA path of every op, run in CI without a GPU: torch.ops.miss_emulated_cuda runs the
op bodies with every decision taken as for CUDA and the CUDA kernels (the source nvcc
compiles) under the emulator of csrc/emulator/, which reports races, out-of-bounds accesses
and reads of never-written memory. Each result is compared with the CPU kernels and the
float64 reference (the suite's 2x rule, conftest.assert_close_to_oracle); dropout masks bit
for bit. The planted bugs prove that each check of the emulator can fail.

Needs a build with MISS_WITH_EMULATOR=1 (scripts/setup_env.sh and CI set it).
"""

from __future__ import annotations

import pytest
import torch

import miss_ext  # noqa: F401  (loads the op library)
from miss_ext import reference

from conftest import assert_close_to_oracle, bat_block, blocks_for_the_inverse, generator, make_x, rand, ref_shard_tile_add, seed_tensor

if not hasattr(torch.ops, "miss_emulated_cuda") or not hasattr(torch.ops.miss_emulated_cuda, "shard_fold"):
    pytest.skip("miss_ext was built without the CUDA emulator (MISS_WITH_EMULATOR=1)", allow_module_level=True)

EMU = torch.ops.miss_emulated_cuda
CPU = torch.ops.miss
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPE_IDS = ("fp32", "fp16", "bf16", "fp64")
RANKS = (1, 3, 32, 64, 127, 128, 129, 192, 255, 256, 300)
P = 0.3


@pytest.fixture(autouse=True, params=[0, 1], ids=["schedule0", "schedule1"])
def emulator_schedule(request):
    """Two thread schedules per test; 2 SMs, so grid-stride loops take several turns."""
    EMU.configure(seed=request.param, detect_races=True, sm_count=2, preempt=0.125)
    yield
    EMU.configure()


def check(emulated, cpu, oracle, what):
    """The emulated CUDA result within twice the CPU kernels' error of the float64 oracle."""
    assert emulated.dtype == cpu.dtype and emulated.shape == cpu.shape, what
    assert_close_to_oracle(emulated, oracle, cpu, what=what)


# ---------------------------------------------------------------------------------------
# The emulator's own checks can fail


@pytest.mark.parametrize("kind,message", [
    ("write_write", r"race: thread \d+ of block 0 writes 'out'\[0\], which thread \d+ of block 0 wrote"),
    ("across_blocks", r"race: thread \d+ of block \d writes 'out'\[\d+\], which thread \d+ of block \d wrote"),
    # Depending on the schedule the neighbour's slot is found unwritten or written unordered.
    ("missing_barrier", r"shared 'staged'\[\d+\](, which nothing has written|.* with no barrier between them)"),
    ("out_of_bounds", r"out-of-bounds write of 4 bytes"),
    ("unwritten_shared", r"reads shared 'staged'\[0\], which nothing has written"),
    ("partial_output", r"leaves 'out'\[256\] of its output unwritten"),
    ("divergent_barrier", r"barrier divergence in block 0: 128 threads wait"),
    ("misaligned", r"misaligned 16-byte vector access"),
    ("mma_divergence", r"warp divergence in block 0: 32 lanes wait at mma.sync"),
    ("mma_partial_warp", r"mma.sync in a warp of 16 threads"),
])
def test_planted_bug_is_reported(kind, message):
    with pytest.raises(RuntimeError, match=message):
        EMU.planted_bug(torch.zeros(512), kind)


def test_launch_log_names_every_kernel():
    EMU.launch_log(clear=True)
    x = rand((3, 10))
    EMU.shard_linear(x, rand((8, 10)), None, rand((4, 2)), 0.0, None)
    log = EMU.launch_log(clear=True)
    assert [line.split()[0] for line in log] == ["shard_fold_kernel<1>", "update_rows_kernel<kVec>"]
    assert "block=(256,1,1)" in log[0]


# ---------------------------------------------------------------------------------------
# Standard / mini


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("p", [0.0, P], ids=["no_dropout", "dropout"])
def test_shard_fold(r, dtype, p):
    """Every r around the block size (the fold kernel's lanes and groups) and in % r != 0."""
    in_features = 2 * r + 1
    x = make_x((3,), in_features, dtype=dtype, gen=generator(r))
    seed = seed_tensor(r) if p else None
    emulated = EMU.shard_fold(x, r, p, seed)
    oracle = reference.shard_fold(x.double(), r, p, seed)
    check(emulated, CPU.shard_fold(x, r, p, seed), oracle, f"fold r={r}")


@pytest.mark.parametrize("layout,lead", [("transposed", (5,)), ("transposed3d", (2, 3)), ("step2", (4,)),
                                         ("col_offset", (4,)), ("row_offset", (3, 2))])
def test_shard_fold_strided_x(layout, lead):
    x = make_x(lead, 70, layout=layout, gen=generator(3))
    check(EMU.shard_fold(x, 32, P, seed_tensor(4)), CPU.shard_fold(x, 32, P, seed_tensor(4)),
          reference.shard_fold(x.double(), 32, P, seed_tensor(4)), layout)


def test_shard_fold_expanded_x():
    x = rand((1, 40), gen=generator(5)).expand(6, 40)
    check(EMU.shard_fold(x, 7, P, seed_tensor(6)), CPU.shard_fold(x, 7, P, seed_tensor(6)),
          reference.shard_fold(x.double(), 7, P, seed_tensor(6)), "expanded")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [0, 1, 5])
def test_dropout_mask_bit_identical(rows, dtype):
    """tile-add of g = 1 into zeros is the scaled mask itself: the same bits on both paths."""
    g = torch.ones(rows, 8, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    zeros = torch.zeros(rows, 37, dtype=dtype)
    emulated = EMU.shard_tile_add(zeros, g, P, seed_tensor(7))
    assert torch.equal(emulated, CPU.shard_tile_add(zeros, g, P, seed_tensor(7)))
    if rows:
        assert 0 < (emulated == 0).sum() < emulated.numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("r,m", [(3, 12), (3, 4), (1, 1), (32, 12), (129, 6)], ids=["std", "mini", "r1-m1", "r32", "r129-mini"])
@pytest.mark.parametrize("p", [0.0, P], ids=["no_dropout", "dropout"])
def test_shard_linear_and_backward(r, m, dtype, p):
    in_features, out_features, gen = max(2 * r + 1, 10), 12, generator(r * 13 + m)
    x = make_x((2, 3), in_features, dtype=dtype, gen=gen)
    weight, bias = rand((out_features, in_features), dtype=dtype, gen=gen), rand((out_features,), dtype=dtype, gen=gen)
    block = rand((r, m), gen=gen, scale=0.5)
    seed = seed_tensor(8) if p else None
    y, fold = EMU.shard_linear(x, weight, bias, block, p, seed)
    y_cpu, fold_cpu = CPU.shard_linear(x, weight, bias, block, p, seed)
    check(y, y_cpu, reference.shard_linear(x.double(), weight.double(), bias.double(), block.double(), p, seed), "y")
    check(fold, fold_cpu, reference.shard_fold(x.double(), r, p, seed), "fold")
    grad_out, grad_fold = rand(y.shape, dtype=dtype, gen=gen), rand(fold.shape, gen=gen)
    for w in (weight, None):
        args = (grad_out, fold_cpu, w, block, in_features, p, seed, grad_fold, [True, True])
        emulated, cpu = EMU.shard_linear_backward(*args), CPU.shard_linear_backward(*args)
        oracle = CPU.shard_linear_backward(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                             for a in args])
        for e, c, o, name in zip(emulated, cpu, oracle, ("grad_x", "grad_block")):
            check(e, c, o, f"{name} weight={'yes' if w is not None else 'no'}")


@pytest.mark.parametrize("mini_r", RANKS)
def test_mini_folds_dy_along_out(mini_r):
    """mini_r takes the place of r in the fold of dy along out (and in the out-tiled add)."""
    gen = generator(mini_r)
    out_features = 2 * mini_r
    x, weight, block = make_x((3,), 10, gen=gen), rand((out_features, 10), gen=gen), rand((3, mini_r), gen=gen)
    y, fold = EMU.shard_linear(x, weight, None, block, 0.0, None)
    y_cpu, _ = CPU.shard_linear(x, weight, None, block, 0.0, None)
    check(y, y_cpu, reference.shard_linear(x.double(), weight.double(), None, block.double()), "y")
    grad_out = rand(y.shape, gen=gen)
    args = (grad_out, fold, None, block, 10, 0.0, None, None, [True, True])
    oracle = CPU.shard_linear_backward(grad_out.double(), fold.double(), None, block.double(), 10, 0.0, None, None,
                                       [True, True])
    for e, c, o in zip(EMU.shard_linear_backward(*args), CPU.shard_linear_backward(*args), oracle):
        check(e, c, o, f"backward mini_r={mini_r}")


def test_every_kernel_runs_under_the_emulator():
    """The tests of this file launch every CUDA kernel of csrc/cuda/, the vector and the
    scalar form of the elementwise one included."""
    import pathlib
    import re

    sources = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    declared = r"MISS_GLOBAL void (?:MISS_LAUNCH_BOUNDS\(\w+ \* \w+\) )?(\w+)"
    kernels = {name for f in sources.glob("*.cuh") for name in re.findall(declared, f.read_text())}
    EMU.launch_log(clear=True)
    x, weight, gen = rand((3, 12)), rand((8, 12)), generator(15)
    y, fold = EMU.shard_linear(x, weight, None, rand((3, 4), gen=gen), P, seed_tensor(1))
    EMU.shard_linear_backward(rand(y.shape, gen=gen), fold, None, rand((3, 4), gen=gen), 12, P, seed_tensor(1), None,
                              [True, True])
    EMU.merge_(weight, rand((3, 8), gen=gen), True)
    EMU.merge_(torch.zeros(8 * 12 + 1)[1:].view(8, 12), rand((3, 8), gen=gen), False)  # unaligned: scalar form
    EMU.shard_fold(rand((3, 20), gen=gen), 8, P, seed_tensor(1))  # r % 8 == 0: runs of 8 positions
    # bf16 standard: the thin GEMMs on bf16 pieces (bf16_pieces_kernel)
    x16, block = x.bfloat16(), rand((3, 8), gen=gen)
    y16, fold16 = EMU.shard_linear(x16, weight.bfloat16(), None, block, 0.0, None)
    EMU.shard_linear_backward(rand(y16.shape, dtype=torch.bfloat16, gen=gen), fold16, weight.bfloat16(), block, 12,
                              0.0, None, None, [True, True])
    EMU.bat_weight(weight.bfloat16(), rand((2, 4, 4), gen=gen))  # bf16 bat, r % 16 != 0: bat_transform_kernel
    w16 = rand((32, 48), dtype=torch.bfloat16, gen=gen)
    EMU.bat_weight(w16, rand((2, 16, 16), gen=gen))  # r 16: on tensor cores
    EMU.bat_block_grad(rand((32, 48), gen=gen), w16, 16)  # dB on tensor cores
    EMU.unmerge_(w16, bat_block(32, 16, gen=gen))  # unmerge on tensor cores
    launched = {line.split()[0] for line in EMU.launch_log(clear=True)}
    launched_names = {name.split("<")[0] for name in launched}
    assert launched_names == kernels, f"not launched: {kernels - launched_names}"
    assert {"shard_merge_kernel<kVec>", "shard_merge_kernel<1>"} <= launched  # 16-byte and scalar forms
    assert {"shard_fold_kernel<1>", "shard_fold_kernel<8>"} <= launched  # per element, per 8-column run


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_shard_delta_add_and_tile_add(dtype):
    gen = generator(9)
    x, y, block = make_x((4,), 23, dtype=dtype, gen=gen), rand((4, 12), dtype=dtype, gen=gen), rand((5, 3), gen=gen)
    out, fold = EMU.shard_delta_add(y, x, block, P, seed_tensor(10))
    out_cpu, _ = CPU.shard_delta_add(y, x, block, P, seed_tensor(10))
    oracle = y.double() + reference.shard_delta(x.double(), block.double(), 12, P, seed_tensor(10))
    check(out, out_cpu, oracle, "delta_add")
    grad_x, g = rand((4, 23), dtype=dtype, gen=gen), rand((4, 5), gen=gen)
    tiled = EMU.shard_tile_add(grad_x, g, P, seed_tensor(11))
    check(tiled, CPU.shard_tile_add(grad_x, g, P, seed_tensor(11)),
          ref_shard_tile_add(grad_x.double(), g.double(), P, seed_tensor(11)), "tile_add")


def test_zero_rows():
    x, weight = torch.empty(0, 10), rand((12, 10))
    y, fold = EMU.shard_linear(x, weight, None, rand((4, 12)), P, seed_tensor(12))
    assert y.shape == (0, 12) and fold.shape == (0, 4)


# ---------------------------------------------------------------------------------------
# Merge (vector and scalar paths) and BAT


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("aligned", [True, False], ids=["vector_path", "scalar_path"])
@pytest.mark.parametrize("block_shape", [(3, 8), (3, 4), (2, 4, 4), (2, 16, 16)],
                         ids=["standard", "mini", "bat", "bat_r16"])  # bat r 16: bf16 W on tensor cores
def test_merge_unmerge(block_shape, aligned, dtype):
    gen = generator(13)
    rows, cols = (32, 48) if block_shape[-1] == 16 else (8, 16)
    storage = rand((rows * cols + 1,), dtype=dtype, gen=gen)
    weight = (storage[:-1] if aligned else storage[1:]).view(rows, cols)  # a 2- or 4-byte offset: no 16-byte loads
    block = bat_block(rows, block_shape[-1], gen=gen) if len(block_shape) == 3 else rand(block_shape, gen=gen, scale=0.5)
    emulated, cpu = weight.clone(), weight.clone()
    if not aligned:
        emulated = storage.clone()[1:].view(rows, cols)
    EMU.merge_(emulated, block, False)
    CPU.merge_(cpu, block, False)
    if len(block_shape) == 3:
        oracle = reference.bat_weight(weight.double(), block.double())
    else:
        oracle = weight.double() + reference.delta_weight(block.double(), cols, rows)
    check(emulated, cpu, oracle, "merged")
    EMU.unmerge_(emulated, block)
    CPU.unmerge_(cpu, block)
    check(emulated, cpu, weight.double(), "unmerged")


def test_safe_merge_refuses_non_finite():
    weight = rand((8, 16))
    before = weight.clone()
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        EMU.merge_(weight, torch.full((3, 8), float("inf")), True)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
# 64: the largest r of the transform kernels; 16, 32, 64 in bf16: bat_transform_mma_kernel
@pytest.mark.parametrize("r", [1, 4, 8, 16, 32, 64])
def test_bat_ops(r, dtype):
    gen = generator(14 + r)
    out_features, in_features = 2 * r * 2, 3 * r
    x, weight = make_x((2, 3), in_features, dtype=dtype, gen=gen), rand((out_features, in_features), dtype=dtype, gen=gen)
    block = bat_block(out_features, r, gen=gen)
    w64, b64 = weight.double(), block.double()
    check(EMU.bat_weight(weight, block), CPU.bat_weight(weight, block), reference.bat_weight(w64, b64), "W'")
    check(EMU.bat_linear(x, weight, None, block), CPU.bat_linear(x, weight, None, block),
          reference.bat_linear(x.double(), w64, None, b64), "bat_linear")
    grad_out = rand((2, 3, out_features), dtype=dtype, gen=gen)
    emulated = EMU.bat_linear_backward(grad_out, x, weight, block, [True, True, True])
    cpu = CPU.bat_linear_backward(grad_out, x, weight, block, [True, True, True])
    oracle = CPU.bat_linear_backward(grad_out.double(), x.double(), w64, b64, [True, True, True])
    for e, c, o, name in zip(emulated, cpu, oracle, ("grad_x", "grad_weight", "grad_block")):
        check(e, c, o, name)


def test_mma_matches_the_isa_fragment_layout():
    """The emulated mma.sync against a @ b, through a probe kernel that places every element
    where the PTX ISA says (not where the emulator or the kernels compute it)."""
    gen = generator(41)
    a, b = rand((16, 16), dtype=torch.bfloat16, gen=gen), rand((16, 8), dtype=torch.bfloat16, gen=gen)
    torch.testing.assert_close(EMU.mma_probe(a, b), (a.double() @ b.double()).float(), rtol=1e-6, atol=1e-6)
    # a transposed or permuted layout would be found: the product is not symmetric under them
    assert not torch.allclose(EMU.mma_probe(a.t().contiguous(), b), (a.double() @ b.double()).float(), atol=1e-3)


@pytest.mark.parametrize("r", [16, 32, 48, 64])
def test_bat_transform_mma_kernel_stages_b_once_per_row_block(r):
    """More tiles than blocks (sm_count 2 gives 16 blocks): each block takes a run of
    consecutive tiles that crosses row-blocks, so it restages B_k between tiles; in place
    too (an in-place merge). Races between the stages are the detector's to find."""
    gen = generator(43 + r)
    out_features, in_features = 40 * r, 3 * r  # 120 tiles: runs of 8, crossing row-blocks of 3
    weight, block = rand((out_features, in_features), dtype=torch.bfloat16, gen=gen), bat_block(out_features, r, gen=gen)
    EMU.launch_log(clear=True)
    emulated = EMU.bat_weight(weight, block)
    line = EMU.launch_log(clear=True)[0]
    assert line.startswith(f"bat_transform_mma_kernel<kRank> grid=(16,1,1) block=({2 * r},1,1)"), line
    assert f"mma={out_features * in_features * r // 1024}" in line  # 2 pieces x r^3 / (16 * 8 * 16) per tile
    check(emulated, CPU.bat_weight(weight, block), reference.bat_weight(weight.double(), block.double()), "W'")
    merged = weight.clone()
    EMU.merge_(merged, block, False)
    assert torch.equal(merged, emulated)


@pytest.mark.parametrize("r", [16, 64])
def test_bat_block_grad_on_tensor_cores_sums_every_slab(r):
    """dB of a bf16 W from G in column slabs (a slab of r columns at these sizes: 3 slabs,
    the later ones added into what the first wrote), against the CPU and float64."""
    gen = generator(47 + r)
    out_features, in_features = 2 * r, 3 * r
    x, weight = make_x((5,), in_features, dtype=torch.bfloat16, gen=gen), rand((out_features, in_features),
                                                                            dtype=torch.bfloat16, gen=gen)
    block, grad_out = bat_block(out_features, r, gen=gen), rand((5, out_features), dtype=torch.bfloat16, gen=gen)
    EMU.launch_log(clear=True)
    emulated = EMU.bat_linear_backward(grad_out, x, weight, block, [False, False, True])[2]
    launched = [line.split()[0] for line in EMU.launch_log(clear=True)]
    assert launched.count("bat_block_grad_mma_kernel<kRank>") == 3
    cpu = CPU.bat_linear_backward(grad_out, x, weight, block, [False, False, True])[2]
    oracle = CPU.bat_linear_backward(grad_out.double(), x.double(), weight.double(), block.double(),
                                     [False, False, True])[2]
    check(emulated, cpu, oracle, "grad_block")


def test_bat_block_grad_splits_row_blocks_into_groups_of_tiles():
    """Where out / r row-blocks would leave SMs idle, each row-block's tiles are split into
    groups (a block per row-block and group) whose partial dB are summed after: at 132 SMs
    (an H100's) 32 row-blocks x 8 groups of 8 tiles. Within the float64 oracle's 2x rule of
    the one-group result, and the same bits every run."""
    gen = generator(53)
    r, out_features, in_features = 16, 512, 1024
    weight = rand((out_features, in_features), dtype=torch.bfloat16, gen=gen)
    grad_weight = rand((out_features, in_features), gen=gen)
    oracle = reference.bat_block_grad(grad_weight.double(), weight.double(), r)
    EMU.launch_log(clear=True)
    one_group = EMU.bat_block_grad(grad_weight, weight, r)  # 2 SMs: the row-blocks suffice
    assert [line.split()[1] for line in EMU.launch_log(clear=True)] == ["grid=(32,1,1)"]
    EMU.configure(seed=0, detect_races=True, sm_count=132, preempt=0.125)
    grouped = EMU.bat_block_grad(grad_weight, weight, r)
    assert [line.split()[1] for line in EMU.launch_log(clear=True)] == ["grid=(32,8,1)"]
    check(grouped, one_group, oracle, "grad_block in groups")
    assert torch.equal(EMU.bat_block_grad(grad_weight, weight, r), grouped)


def test_bat_block_grad_groups_add_into_every_slab():
    """G in 4 column slabs of x's bytes (20, 20, 20 and 4 tiles): the first three in 2 groups
    each, whose sums the later slabs add into dB, the last in one group that accumulates."""
    gen = generator(59)
    r, out_features, in_features = 16, 32, 1024
    x = make_x((20,), in_features, dtype=torch.bfloat16, gen=gen)
    weight = rand((out_features, in_features), dtype=torch.bfloat16, gen=gen)
    block, grad_out = bat_block(out_features, r, gen=gen), rand((20, out_features), dtype=torch.bfloat16, gen=gen)
    EMU.launch_log(clear=True)
    emulated = EMU.bat_linear_backward(grad_out, x, weight, block, [False, False, True])[2]
    grids = [line.split()[1] for line in EMU.launch_log(clear=True) if line.startswith("bat_block_grad")]
    assert grids == ["grid=(2,2,1)"] * 3 + ["grid=(2,1,1)"]
    cpu = CPU.bat_linear_backward(grad_out, x, weight, block, [False, False, True])[2]
    oracle = CPU.bat_linear_backward(grad_out.double(), x.double(), weight.double(), block.double(),
                                     [False, False, True])[2]
    check(emulated, cpu, oracle, "grad_block")


@pytest.mark.parametrize("r", [16, 64])
def test_bat_unmerge_on_tensor_cores_restores_the_weight(r):
    """Unmerge of a bf16 W in place (at r 16, runs of tiles per block across row-blocks, as in
    the transform) returns W within the CPU's float64 path's error, and refuses what that
    refuses. The inverses come from one launch of bat_inverse_kernel."""
    gen = generator(53 + r)
    out_features, in_features = (40 if r == 16 else 2) * r, 3 * r  # r 64: two matrices (the emulator is slow)
    weight, block = rand((out_features, in_features), dtype=torch.bfloat16, gen=gen), bat_block(out_features, r, gen=gen)
    merged = CPU.bat_weight(weight, block)
    emulated, cpu = merged.clone(), merged.clone()
    EMU.launch_log(clear=True)
    EMU.unmerge_(emulated, block)
    assert [line.split()[0] for line in EMU.launch_log(clear=True)] == ["bat_inverse_kernel<scalar_t>",
                                                                     "bat_untransform_mma_kernel<kRank>"]
    CPU.unmerge_(cpu, block)
    check(emulated, cpu, weight.double(), "unmerged")
    singular = block.clone()
    singular[1] = -torch.eye(r)  # I + B_1 = 0
    before = merged.clone()
    with pytest.raises(RuntimeError, match=r"I \+ block\[1\] is singular"):
        EMU.unmerge_(merged, singular)
    assert torch.equal(merged, before)


@pytest.mark.parametrize("r,dtype", [(r, dtype) for r in (4, 12, 16) for dtype in (torch.float32, torch.bfloat16,
                                                                                 torch.float64)]
                         + [(32, torch.bfloat16)],  # 2 rows per thread (the emulator takes ~20 s)
                         ids=lambda v: str(v).replace("torch.", "") if not isinstance(v, int) else f"r{v}")
def test_bat_inverse_kernel_matches_the_cpu_inverse(r, dtype):
    """The CUDA path's inverse of I + B_k (Gauss-Jordan with row pivoting, bat_inverse_kernel,
    under the race detector) against LAPACK's on the CPU: the unmerged weight agrees with the
    CPU's within twice its error of the float64 oracle (bf16 W on tensor cores at r % 16 == 0,
    else the float64 GEMMs), its barriers per block are 2r + 4, and the refusals are the CPU's
    (singular; ill-conditioned, with the same condition number in the message)."""
    gen = generator(61 + r)
    block = blocks_for_the_inverse(r, gen).to(torch.float64 if dtype == torch.float64 else torch.float32)
    weight = rand((4 * r, 2 * r), dtype=dtype, gen=gen)
    merged = CPU.bat_weight(weight, block)
    emulated, cpu = merged.clone(), merged.clone()
    EMU.launch_log(clear=True)
    EMU.unmerge_(emulated, block)
    inverse_launch = EMU.launch_log(clear=True)[0].split()
    assert inverse_launch[0] == "bat_inverse_kernel<scalar_t>" and f"barriers={2 * r + 4}" in inverse_launch
    CPU.unmerge_(cpu, block)
    check(emulated, cpu, reference.unmerged(merged, block), "unmerged")
    for k, broken in ((2, -torch.eye(r)), (3, torch.diag(torch.logspace(0, -5, r)) - torch.eye(r))):
        bad = block.clone()
        bad[k] = broken.to(bad.dtype)
        messages = []
        for ops in (EMU, CPU):
            target = merged.clone()
            with pytest.raises(RuntimeError) as error:
                ops.unmerge_(target, bad)
            assert torch.equal(target, merged)
            messages.append(str(error.value).splitlines()[0])
        assert messages[0] == messages[1] and f"block[{k}]" in messages[0], messages


def test_bat_transform_kernel_reuses_its_shared_tile_safely():
    """More tiles than blocks (sm_count 2 gives 64 blocks for 192 tiles): each block stages
    several tiles in turn in the same shared arrays, in place too (an in-place merge), and
    the race detector checks the barrier between them."""
    gen = generator(31)
    weight, block = rand((128, 96), dtype=torch.bfloat16, gen=gen), bat_block(128, 8, gen=gen)
    EMU.launch_log(clear=True)
    emulated = EMU.bat_weight(weight, block)
    assert EMU.launch_log(clear=True)[0].startswith("bat_transform_kernel<scalar_t> grid=(64,1,1) block=(4,1,1)")
    check(emulated, CPU.bat_weight(weight, block), reference.bat_weight(weight.double(), block.double()), "W'")
    merged = weight.clone()
    EMU.merge_(merged, block, False)
    assert torch.equal(merged, emulated)
