"""Every op on CUDA: against the float64 reference and the CPU kernels, in the three dtypes,
with SPEC sec. 5's edge cases; opcheck on CUDA; gradients; dropout masks bit-identical to
the CPU's. Skipped when no GPU is present; a GPU with a build that lacks the CUDA kernels is
a failure, not a skip.
"""

import pytest
import torch

import miss_ext
from miss_ext import reference

from conftest import (
    BAT_CASES,
    DTYPES,
    MIXED_DTYPES,
    SHARD_CASES,
    assert_close_to_oracle,
    bat_block,
    blocks_for_the_inverse,
    dtype_id,
    generator,
    ids,
    rand,
    seed_tensor,
)
from layer_checks import check_bat_layer, check_shard_layer
from op_samples import sample_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
CUDA = "cuda"
# Built at collection time, so only where a GPU exists (empty, hence skipped, elsewhere).
SAMPLES = sample_inputs(CUDA) if torch.cuda.is_available() else []
GRAD_SAMPLES = sample_inputs(CUDA, requires_grad=True) if torch.cuda.is_available() else []
SAMPLE_IDS = [f"{s[0]}-{s[2]}" for s in SAMPLES]


def test_build_has_cuda_kernels():
    assert miss_ext.has_cuda_kernels(), "a GPU is present but this miss_ext build has no CUDA kernels"


@pytest.mark.parametrize("dtype", DTYPES, ids=[dtype_id(d) for d in DTYPES])
@pytest.mark.parametrize("case", SHARD_CASES, ids=ids(SHARD_CASES))
def test_shard_ops_match_oracle_on_cuda(case, dtype):
    check_shard_layer(case, dtype=dtype, device=CUDA)


@pytest.mark.parametrize("case", SHARD_CASES[:4], ids=ids(SHARD_CASES[:4]))
def test_shard_ops_with_dropout_match_oracle_on_cuda(case):
    check_shard_layer(case, p=0.3, device=CUDA)


@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=[f"{dtype_id(a)}-x-{dtype_id(b)}-block" for a, b in MIXED_DTYPES])
def test_mixed_block_dtype_on_cuda(dtypes):
    check_shard_layer(SHARD_CASES[0], dtype=dtypes[0], block_dtype=dtypes[1], device=CUDA)
    check_bat_layer(BAT_CASES[0], dtype=dtypes[0], block_dtype=dtypes[1], device=CUDA)


@pytest.mark.parametrize("dtype", DTYPES, ids=[dtype_id(d) for d in DTYPES])
@pytest.mark.parametrize("case", BAT_CASES, ids=ids(BAT_CASES))
def test_bat_ops_match_oracle_on_cuda(case, dtype):
    check_bat_layer(case, dtype=dtype, device=CUDA)


def _to_cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _clone_args(args):
    return [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("op,args,sample_id", SAMPLES, ids=SAMPLE_IDS)
def test_every_op_on_cuda_matches_the_cpu_kernels(op, args, sample_id):
    """Same inputs on both devices: outputs (and mutated weights) agree to float32 rounding
    (different summation orders), dropout masks included."""
    cuda_args = _clone_args(args)
    cpu_args = [_to_cpu(a) for a in _clone_args(args)]
    cuda_out = getattr(torch.ops.miss, op)(*cuda_args)
    cpu_out = getattr(torch.ops.miss, op)(*cpu_args)
    if op in ("merge_", "unmerge_"):
        cuda_out, cpu_out = cuda_args[0], cpu_args[0]
    cuda_out = cuda_out if isinstance(cuda_out, (tuple, list)) else (cuda_out,)
    cpu_out = cpu_out if isinstance(cpu_out, (tuple, list)) else (cpu_out,)
    for a, b in zip(cuda_out, cpu_out):
        assert a.shape == b.shape and a.dtype == b.dtype
        tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 2e-2
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("op,args,sample_id", GRAD_SAMPLES, ids=SAMPLE_IDS)
def test_opcheck_on_cuda(op, args, sample_id):
    args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(getattr(torch.ops.miss, op).default, tuple(args))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(7, 37), (3, 5, 64), (1, 1)], ids=["7x37", "3x5x64", "1x1"])
