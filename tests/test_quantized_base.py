"""bitsandbytes 4-bit (nf4, fp4) and 8-bit base layers on CPU (bitsandbytes 0.50's CPU backend),
against PEFT's MiSS on the same quantized bases (its quantization backends are the oracle).

Standard and mini call the quantized layer and add their delta; bat dequantizes the weight
(PEFT does the same). Training, save and reload (in miss_ext and in PEFT), and merge/unmerge,
which dequantize, merge in float32 and quantize again, with a warning: the merged layer
differs from the unmerged one by the rounding. Before base_layers.py the fused op read the
packed uint8/int8 weight as if it were the weight, and the block took its integer dtype.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from miss_ext import MissConfig, MissModel, get_miss_model
from miss_ext.base_layers import dense_weight, reads_weight_directly, where_weight_lives

import models as M

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

IN, HIDDEN = 64, 64  # bitsandbytes' CPU inference kernel fails on in_features < its blocksize 64
VARIANTS = {"standard": dict(init_weights=True), "mini": dict(init_weights="mini", mini_r=4),
            "bat": dict(init_weights="bat")}
TARGETS = ["0", "2"]


def linear_4bit(dense: nn.Linear, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
    layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, compute_dtype=compute_dtype, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(dense.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                     module=layer)
    layer.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")  # bitsandbytes quantizes on the move to the device


def linear_8bit(dense: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, has_fp16_weights=False, threshold=0.0)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")


QUANTIZED = {
    "nf4": lambda d: linear_4bit(d, "nf4", torch.float32),
    "fp4": lambda d: linear_4bit(d, "fp4", torch.float32),
    "nf4-bf16": lambda d: linear_4bit(d, "nf4", torch.bfloat16),
    "int8": linear_8bit,
}


def quantized_mlp(kind: str) -> nn.Sequential:
    """The same float weights every call (so two copies quantize to the same bits)."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN))
    for i in (0, 2):
        dense[i] = QUANTIZED[kind](dense[i])
    return dense


def ours_and_peft(kind: str, variant: str):
    values = dict(target_modules=TARGETS, r=8, **VARIANTS[variant])
    ours = get_miss_model(quantized_mlp(kind), MissConfig(**values))
    M.randomize_blocks(ours, seed=3, scale=0.1)
    theirs = peft.get_peft_model(quantized_mlp(kind), peft.MissConfig(**values))
    M.copy_blocks_to_peft(ours, theirs)
    return ours, theirs


