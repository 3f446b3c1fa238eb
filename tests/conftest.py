"""Shared helpers of the miss_ext test suite: deterministic non-zero inputs, layouts of x,
the float64 oracle, the one accuracy rule every comparison goes through, and the layer
configurations of the op tests.

Every helper takes a ``device`` argument so that tests/test_cuda.py can reuse them. Random
values are always drawn on the CPU (then moved), so a CPU and a CUDA run see the same inputs.
Entry points for another device:

- ``assert_close_to_oracle(ours, oracle, same_precision)``: the accuracy rule;
- ``make_shard_layer`` / ``make_bat_layer`` (+ ``SHARD_CASES``, ``BAT_CASES``): inputs;
- ``check_shard_layer`` / ``check_bat_layer`` (tests/layer_checks.py): forward and autograd of
  a layer vs the oracle;
- ``sample_inputs(device, requires_grad)`` (tests/op_samples.py): samples of every op (opcheck);
- ``oracle_and_same`` / ``grads_oracle_and_same``: the two sides of the rule for any reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import pytest
import torch

from miss_ext import reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS[dtype]


# ---------------------------------------------------------------------------------------
# Inputs


def generator(seed: int = 0) -> torch.Generator:
    """A CPU generator: values are drawn on the CPU and moved, so every device sees the same."""
    return torch.Generator().manual_seed(seed)


def rand(shape: Sequence[int], *, dtype=torch.float32, device="cpu", gen: Optional[torch.Generator] = None,
         scale: float = 1.0) -> torch.Tensor:
    """Standard normal values times ``scale``, with no exact zero (a zero block hides bugs)."""
    gen = gen if gen is not None else generator(0)
    t = (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(dtype)
    t = torch.where(t == 0, torch.full_like(t, scale), t)
    return t.to(device)


def rand_away_from_zero(shape: Sequence[int], *, dtype=torch.float32, device="cpu",
                        gen: Optional[torch.Generator] = None, low: float = 0.5,
                        high: float = 1.5) -> torch.Tensor:
    """Values with |v| uniform in [low, high] and a random sign (for ulp-level bounds)."""
    gen = gen if gen is not None else generator(0)
    magnitude = low + (high - low) * torch.rand(tuple(shape), generator=gen, dtype=torch.float64)
    sign = torch.randint(0, 2, tuple(shape), generator=gen).to(torch.float64) * 2 - 1
    return (magnitude * sign).to(dtype).to(device)


def seed_tensor(value: int, device="cpu") -> torch.Tensor:
    """A dropout seed as the ops take it: a one-element int64 tensor."""
    return torch.tensor([value], dtype=torch.int64, device=device)


LAYOUTS = ("contiguous", "transposed", "transposed3d", "step2", "col_offset", "row_offset")


def make_x(lead: Sequence[int], in_features: int, *, layout: str = "contiguous", dtype=torch.float32,
           device="cpu", gen: Optional[torch.Generator] = None, scale: float = 1.0) -> torch.Tensor:
    """x of shape ``[*lead, in_features]`` laid out in memory as ``layout`` says.

    transposed: a 2-D ``base.t()``; transposed3d: a 3-D ``base.transpose(0, 1)``;
    step2: ``base[..., ::2]``; col_offset: ``base[..., 1:]``; row_offset: ``base[1:]``.
    """
    lead = tuple(lead)
    kw = dict(dtype=dtype, device=device, gen=gen, scale=scale)
    if layout == "contiguous":
        x = rand((*lead, in_features), **kw)
    elif layout == "transposed":
        assert len(lead) == 1, "a transposed 2-D view needs one leading dim"
        x = rand((in_features, lead[0]), **kw).t()
    elif layout == "transposed3d":
        assert len(lead) == 2, "a transposed 3-D view needs two leading dims"
        x = rand((lead[1], lead[0], in_features), **kw).transpose(0, 1)
    elif layout == "step2":
        x = rand((*lead, 2 * in_features), **kw)[..., ::2]
    elif layout == "col_offset":
        x = rand((*lead, in_features + 1), **kw)[..., 1:]
    elif layout == "row_offset":
        assert len(lead) >= 1
        x = rand((lead[0] + 1, *lead[1:], in_features), **kw)[1:]
    else:
        raise ValueError(layout)
    assert x.shape == (*lead, in_features)
    if layout not in ("contiguous", "row_offset") and x.numel() > in_features > 1:
        assert not x.is_contiguous(), layout
    return x


def shard_block(r: int, m: int, *, dtype=torch.float32, device="cpu", gen=None, scale: float = 0.5):
    """A non-zero standard ([r, out]) or mini ([r, mini_r]) block."""
    return rand((r, m), dtype=dtype, device=device, gen=gen, scale=scale)


def bat_block(out_features: int, r: int, *, dtype=torch.float32, device="cpu", gen=None,
              scale: float = 0.3):
    """A non-zero BAT block [out / r, r, r]; entries ~ scale / sqrt(r) keep I + B_k well
    conditioned (spectral norm of B_k about 2 * scale), so unmerge is defined."""
    return rand((out_features // r, r, r), dtype=dtype, device=device, gen=gen, scale=scale / math.sqrt(r))


# ---------------------------------------------------------------------------------------
# Oracle and the accuracy rule


def to64(value):
    """float64 copy of a floating tensor (detached, leaf); anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    return value


