"""merge_ / unmerge_ (SPEC sec. 1 merge/unmerge, sec. 5 round trip, sec. 6 failed merges)."""

import math

import pytest
import torch
import torch.nn.functional as F

import miss_ext
from miss_ext import reference

from conftest import (
    DTYPES,
    assert_close_to_oracle,
    bat_block,
    dtype_id,
    generator,
    rand,
    rand_away_from_zero,
)

DEVICE = "cpu"
EPS32 = torch.finfo(torch.float32).eps

# (out, in, block shape): standard with in % r != 0, r = 1, r = in, mini, mini_r = 1
SHARD_MERGE_SHAPES = [
    (12, 10, (4, 12)),
    (6, 9, (1, 6)),
    (6, 9, (9, 6)),
    (12, 10, (4, 3)),
    (12, 10, (3, 1)),
]
SHARD_MERGE_IDS = ["std-in%r!=0", "r=1", "r=in", "mini", "mini_r=1"]
BAT_MERGE_SHAPES = [(12, 8, 4), (8, 12, 2), (6, 6, 1), (6, 6, 6)]
BAT_MERGE_IDS = ["out12-in8-r4", "out8-in12-r2", "r1", "single_tile"]


def ulp(w: torch.Tensor) -> torch.Tensor:
    """Spacing of w's dtype at |w| (float64), for normal numbers."""
    eps = torch.finfo(w.dtype).eps
    mag = w.detach().double().abs()
    return torch.exp2(torch.floor(torch.log2(mag))) * eps


def _shard_delta(block, out, in_features):
    return reference.delta_weight(block.double(), in_features, out)


# ---------------------------------------------------------------------------------------
# merge then unmerge returns W


@pytest.mark.parametrize("out,in_features,block_shape", SHARD_MERGE_SHAPES, ids=SHARD_MERGE_IDS)
def test_shard_merge_unmerge_round_trip(out, in_features, block_shape, dtype):
    """SPEC sec. 5: fp32 within ~1e-6 relative, bf16/fp16 within one ulp of W.

    W has |W| in [0.5, 1.5] and the block is an adapter-sized correction (|B| <= ~0.1): then
    W + dW stays within a binade of W and the two roundings (merge, unmerge) leave W within
    one ulp of itself. (Near-zero weights with a large dW can legitimately move by an ulp of
    W + dW instead, see test_shard_merge_unmerge_round_trip_any_magnitude.)
    """
    gen = generator(1)
    w = rand_away_from_zero((out, in_features), dtype=dtype, gen=gen)
    block = rand(block_shape, gen=gen, scale=0.03)
    original = w.clone()
    miss_ext.merge_(w, block)
    assert not torch.equal(w, original), "merging a non-zero block must change W"
    miss_ext.unmerge_(w, block)
    err = (w.double() - original.double()).abs()
    if dtype == torch.float32:
        bound = 1e-6 * original.double().abs()
    else:
        bound = ulp(original)
    assert torch.all(err <= bound), f"max err/bound {(err / bound).max().item():.3f}"


@pytest.mark.parametrize("out,in_features,block_shape", SHARD_MERGE_SHAPES[:1] + SHARD_MERGE_SHAPES[3:4],
                         ids=["std", "mini"])
def test_shard_merge_unmerge_round_trip_any_magnitude(out, in_features, block_shape, dtype):
    """Any W and B: two roundings, each at most half an ulp of a value of magnitude
    <= |W| + |dW|, so |W2 - W| <= eps * (|W| + |dW|) elementwise."""
    gen = generator(2)
    w = rand((out, in_features), dtype=dtype, gen=gen)
    block = rand(block_shape, gen=gen)
    original = w.clone()
    miss_ext.merge_(w, block)
    miss_ext.unmerge_(w, block)
    dw = _shard_delta(block, out, in_features).abs()
    bound = torch.finfo(dtype).eps * (original.double().abs() + dw) + EPS32 * dw
    assert torch.all((w.double() - original.double()).abs() <= bound)