def test_dropout_mask_bit_identical_to_cpu(shape, p):
    """tile(ones) through dropout is the mask itself (scale or 0): equal bit for bit, with the
    seed on the GPU (no host sync) and with the seed on the CPU."""
    rows = shape[0] if len(shape) == 2 else shape[0] * shape[1]
    ones = torch.ones(rows, 1)
    zeros = torch.zeros(shape)
    cpu_mask = miss_ext.shard_tile_add(zeros, ones, p, seed_tensor(99))
    for seed in (seed_tensor(99, CUDA), seed_tensor(99)):
        cuda_mask = miss_ext.shard_tile_add(zeros.to(CUDA), ones.to(CUDA), p, seed)
        assert torch.equal(cuda_mask.cpu(), cpu_mask)
    expected = reference.dropout_multipliers(99, rows, shape[-1], p, dtype=torch.float32).reshape(shape)
    assert torch.equal(cpu_mask, expected)


def test_dropout_seed_draw_is_reproducible_on_cuda():
    torch.manual_seed(7)
    a = miss_ext.dropout_seed(CUDA)
    torch.manual_seed(7)
    b = miss_ext.dropout_seed(CUDA)
    assert a.device.type == "cuda" and torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=[dtype_id(d) for d in DTYPES])
@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_merge_unmerge_round_trip_on_cuda(variant, dtype):
    gen = generator(5)
    weight = rand((16, 24), dtype=dtype, device=CUDA, gen=gen)
    block = {"standard": rand((8, 16), device=CUDA, gen=gen, scale=0.1),
             "mini": rand((8, 4), device=CUDA, gen=gen, scale=0.1),
             "bat": bat_block(16, 8, device=CUDA, gen=gen)}[variant]
    original = weight.clone()
    miss_ext.merge_(weight, block)
    merged_cpu = original.cpu().clone()
    miss_ext.merge_(merged_cpu, block.cpu())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(weight.cpu(), merged_cpu, rtol=tol, atol=tol)
    torch.testing.assert_close(weight.cpu().double(), reference.merged(original.cpu(), block.cpu()),
                               rtol=tol, atol=tol)
    miss_ext.unmerge_(weight, block)
    torch.testing.assert_close(weight, original, rtol=tol * 4, atol=tol * 4)