def leaf(t: Optional[torch.Tensor], requires_grad: bool = True) -> Optional[torch.Tensor]:
    """A detached leaf copy of t (None stays None)."""
    if t is None:
        return None
    return t.detach().clone().requires_grad_(requires_grad)


def _max_abs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def assert_close_to_oracle(ours: torch.Tensor, oracle: torch.Tensor, same_precision: torch.Tensor, *,
                           dtype: Optional[torch.dtype] = None, what: str = "") -> None:
    """The one accuracy rule of the suite (flash-attention's rule).

    ``oracle`` is miss_ext.reference run in float64 on the same input values; ``same_precision``
    is the same reference run on the original (low-precision or mixed) tensors. Then

        max|ours - oracle| <= 2 * max|same_precision - oracle| + floor,
        floor = (eps(ours.dtype) / 2 + 1e-6) * max|oracle|.

    Why that floor: our kernels accumulate in float32 and round once to the output dtype, so
    a correct result may still differ from the oracle by one rounding of the output (half an
    ulp, at most eps(dtype) / 2 * max|oracle|) plus float32 accumulation noise (1e-6
    relative, about 8 float32 ulps). The floor only matters when the same-precision reference
    happens to be (nearly) exact, e.g. a short sum in float32, or a float32 output computed
    from float32 inputs; otherwise the 2x term dominates.
    """
    label = f"{what}: " if what else ""
    assert ours.shape == oracle.shape, f"{label}shape {tuple(ours.shape)} != oracle {tuple(oracle.shape)}"
    if dtype is not None:
        assert ours.dtype == dtype, f"{label}dtype {ours.dtype} != expected {dtype}"
    assert same_precision.shape == oracle.shape
    if ours.numel() == 0:
        return
    assert torch.isfinite(ours).all(), f"{label}non-finite values in the result"
    # An overflowing same-precision reference would make the bound infinite: a broken test.
    assert torch.isfinite(same_precision).all(), f"{label}the same-precision reference is not finite"
    o = oracle.detach().to(torch.float64).cpu()
    err = _max_abs(ours.detach().to(torch.float64).cpu() - o)
    ref_err = _max_abs(same_precision.detach().to(torch.float64).cpu() - o)
    scale = _max_abs(o)
    floor = (torch.finfo(ours.dtype).eps / 2 + 1e-6) * scale
    bound = 2.0 * ref_err + floor
    assert err <= bound, (
        f"{label}max error vs float64 oracle {err:.3e} > bound {bound:.3e} "
        f"(same-precision reference error {ref_err:.3e}, floor {floor:.3e}, max|oracle| {scale:.3e}, "
        f"dtype {ours.dtype})"
    )


def assert_empty_output(t: torch.Tensor, what: str = "") -> None:
    """Outputs not asked for in output_mask come back as empty tensors."""
    assert isinstance(t, torch.Tensor), what
    assert t.numel() == 0, f"{what}: expected an empty tensor, got shape {tuple(t.shape)}"


# ---------------------------------------------------------------------------------------
# References that the ops expose but reference.py does not spell out