def step(model, x):
    y = model(x)
    y.float().square().mean().backward()
    grads = {M.strip(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), grads


def dequantized(model, index: int) -> torch.Tensor:
    with dense_weight(model.get_base_model()[index].base_layer) as weight:
        return weight.float().clone()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", sorted(QUANTIZED))
def test_training_on_a_quantized_base_equals_peft(kind, variant):
    ours, theirs = ours_and_peft(kind, variant)
    layer = ours.get_base_model()[0]
    assert not reads_weight_directly(layer.base_layer)
    assert where_weight_lives(layer.base_layer) == ("bnb-8bit" if kind == "int8" else "bnb-4bit")
    assert all(b.dtype == torch.float32 for b in layer.miss_block.values()), "a float32 block, as PEFT's"
    x = torch.randn(5, IN)
    y, grads = step(ours, x)
    y_peft, grads_peft = step(theirs, x)
    torch.testing.assert_close(y, y_peft, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_peft.keys() and len(grads) == 2
    for name in grads:
        torch.testing.assert_close(grads[name], grads_peft[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_trained_adapter_on_a_quantized_base_reloads_in_miss_ext_and_in_peft(kind, variant, tmp_path):
    ours, _ = ours_and_peft(kind, variant)
    optimizer = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    for seed in range(3):
        ours(torch.randn(4, IN, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    ours.save_pretrained(str(tmp_path))
    x = torch.randn(5, IN)
    # Inference on all three: bitsandbytes' CPU kernels round differently with and without grad.
    with torch.no_grad():
        expected = ours.eval()(x)
        assert torch.isfinite(expected).all()
        again = MissModel.from_pretrained(quantized_mlp(kind), str(tmp_path))
        torch.testing.assert_close(again(x), expected)
        in_peft = peft.PeftModel.from_pretrained(quantized_mlp(kind), str(tmp_path))
        torch.testing.assert_close(in_peft(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_merge_and_unmerge_requantize_as_peft_does_and_warn(kind, variant):
    ours, theirs = ours_and_peft(kind, variant)
    x = torch.randn(5, IN)
    unmerged = ours(x).detach()
    weight_before = dequantized(ours, 0)
    with pytest.warns(UserWarning, match="quantizes the merged weight again"):
        ours.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.merge_adapter()
    layer = ours.get_base_model()[0]
    assert layer.merged and type(layer.base_layer.weight).__name__ in ("Params4bit", "Int8Params")
    torch.testing.assert_close(dequantized(ours, 0), dequantized(theirs, 0), rtol=1e-5, atol=1e-6)
    merged = ours(x).detach()
    torch.testing.assert_close(merged, theirs(x), rtol=1e-4, atol=1e-5)
    # the rounding of a second quantization, not a wrong merge: 4-bit keeps ~16 levels a block
    tolerance = 0.03 if kind == "int8" else 0.3
    assert M.relative_error(merged, unmerged) < tolerance
    with pytest.warns(UserWarning, match="quantizes the merged weight again"):
        ours.unmerge_adapter()
    assert not layer.merged
    assert M.relative_error(dequantized(ours, 0), weight_before) < tolerance


def test_a_failed_safe_merge_leaves_the_quantized_weight_as_it_was():
    ours, _ = ours_and_peft("nf4", "standard")
    layer = ours.get_base_model()[0]
    packed = layer.base_layer.weight.data.clone()
    with torch.no_grad():
        layer.miss_block["default"][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        ours.merge_adapter(safe_merge=True)
    assert not layer.merged and torch.equal(layer.base_layer.weight.data, packed)


@pytest.mark.parametrize("variant", ["bat", "standard"])
def test_an_eval_forward_that_repacks_the_4bit_weight_for_the_cpu_kernel_changes_nothing(variant):
    """In eval mode without grad, bitsandbytes repacks a 4-bit weight into its CPU kernel's
    layout (on CPUs with AVX512-BF16): bat and merge must still read the weight it stands for."""
    ours, theirs = ours_and_peft("nf4", variant)
    weight = dequantized(ours, 0)
    x = torch.randn(5, IN)
    ours.eval()
    with torch.no_grad():
        first = ours(x)
        torch.testing.assert_close(ours(x), first)
        # the repack stores the block scales in bfloat16 (bitsandbytes' own rounding, ~2^-9)
        assert M.relative_error(dequantized(ours, 0), weight) < 4e-3
        theirs.eval()  # the same bitsandbytes kernel (its CPU kernels round differently)
        torch.testing.assert_close(first, theirs(x), rtol=1e-4, atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours.merge_adapter()
        assert M.relative_error(ours(x), first) < 0.3


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("variant", ["standard", "mini"])
def test_training_after_an_eval_forward_that_repacked_the_4bit_weight(variant, bias):
    """Evaluate, then train (Trainer with eval_strategy does): with a bias, bitsandbytes'
    repacked weight fails its training forward (under PEFT too); without one, it runs its
    inference kernel, through which no gradient reaches x, so the blocks of earlier layers get
    wrong gradients (29% off here). miss_ext unpacks it first: the gradients are those of a
    layer that was never repacked (up to the repack's bfloat16 block scales)."""
    ours, _ = ours_and_peft("nf4", variant)
    never_repacked, _ = ours_and_peft("nf4", variant)
    if not bias:
        for model in (ours, never_repacked):
            for i in (0, 2):
                model.get_base_model()[i].base_layer.bias = None
    x = torch.randn(5, IN)
    ours.eval()
    with torch.no_grad():
        ours(x)
    assert ours.get_base_model()[0].base_layer.weight.quant_state.packing_format_for_cpu or \
        not ours.get_base_model()[0].base_layer.support_avx512bf16_for_cpu
    ours.train()
    y, grads = step(ours, x)
    y_expected, grads_expected = step(never_repacked, x)
    assert M.relative_error(y, y_expected) < 4e-3
    for name in grads:
        assert M.relative_error(grads[name], grads_expected[name]) < 1e-2, name