def test_failed_merges_leave_cuda_weight_unchanged():
    weight = rand((8, 8), device=CUDA)
    before = weight.clone()
    bad = torch.full((4, 8), float("nan"), device=CUDA)
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        miss_ext.merge_(weight, bad, check_finite=True)
    singular = -torch.eye(4, device=CUDA).expand(2, 4, 4).contiguous()
    with pytest.raises(RuntimeError, match="is singular: "):
        miss_ext.unmerge_(weight, singular)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_miss_linear_training_step_on_cuda_matches_cpu(variant):
    """One MissLinear step (dropout on for standard/mini) gives the same output and block
    gradient on CUDA as on the CPU: same seed, same mask."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 16)
    kwargs = {"standard": {}, "mini": {"init_weights": "mini", "mini_r": 4}, "bat": {"init_weights": "bat"}}[variant]
    p = 0.0 if variant == "bat" else 0.2
    layers = {}
    for device in ("cpu", CUDA):
        layer = miss_ext.MissLinear(torch.nn.Linear(32, 16), r=8, miss_dropout=p, **kwargs).to(device)
        layer.base_layer.load_state_dict(base.state_dict())
        with torch.no_grad():
            layer.miss_block["default"].copy_(torch.randn(layer.miss_block["default"].shape,
                                                          generator=generator(3)) * 0.1)
        layers[device] = layer
    x = rand((3, 5, 32), gen=generator(4))
    seed = seed_tensor(1234)
    outputs = {}
    for device, layer in layers.items():
        block = layer.miss_block["default"]
        xd = x.to(device).requires_grad_()
        if variant == "bat":
            y = miss_ext.bat_linear(xd, layer.base_layer.weight, layer.base_layer.bias, block)
        else:
            y = miss_ext.shard_linear(xd, layer.base_layer.weight, layer.base_layer.bias, block, p, seed.to(device))
        grads = torch.autograd.grad(y.square().sum(), (xd, block))
        outputs[device] = [y.detach().cpu()] + [g.cpu() for g in grads]
    for a, b in zip(outputs[CUDA], outputs["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_large_shapes_on_cuda_match_cpu():
    """Sizes past one block of threads and past the CPU chunking, standard and mini, bf16 model
    with fp32 adapter (PEFT's default)."""
    gen = generator(11)
    for m in (512, 16):
        x = rand((3000, 700), dtype=torch.bfloat16, gen=gen)
        weight = rand((512, 700), dtype=torch.bfloat16, gen=gen, scale=0.05)
        block = rand((64, m), gen=gen, scale=0.05)
        seed = seed_tensor(5)
        y_cpu, f_cpu = torch.ops.miss.shard_linear(x, weight, None, block, 0.1, seed)
        y_gpu, f_gpu = torch.ops.miss.shard_linear(x.cuda(), weight.cuda(), None, block.cuda(), 0.1, seed.cuda())
        torch.testing.assert_close(f_gpu.cpu(), f_cpu, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(y_gpu.cpu().float(), y_cpu.float(), rtol=2e-2, atol=2e-2)


def test_bat_on_tensor_cores_matches_cpu():
    """A bf16 W with r = 64 takes the mma.sync kernels (transform, block gradient, unmerge): at
    this size the forward's W' and G whole, dB from 12 row-blocks x 4 groups of 8 tiles (the
    SMs of any GPU with mma.sync outnumber the 12 row-blocks), dx's W' in 8 slabs. Against the
    CPU path, by the suite's 2x rule of the float64 oracle. The emulator checks the same
    kernels in CI; this is the check on the hardware's tensor cores."""
    gen = generator(12)
    x = rand((2048, 2048), dtype=torch.bfloat16, gen=gen)
    weight = rand((768, 2048), dtype=torch.bfloat16, gen=gen, scale=0.05)
    block, dy = bat_block(768, 64, gen=gen), rand((2048, 768), dtype=torch.bfloat16, gen=gen)
    mask = [True, True, True]
    oracle_y = torch.ops.miss.bat_linear(x.double(), weight.double(), None, block.double())
    oracle_grads = torch.ops.miss.bat_linear_backward(dy.double(), x.double(), weight.double(), block.double(), mask)
    cpu_y = torch.ops.miss.bat_linear(x, weight, None, block)
    cpu_grads = torch.ops.miss.bat_linear_backward(dy, x, weight, block, mask)
    gpu_y = torch.ops.miss.bat_linear(x.cuda(), weight.cuda(), None, block.cuda())
    gpu_grads = torch.ops.miss.bat_linear_backward(dy.cuda(), x.cuda(), weight.cuda(), block.cuda(), mask)
    assert_close_to_oracle(gpu_y.cpu(), oracle_y, cpu_y, what="y")
    for name, g, o, c in zip(("grad_x", "grad_weight", "grad_block"), gpu_grads, oracle_grads, cpu_grads):
        assert_close_to_oracle(g.cpu(), o, c, what=name)
    merged_gpu, merged_cpu = weight.cuda(), weight.clone()
    miss_ext.merge_(merged_gpu, block.cuda())
    miss_ext.merge_(merged_cpu, block)
    assert_close_to_oracle(merged_gpu.cpu(), reference.bat_weight(weight.double(), block.double()), merged_cpu,
                           what="merged")
    miss_ext.unmerge_(merged_gpu, block.cuda())
    miss_ext.unmerge_(merged_cpu, block)
    assert_close_to_oracle(merged_gpu.cpu(), weight.double(), merged_cpu, what="unmerged")


@pytest.mark.parametrize("r,dtype", [(64, torch.bfloat16), (12, torch.float32)], ids=["r64-bf16", "r12-fp32"])
def test_bat_unmerge_inverse_kernel_matches_cpu(r, dtype):
    """bat_inverse_kernel (float64 Gauss-Jordan, one block per matrix; 1024 threads at r 64)
    on the hardware: blocks that need row swaps and one of condition number in the thousands
    unmerge as on the CPU, and the refusals (singular, ill-conditioned) carry the CPU's message."""
    gen = generator(71 + r)
    block = blocks_for_the_inverse(r, gen)
    weight = rand((4 * r, 2 * r), dtype=dtype, gen=gen)
    merged = torch.ops.miss.bat_weight(weight, block)
    on_gpu, on_cpu = merged.cuda(), merged.clone()
    miss_ext.unmerge_(on_gpu, block.cuda())
    miss_ext.unmerge_(on_cpu, block)
    assert_close_to_oracle(on_gpu.cpu(), reference.unmerged(merged, block), on_cpu, what="unmerged")
    for k, broken in ((2, -torch.eye(r)), (3, torch.diag(torch.logspace(0, -5, r)) - torch.eye(r))):
        bad = block.clone()
        bad[k] = broken
        messages = []
        for device in (CUDA, "cpu"):
            target = merged.to(device)
            with pytest.raises(RuntimeError) as error:
                miss_ext.unmerge_(target, bad.to(device))
            assert torch.equal(target.cpu(), merged)
            messages.append(str(error.value).splitlines()[0])
        assert messages[0] == messages[1], messages