def ref_shard_linear_outputs(x, weight, bias, block, p=0.0, seed=None):
    """(y, fold) of miss::shard_linear: the layer output and the fold of drop(x) ([N, r])."""
    y = reference.shard_linear(x, weight, bias, block, p, seed)
    fold = reference.shard_fold(x, block.shape[0], p, seed)
    return y, fold


def ref_shard_delta_add_outputs(y, x, block, p=0.0, seed=None):
    """(y + fold(drop(x)) @ B_full, fold) of miss::shard_delta_add, in y's dtype."""
    delta = reference.shard_delta(x, block, y.shape[-1], p, seed)
    return (y + delta).to(y.dtype), reference.shard_fold(x, block.shape[0], p, seed)


def ref_shard_tile_add(grad_x, g, p=0.0, seed=None):
    """grad_x + drop(n, i) * g[n, i % r], in grad_x's dtype."""
    tiled = reference.shard_tile(g, grad_x.shape[-1], p, seed)
    return (grad_x + tiled.reshape(grad_x.shape)).to(grad_x.dtype)


def oracle_and_same(fn, *args):
    """(fn on float64 copies, fn on the original tensors): the two sides of the accuracy rule."""
    return fn(*[to64(a) for a in args]), fn(*args)


def grads_oracle_and_same(fn, inputs, grad_outputs, wrt):
    """torch.autograd.grad of a reference ``fn(*inputs)`` w.r.t. ``inputs[i] for i in wrt``,
    once in float64 and once in the original dtypes. Returns (oracle_grads, same_grads)."""
    results = []
    for convert in (to64, lambda t: t.detach() if isinstance(t, torch.Tensor) else t):
        ins = [convert(a) for a in inputs]
        ins = [leaf(a) if i in wrt else a for i, a in enumerate(ins)]
        outs = fn(*ins)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        gos = [None if g is None else (to64(g) if convert is to64 else g) for g in grad_outputs]
        pairs = [(o, g) for o, g in zip(outs, gos) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], [ins[i] for i in wrt],
                                    [g.to(o.dtype) for o, g in pairs], allow_unused=True)
        grads = [torch.zeros_like(ins[i]) if gr is None else gr for i, gr in zip(wrt, grads)]
        results.append(grads)
    return results[0], results[1]


# ---------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class ShardCase:
    """A standard (m == out) or mini (m < out) layer: x [*lead, in], W [out, in], B [r, m]."""

    lead: tuple
    in_features: int
    out_features: int
    r: int
    m: int
    layout: str = "contiguous"

    @property
    def rows(self) -> int:
        return math.prod(self.lead)

    @property
    def id(self) -> str:
        kind = "std" if self.m == self.out_features else f"mini{self.m}"
        lead = "x".join(map(str, self.lead)) or "1d"
        return f"{kind}-N{lead}-in{self.in_features}-out{self.out_features}-r{self.r}-{self.layout}"


# Every shape rule of SPEC sec. 5 for standard/mini, on small sizes.
SHARD_CASES = (
    ShardCase((7,), 10, 12, 4, 12),                    # in % r != 0, standard
    ShardCase((5,), 10, 12, 4, 3),                     # in % r != 0, mini
    ShardCase((6,), 9, 8, 1, 8),                       # r = 1
    ShardCase((6,), 9, 8, 9, 8),                       # r = in
    ShardCase((0,), 10, 12, 4, 12),                    # N = 0
    ShardCase((), 10, 12, 3, 12),                      # 1-D x
    ShardCase((2, 3), 11, 6, 4, 6),                    # 3-D x
    ShardCase((2, 2, 3), 8, 6, 3, 2),                  # 4-D x, mini
    ShardCase((6,), 12, 12, 5, 1),                     # mini_r = 1
    ShardCase((6,), 12, 12, 5, 12),                    # mini_r = out (= standard)
    ShardCase((7,), 10, 12, 4, 12, "transposed"),      # x = base.t()
    ShardCase((3, 4), 10, 12, 4, 6, "transposed3d"),   # x = base.transpose(0, 1)
    ShardCase((5,), 10, 12, 3, 12, "step2"),           # x = base[..., ::2]
    ShardCase((2, 3), 10, 12, 3, 4, "col_offset"),     # x = base[..., 1:]
    ShardCase((4,), 10, 12, 3, 12, "row_offset"),      # x = base[1:]
)