def _bat_round_trip_bound(original, merged, block, r):
    """Per element of W, a first-order bound of |unmerge(merge(W)) - W|.

    merge rounds W' once to W's dtype (<= eps_d/2 |W'|) after an fp32 sum of r + 2 terms
    (<= (r + 2) eps32 |W'|-ish); unmerge computes (W' - B_k) inv(I + B_k) in float64, which maps
    an error row e of W'_kj to e inv(I + B_k): |e inv|_inf <= ||inv(I + B_k)||_1 |e|_inf (max column
    sum). The last rounding (via float32) adds eps_d/2 |W| + eps32 |W|. Factor 2 covers the
    second-order terms. In bf16 this is a few ulps of the tile row: BAT is not exact like
    standard/mini because unmerge divides by I + B_k (SPEC asks "1 ulp" of standard/mini only).
    """
    eps_d = torch.finfo(original.dtype).eps
    out, in_features = original.shape
    inverse = torch.linalg.inv(torch.eye(r, dtype=torch.float64) + block.double())
    inv_norm1 = inverse.abs().sum(dim=-2).amax(dim=-1)  # [out / r]
    tiles = merged.double().reshape(out // r, r, in_features // r, r).abs()
    row_max = tiles.amax(dim=-1, keepdim=True).expand_as(tiles).reshape(out, in_features)
    per_row_norm = inv_norm1.repeat_interleave(r)[:, None]
    first = per_row_norm * (0.5 * eps_d + (r + 2) * EPS32) * row_max
    last = (0.5 * eps_d + EPS32) * original.double().abs()
    return 2 * (first + last)


@pytest.mark.parametrize("out,in_features,r", BAT_MERGE_SHAPES, ids=BAT_MERGE_IDS)
def test_bat_merge_unmerge_round_trip(out, in_features, r, dtype):
    gen = generator(3)
    w = rand((out, in_features), dtype=dtype, gen=gen)
    block = bat_block(out, r, gen=gen)
    original = w.clone()
    miss_ext.merge_(w, block)
    merged = w.clone()
    assert not torch.equal(merged, original)
    miss_ext.unmerge_(w, block)
    err = (w.double() - original.double()).abs()
    bound = _bat_round_trip_bound(original, merged, block, r)
    assert torch.all(err <= bound), f"max err/bound {(err / bound).max().item():.3f}"


# ---------------------------------------------------------------------------------------
# merged weight vs reference.merged, merged forward vs unmerged forward


def _same_precision_merged(weight, block):
    if block.dim() == 3:
        return reference.bat_weight(weight, block)
    return (weight + reference.delta_weight(block, weight.shape[1], weight.shape[0])).to(weight.dtype)


@pytest.mark.parametrize("block_dtype", [None, torch.float32, torch.bfloat16], ids=["same", "fp32_block", "bf16_block"])
@pytest.mark.parametrize("out,in_features,block_shape", SHARD_MERGE_SHAPES, ids=SHARD_MERGE_IDS)
def test_shard_merged_weight_matches_reference(out, in_features, block_shape, block_dtype, dtype):
    gen = generator(4)
    w = rand((out, in_features), dtype=dtype, gen=gen)
    block = rand(block_shape, dtype=block_dtype or dtype, gen=gen)
    oracle, same = reference.merged(w, block), _same_precision_merged(w, block)
    ours = w.clone()
    miss_ext.merge_(ours, block)
    assert_close_to_oracle(ours, oracle, same, dtype=dtype, what="merged W")
    # and unmerge matches reference.unmerged of the merged weight
    back = ours.clone()
    miss_ext.unmerge_(back, block)
    same_back = (ours - reference.delta_weight(block, in_features, out)).to(dtype)
    assert_close_to_oracle(back, reference.unmerged(ours, block), same_back, dtype=dtype, what="unmerged W")


@pytest.mark.parametrize("block_dtype", [None, torch.float32], ids=["same", "fp32_block"])
@pytest.mark.parametrize("out,in_features,r", BAT_MERGE_SHAPES, ids=BAT_MERGE_IDS)
def test_bat_merged_weight_matches_reference(out, in_features, r, block_dtype, dtype):
    gen = generator(5)
    w = rand((out, in_features), dtype=dtype, gen=gen)
    block = bat_block(out, r, dtype=block_dtype or dtype, gen=gen)
    oracle, same = reference.merged(w, block), _same_precision_merged(w, block)
    ours = w.clone()
    miss_ext.merge_(ours, block)
    assert_close_to_oracle(ours, oracle, same, dtype=dtype, what="merged W")
    # merge_ and bat_weight are the same transform
    assert_close_to_oracle(miss_ext.bat_weight(w, block), oracle, same, dtype=dtype, what="bat_weight")


@pytest.mark.parametrize("out,in_features,block_shape", SHARD_MERGE_SHAPES, ids=SHARD_MERGE_IDS)
def test_shard_merged_forward_equals_unmerged_forward(out, in_features, block_shape, dtype):
    gen = generator(6)
    x = rand((7, in_features), dtype=dtype, gen=gen)
    w = rand((out, in_features), dtype=dtype, gen=gen, scale=1 / math.sqrt(in_features))
    b = rand((out,), dtype=dtype, gen=gen)
    block = rand(block_shape, dtype=dtype, gen=gen, scale=0.3)
    unmerged_y = miss_ext.shard_linear(x, w, b, block)
    merged_w = w.clone()
    miss_ext.merge_(merged_w, block)
    merged_y = F.linear(x, merged_w, b)
    oracle = reference.shard_linear(x.double(), w.double(), b.double(), block.double())
    same = reference.shard_linear(x, w, b, block)
    assert_close_to_oracle(unmerged_y, oracle, same, dtype=dtype, what="unmerged forward")
    # The merged forward carries one more rounding (of W + dW to W's dtype) than the
    # unmerged same-precision reference; the same-precision merged forward has it too.
    same_merged = F.linear(x, _same_precision_merged(w, block), b)
    assert_close_to_oracle(merged_y, oracle, same_merged, dtype=dtype, what="merged forward")
    if dtype == torch.float32:
        torch.testing.assert_close(merged_y, unmerged_y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("out,in_features,r", BAT_MERGE_SHAPES, ids=BAT_MERGE_IDS)
def test_bat_merged_forward_equals_unmerged_forward(out, in_features, r, dtype):
    gen = generator(7)
    x = rand((7, in_features), dtype=dtype, gen=gen)
    w = rand((out, in_features), dtype=dtype, gen=gen, scale=1 / math.sqrt(in_features))
    b = rand((out,), dtype=dtype, gen=gen)
    block = bat_block(out, r, dtype=dtype, gen=gen)
    unmerged_y = miss_ext.bat_linear(x, w, b, block)
    merged_w = w.clone()
    miss_ext.merge_(merged_w, block)
    merged_y = F.linear(x, merged_w, b)
    oracle = reference.bat_linear(x.double(), w.double(), b.double(), block.double())
    same = reference.bat_linear(x, w, b, block)
    assert_close_to_oracle(unmerged_y, oracle, same, dtype=dtype, what="unmerged forward")
    assert_close_to_oracle(merged_y, oracle, same, dtype=dtype, what="merged forward")


def test_two_bat_adapters_compose_in_order():
    """SPEC sec. 1: W1 = W + delta_1(W), W2 = W1 + delta_2(W1); unmerging in reverse order
    returns W."""
    gen = generator(8)
    w = rand((8, 8), gen=gen)
    b1, b2 = bat_block(8, 4, gen=gen), bat_block(8, 2, gen=gen)
    ours = w.clone()
    miss_ext.merge_(ours, b1)
    miss_ext.merge_(ours, b2)
    oracle = reference.merged(reference.merged(w, b1), b2)
    same = reference.bat_weight(reference.bat_weight(w, b1), b2)
    assert_close_to_oracle(ours, oracle, same, dtype=torch.float32)
    miss_ext.unmerge_(ours, b2)
    miss_ext.unmerge_(ours, b1)
    torch.testing.assert_close(ours, w, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# failed merges leave W bit-identical


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_safe_merge_of_non_finite_block_raises_and_keeps_weight(variant, bad, dtype):
    gen = generator(9)
    w = rand((12, 8), dtype=dtype, gen=gen)
    if variant == "standard":
        block = rand((4, 12), gen=gen)
    elif variant == "mini":
        block = rand((4, 3), gen=gen)
    else:
        block = bat_block(12, 4, gen=gen)
    block.view(-1)[block.numel() // 2] = bad
    before = w.clone()
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        miss_ext.merge_(w, block, check_finite=True)
    assert torch.equal(w, before)


@pytest.mark.parametrize("variant", ["standard", "bat"])
def test_safe_merge_that_overflows_fp16_raises_and_keeps_weight(variant):
    """Finite inputs whose merged value overflows float16 (max 65504) are refused too."""
    w = torch.full((8, 8), 60000.0, dtype=torch.float16)
    w.view(-1)[::3] = 1.5
    if variant == "standard":
        block = torch.full((4, 8), 0.25)
        block[1, 2] = 10000.0
    else:
        block = torch.full((2, 4, 4), 0.05)  # W B adds up to ~12000
    before = w.clone()
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        miss_ext.merge_(w, block, check_finite=True)
    assert torch.equal(w, before)


def test_unsafe_merge_of_finite_block_succeeds():
    w = rand((12, 8), gen=generator(10))
    block = rand((4, 12), gen=generator(11))
    ours = w.clone()
    miss_ext.merge_(ours, block, check_finite=True)
    assert_close_to_oracle(ours, reference.merged(w, block), _same_precision_merged(w, block))


def _singular_block(out, r, k_bad=1):
    block = bat_block(out, r, gen=generator(12))
    block[k_bad] = -torch.eye(r)
    return block


def test_bat_unmerge_of_singular_block_raises_and_keeps_weight(dtype):
    w = rand((12, 8), dtype=dtype, gen=generator(13))
    block = _singular_block(12, 4)
    before = w.clone()
    with pytest.raises(RuntimeError, match=r"block\[\d+\] is singular: ") as raised:
        miss_ext.unmerge_(w, block)
    assert "nan" not in str(raised.value)  # a singular matrix has no condition number to print
    assert torch.equal(w, before)


@pytest.mark.parametrize("delta", [1e-6, 1e-5], ids=["cond~1e6", "cond~1e5"])
def test_bat_unmerge_of_ill_conditioned_block_raises_and_keeps_weight(delta, dtype):
    """I + B_k = diag(delta, 1, ..., 1) (up to the other blocks): condition 1 / delta."""
    w = rand((12, 8), dtype=dtype, gen=generator(14))
    block = bat_block(12, 4, gen=generator(15))
    block[2] = torch.zeros(4, 4)
    block[2, 0, 0] = delta - 1.0
    before = w.clone()
    with pytest.raises(RuntimeError, match=r"block\[2\] is ill-conditioned \(1-norm condition number \d"):
        miss_ext.unmerge_(w, block)
    assert torch.equal(w, before)


def test_bat_unmerge_of_well_conditioned_block_succeeds():
    """The refusal threshold is not too eager: a condition number ~10 is accepted."""
    w = rand((12, 8), gen=generator(16))
    block = bat_block(12, 4, gen=generator(17))
    block[0] = torch.diag(torch.tensor([-0.9, 0.0, 0.5, 0.1]))  # cond(I + B_0) = 15
    ours = w.clone()
    miss_ext.merge_(ours, block)
    miss_ext.unmerge_(ours, block)
    torch.testing.assert_close(ours, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype_", DTYPES, ids=dtype_id)
def test_bat_merge_is_in_place(dtype_):
    w = rand((12, 8), dtype=dtype_, gen=generator(18))
    ptr = w.data_ptr()
    miss_ext.merge_(w, bat_block(12, 4, gen=generator(19)))
    miss_ext.unmerge_(w, bat_block(12, 4, gen=generator(19)))
    assert w.data_ptr() == ptr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape,block_shape", [((5, 37), (4, 5)), ((16, 64), (8, 4)), ((3, 8), (8, 3))],
                         ids=["tail", "mini", "one-span"])
def test_low_precision_merge_rounds_once_like_torch(shape, block_shape, dtype):
    """The vectorised store of the merge (csrc/cpu/add_span.h) gives the bits of widening to
    float32, adding, and one round-to-nearest-even conversion, including the scalar tail."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=generator).to(dtype)
    block = torch.randn(block_shape, generator=generator) * 0.1
    out, in_features = shape
    r, m = block_shape
    delta = block[torch.arange(in_features) % r][:, torch.arange(out) % m].t()  # delta[o, i] = B[i % r, o % m]
    expected = (weight.float() + delta).to(dtype)
    merged = weight.clone()
    miss_ext.merge_(merged, block)
    assert torch.equal(merged.view(torch.int16), expected.view(torch.int16))