# A smaller set for the sweeps that multiply with dtypes, dropout and masks.
SHARD_CASES_CORE = (SHARD_CASES[0], SHARD_CASES[1], SHARD_CASES[4], SHARD_CASES[7], SHARD_CASES[10])


@dataclass(frozen=True)
class BatCase:
    lead: tuple
    in_features: int
    out_features: int
    r: int
    layout: str = "contiguous"

    @property
    def id(self) -> str:
        lead = "x".join(map(str, self.lead)) or "1d"
        return f"bat-N{lead}-in{self.in_features}-out{self.out_features}-r{self.r}-{self.layout}"


BAT_CASES = (
    BatCase((5,), 8, 12, 4),
    BatCase((5,), 8, 12, 2),
    BatCase((5,), 8, 12, 1),
    BatCase((3,), 12, 8, 4),
    BatCase((4,), 6, 6, 6),                  # r = in = out: a single tile
    BatCase((0,), 8, 12, 4),                 # N = 0
    BatCase((), 8, 4, 2),                    # 1-D x
    BatCase((2, 3), 8, 8, 4, "transposed3d"),
    BatCase((5,), 8, 12, 4, "transposed"),
    BatCase((5,), 32, 48, 16),               # r % 16 == 0: on CUDA a bf16 W's transform runs on tensor cores
    BatCase((3,), 128, 192, 64),             # the benchmark's r
)


def ids(cases) -> list:
    return [c.id for c in cases]


@dataclass
class ShardLayer:
    """Inputs of one standard/mini layer."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    block: torch.Tensor


def _make_layer(case, make_block, dtype, device, bias: bool, seed: int) -> ShardLayer:
    """x, weight, bias, then the block (make_block(gen)), drawn in that order from one seed."""
    gen = generator(seed)
    x = make_x(case.lead, case.in_features, layout=case.layout, dtype=dtype, device=device, gen=gen)
    weight = rand((case.out_features, case.in_features), dtype=dtype, device=device, gen=gen,
                  scale=1.0 / math.sqrt(case.in_features))
    b = rand((case.out_features,), dtype=dtype, device=device, gen=gen) if bias else None
    return ShardLayer(x, weight, b, make_block(gen))


def make_shard_layer(case: ShardCase, *, dtype=torch.float32, block_dtype=None, device="cpu",
                     bias: bool = True, seed: int = 0) -> ShardLayer:
    return _make_layer(case, lambda gen: shard_block(case.r, case.m, dtype=block_dtype or dtype, device=device,
                                                     gen=gen), dtype, device, bias, seed)


def make_bat_layer(case: BatCase, *, dtype=torch.float32, block_dtype=None, device="cpu",
                   bias: bool = True, seed: int = 0) -> ShardLayer:
    return _make_layer(case, lambda gen: bat_block(case.out_features, case.r, dtype=block_dtype or dtype,
                                                   device=device, gen=gen), dtype, device, bias, seed)


# (x dtype, block dtype): PEFT's default (bf16/fp16 model, fp32 adapter) and the reverse.
MIXED_DTYPES = ((torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16))
MIXED_IDS = [f"x_{dtype_id(a)}-block_{dtype_id(b)}" for a, b in MIXED_DTYPES]


@pytest.fixture(params=DTYPES, ids=[dtype_id(d) for d in DTYPES])
def dtype(request):
    return request.param


def blocks_for_the_inverse(r, gen):
    """[4, r, r] blocks whose I + B_k need what Gauss-Jordan must get right: a random
    well-conditioned one, a permutation (a zero diagonal: row swaps at every step), one whose
    pivots come from the last rows (I + B lower anti-triangular plus noise), and one of
    1-norm condition number in the thousands (accepted, and its error amplified)."""
    eye = torch.eye(r)
    random = rand((r, r), gen=gen, scale=0.3 / r ** 0.5)
    permutation = torch.roll(eye, 1, 0) - eye
    anti = torch.flip(torch.tril(torch.ones(r, r)), [1]) + rand((r, r), gen=gen, scale=0.01) - eye
    u, _, v = torch.linalg.svd(eye + rand((r, r), gen=gen, scale=0.3 / r ** 0.5))
    spread = u @ torch.diag(torch.logspace(0, -3, r)) @ v - eye
    return torch.stack([random, permutation, anti, spread])
