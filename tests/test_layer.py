"""MissLinear, the user layer: several named adapters (each with its own variant) on one
nn.Linear, checked against the float64 math of docs/spec.md (miss_ext.reference), plus
set_adapter / disable / delete / merge / unmerge, dtypes, dropout, the reference backend and
bad input (a clear error and an unchanged layer).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import miss_ext
from miss_ext import MissLinear, reference

from conftest import assert_close_to_oracle, bat_block, generator, rand
from models import same_bits

IN, OUT = 24, 16

# name -> (r, mini_r, dropout, init_weights). "std" has in % r != 0; "bat2" composes with "bat".
ADAPTERS = {
    "std": (5, 1, 0.0, True),
    "mini": (4, 4, 0.0, "mini"),
    "bat": (8, 1, 0.0, "bat"),
    "rand": (6, 1, 0.0, False),
    "bat2": (4, 1, 0.0, "bat"),
}

SUBSETS = (
    ["std"], ["mini"], ["bat"], ["rand"],
    ["std", "mini"],
    ["mini", "rand", "std"],
    ["bat", "std"],
    ["std", "bat"],
    ["bat", "bat2"],
    ["bat2", "bat", "mini", "std", "rand"],
)


def set_random_block(layer: MissLinear, name: str, seed: int) -> None:
    """Non-zero random values (a zero block hides bugs); BAT blocks stay well conditioned."""
    block = layer.miss_block[name]
    gen = generator(seed)
    with torch.no_grad():
        if block.dim() == 3:
            block.copy_(bat_block(OUT, block.shape[-1], dtype=block.dtype, gen=gen, scale=0.3))
        else:
            block.copy_(rand(block.shape, dtype=block.dtype, gen=gen, scale=0.5))


def make_layer(names=tuple(ADAPTERS), dtype=torch.float32, bias=True, backend="kernels", seed=0,
               block_dtype=None) -> MissLinear:
    gen = generator(seed)
    base = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        base.weight.copy_(rand((OUT, IN), gen=gen, scale=1 / math.sqrt(IN)))
        if bias:
            base.bias.copy_(rand((OUT,), gen=gen))
    base = base.to(dtype)
    base.requires_grad_(False)
    first, *rest = names
    layer = MissLinear(base, first, *ADAPTERS[first], block_dtype=block_dtype, backend=backend)
    for name in rest:
        layer.update_layer(name, *ADAPTERS[name], block_dtype=block_dtype)
    for i, name in enumerate(names):
        if ADAPTERS[name][3] is not False:  # init_weights=False keeps its kaiming values
            set_random_block(layer, name, 100 + i)
    return layer


def expected(layer: MissLinear, x: torch.Tensor, names, float64: bool = True) -> torch.Tensor:
    """SPEC sec. 1/4 for the active ``names`` (no dropout): BAT adapters transform W in order,
    standard/mini add their contributions. float64=True: the oracle; False: the same math in
    the layer's own dtypes (PEFT's casts), the same-precision side of the accuracy rule."""
    cast = (lambda t: None if t is None else t.detach().to(torch.float64)) if float64 else (
        lambda t: None if t is None else t.detach())
    weight, bias, xx = cast(layer.base_layer.weight), cast(layer.base_layer.bias), cast(x)
    bats = [n for n in names if layer.miss_variant[n] == "bat"]
    shards = [n for n in names if layer.miss_variant[n] != "bat"]
    for name in bats:
        weight = reference.bat_weight(weight, cast(layer.miss_block[name]))
    if float64:
        y = F.linear(xx, weight, bias)
    else:  # the reference's mixed-dtype rules
        y = F.linear(xx.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
    for name in shards:
        y = y + reference.shard_delta(xx, cast(layer.miss_block[name]), OUT)
    return y.to(torch.float64 if float64 else x.dtype)


def check_forward(layer, x, names, what=""):
    y = layer(x)
    assert y.dtype == x.dtype
    assert_close_to_oracle(y, expected(layer, x, names), expected(layer, x, names, float64=False),
                           what=what or f"forward {names}")
    return y


def layer_state(layer: MissLinear) -> dict:
    return {
        "blocks": {k: v.detach().clone() for k, v in layer.miss_block.items()},
        "grad": {k: v.requires_grad for k, v in layer.miss_block.items()},
        "weight": layer.base_layer.weight.detach().clone(),
        "bias": None if layer.base_layer.bias is None else layer.base_layer.bias.detach().clone(),
        "active": layer.active_adapters,
        "merged": list(layer.merged_adapters),
        "tables": copy.deepcopy((layer.miss_r, layer.miss_mini_r, layer.miss_dropout, layer.miss_variant)),
        "disabled": layer.disable_adapters,
    }


def assert_layer_unchanged(layer: MissLinear, before: dict) -> None:
    after = layer_state(layer)
    assert after["blocks"].keys() == before["blocks"].keys(), "adapters changed"
    for k in before["blocks"]:
        assert same_bits(after["blocks"][k], before["blocks"][k]), f"block {k} changed"
    assert same_bits(after["weight"], before["weight"]), "base weight changed"
    if before["bias"] is not None:
        assert same_bits(after["bias"], before["bias"]), "bias changed"
    for key in ("grad", "active", "merged", "tables", "disabled"):
        assert after[key] == before[key], f"{key} changed: {before[key]} -> {after[key]}"


@pytest.fixture
def x():
    return rand((3, 5, IN), gen=generator(7))


# ---------------------------------------------------------------------------------------
# Construction and forward


def test_adapters_have_their_own_variant_and_shape():
    layer = make_layer()
    assert layer.miss_variant == {"std": "standard", "mini": "mini", "bat": "bat", "rand": "standard",
                                  "bat2": "bat"}
    assert tuple(layer.miss_block["std"].shape) == (5, OUT)
    assert tuple(layer.miss_block["mini"].shape) == (4, 4)
    assert tuple(layer.miss_block["bat"].shape) == (OUT // 8, 8, 8)
    assert tuple(layer.miss_block["bat2"].shape) == (OUT // 4, 4, 4)
    assert tuple(layer.miss_block["rand"].shape) == (6, OUT)
    assert layer.miss_r == {"std": 5, "mini": 4, "bat": 8, "rand": 6, "bat2": 4}
    assert layer.miss_mini_r["mini"] == 4
    # only the first adapter is active (PEFT: added adapters are inactive until set_adapter)
    assert layer.active_adapters == ["std"] and layer.active_adapter == "std"
    assert layer.in_features == IN and layer.out_features == OUT
    assert layer.weight is layer.base_layer.weight and layer.get_base_layer() is layer.base_layer


def test_added_adapter_is_inactive_and_frozen():
    """PEFT's MissLayer.update_layer ends with set_adapter(active_adapters): an added adapter
    is neither active nor trainable until set_adapter."""
    layer = make_layer(names=("std", "mini", "bat"))
    assert layer.active_adapters == ["std"]
    assert {k: v.requires_grad for k, v in layer.miss_block.items()} == {"std": True, "mini": False, "bat": False}


def test_new_blocks_init():
    base = nn.Linear(IN, OUT)
    layer = MissLinear(base, "a", r=4)
    layer.update_layer("b", 4, 4, 0.0, "mini")
    layer.update_layer("c", 8, 1, 0.0, "bat")
    layer.update_layer("d", 4, 1, 0.0, False)
    for name in "abc":
        assert not layer.miss_block[name].any(), f"{name}: zeros expected"
    assert layer.miss_block["d"].abs().min() > 0  # kaiming uniform, non-zero
    assert layer.miss_block["d"].std() > 0.01
    x = rand((4, IN))
    layer.set_adapter(["a", "b", "c"])
    assert torch.allclose(layer(x), base(x), atol=1e-6)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_forward_single_adapter(name, x):
    layer = make_layer()
    layer.set_adapter(name)
    assert layer.active_adapters == [name]
    check_forward(layer, x, [name])
    # a 2-D input and a non-contiguous view give the same math
    check_forward(layer, x[0], [name], what="2-D x")
    check_forward(layer, x.transpose(0, 1), [name], what="transposed x")


@pytest.mark.parametrize("names", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_forward_active_subsets(names, x):
    layer = make_layer()
    layer.set_adapter(names)
    assert layer.active_adapters == list(names)
    assert {k for k, v in layer.miss_block.items() if v.requires_grad} == set(names)
    check_forward(layer, x, names)


def test_forward_grads_match_float64(x):
    layer = make_layer()
    names = ["bat", "std", "mini"]
    layer.set_adapter(names)
    xl = x.clone().requires_grad_(True)
    y = layer(xl)
    g = rand(y.shape, gen=generator(11))
    y.backward(g)
    # float64 autograd of the same math
    blocks64 = {n: layer.miss_block[n].detach().double().requires_grad_(True) for n in names}
    x64 = x.double().requires_grad_(True)
    w = layer.base_layer.weight.double()
    w = reference.bat_weight(w, blocks64["bat"])
    y64 = F.linear(x64, w, layer.base_layer.bias.double())
    for n in ("std", "mini"):
        y64 = y64 + reference.shard_delta(x64, blocks64[n], OUT)
    y64.backward(g.double())
    for n in names:
        got, want = layer.miss_block[n].grad, blocks64[n].grad
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), n
    assert torch.allclose(xl.grad.double(), x64.grad, rtol=1e-5, atol=1e-5 * x64.grad.abs().max().item())
    assert layer.miss_block["rand"].grad is None and layer.miss_block["bat2"].grad is None


def test_disabled_layer_is_exactly_base(x):
    layer = make_layer()
    layer.set_adapter(["bat", "std", "mini"])
    base_y = layer.base_layer(x)
    layer.enable_adapters(False)
    assert layer.disable_adapters
    assert not any(p.requires_grad for p in layer.miss_block.values())
    assert torch.equal(layer(x), base_y)
    layer.enable_adapters(True)
    assert not layer.disable_adapters
    assert layer.active_adapters == ["bat", "std", "mini"]
    assert {k for k, v in layer.miss_block.items() if v.requires_grad} == {"bat", "std", "mini"}
    check_forward(layer, x, ["bat", "std", "mini"])


def test_no_active_adapter_is_base(x):
    layer = make_layer()
    layer.set_adapter([])
    assert torch.equal(layer(x), layer.base_layer(x))


def test_delete_adapter(x):
    layer = make_layer()
    layer.set_adapter(["std", "mini"])
    layer.delete_adapter("mini")
    assert "mini" not in layer.miss_block
    for table in (layer.miss_r, layer.miss_mini_r, layer.miss_dropout, layer.miss_variant):
        assert "mini" not in table
    assert not any("mini" in k for k in layer.state_dict())
    assert layer.active_adapters == ["std"]
    check_forward(layer, x, ["std"])
    # deleting an inactive adapter keeps the active one
    layer.delete_adapter("bat2")
    assert layer.active_adapters == ["std"]
    # deleting the last active adapter activates a remaining one (PEFT does the same)
    layer.delete_adapter("std")
    assert len(layer.active_adapters) == 1 and layer.active_adapters[0] in layer.miss_block
    check_forward(layer, x, layer.active_adapters)
    before = layer_state(layer)
    with pytest.raises(ValueError, match="nope"):
        layer.delete_adapter("nope")
    assert_layer_unchanged(layer, before)


def test_delete_merged_adapter_refused(x):
    layer = make_layer()
    layer.merge(adapter_names=["std"])
    before = layer_state(layer)
    with pytest.raises(ValueError, match="std"):
        layer.delete_adapter("std")
    assert_layer_unchanged(layer, before)


def test_repr_is_readable():
    layer = make_layer()
    text = repr(layer)
    assert text.startswith("MissLinear(") or "MissLinear" in text.splitlines()[0]
    for piece in ("in_features=24", "out_features=16", "std", "mini", "bat", "rand", "standard", "r=5", "r=8",
                  "mini_r=4"):
        assert piece in text, (piece, text)
    assert "Linear(in_features=24, out_features=16" in text  # the base layer is shown too
    layer.merge()
    assert "merged" in repr(layer)


# ---------------------------------------------------------------------------------------
# Merge


@pytest.mark.parametrize("names", SUBSETS, ids=["+".join(s) for s in SUBSETS])
@pytest.mark.parametrize("safe", [False, True], ids=["plain", "safe_merge"])
def test_merge_unmerge(names, safe, x):
    layer = make_layer()
    layer.set_adapter(names)
    w0 = layer.base_layer.weight.detach().clone()
    y_unmerged = layer(x)
    layer.merge(safe_merge=safe)
    assert layer.merged and sorted(layer.merged_adapters) == sorted(names)
    # the merged weight is the float64 math: BATs in order, then the standard/mini deltas
    w = w0.double()
    for n in names:
        if layer.miss_variant[n] == "bat":
            w = reference.merged(w, layer.miss_block[n].detach())
    for n in names:
        if layer.miss_variant[n] != "bat":
            w = reference.merged(w, layer.miss_block[n].detach())
    merged_w = layer.base_layer.weight.detach()
    assert torch.allclose(merged_w.double(), w, rtol=1e-5, atol=1e-6 * w.abs().max().item()), \
        (merged_w.double() - w).abs().max()
    y_merged = layer(x)
    assert torch.allclose(y_merged, y_unmerged, rtol=1e-5, atol=1e-5 * y_unmerged.abs().max().item())
    assert torch.equal(y_merged, layer.base_layer(x))
    layer.unmerge()
    assert not layer.merged and layer.merged_adapters == []
    back = layer.base_layer.weight.detach()
    assert torch.allclose(back, w0, rtol=1e-5, atol=1e-5 * w0.abs().max().item()), (back - w0).abs().max()
    assert torch.allclose(layer(x), y_unmerged, rtol=1e-5, atol=1e-5 * y_unmerged.abs().max().item())


def test_merge_named_subset_of_inactive_adapters(x):
    layer = make_layer()  # active: std
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge(adapter_names=["mini", "rand"])
    assert sorted(layer.merged_adapters) == ["mini", "rand"]
    want = reference.merged(reference.merged(w0, layer.miss_block["mini"].detach()), layer.miss_block["rand"].detach())
    assert torch.allclose(layer.base_layer.weight.double(), want, atol=1e-6)
    # merging an adapter twice warns and does nothing more
    with pytest.warns(UserWarning):
        layer.merge(adapter_names=["mini"])
    assert sorted(layer.merged_adapters) == ["mini", "rand"]
    assert torch.allclose(layer.base_layer.weight.double(), want, atol=1e-6)
    layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)
    with pytest.warns(UserWarning):
        layer.unmerge()  # nothing to do


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_get_delta_weight_is_merged_minus_weight(name):
    layer = make_layer()
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight(name)
    assert delta.shape == w0.shape and delta.dtype == torch.float32
    assert torch.equal(layer.base_layer.weight, w0), "get_delta_weight must not touch the weight"
    want = reference.merged(w0, layer.miss_block[name].detach()) - w0.double()
    assert torch.allclose(delta.double(), want, atol=1e-6), (delta.double() - want).abs().max()
    layer.merge(adapter_names=[name])
    assert torch.allclose(layer.base_layer.weight - w0, delta, atol=1e-6)


def test_disabled_forward_unmerges(x):
    layer = make_layer()
    layer.set_adapter(["std", "bat"])
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.enable_adapters(False)
    y = layer(x)  # PEFT: a disabled layer unmerges and runs the base layer
    assert not layer.merged
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-5)
    assert torch.equal(y, layer.base_layer(x))


def test_merge_bat_on_merged_standard_refused(x):
    layer = make_layer()
    layer.merge(adapter_names=["std"])
    before = layer_state(layer)
    with pytest.raises(ValueError, match="bat"):
        layer.merge(adapter_names=["bat"])
    assert_layer_unchanged(layer, before)
    with pytest.raises(ValueError, match="bat"):
        layer.merge(adapter_names=["bat", "mini"])
    assert_layer_unchanged(layer, before)


@pytest.mark.parametrize("name", ["std", "mini", "bat"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_safe_merge_refuses_non_finite(name, bad):
    layer = make_layer()
    with torch.no_grad():
        layer.miss_block[name].view(-1)[3] = bad
    before = layer_state(layer)
    with pytest.raises((ValueError, RuntimeError)):
        layer.merge(safe_merge=True, adapter_names=[name])
    assert_layer_unchanged(layer, before)
    assert not layer.merged


def test_safe_merge_failure_after_a_good_adapter_is_consistent():
    layer = make_layer()
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.miss_block["mini"].view(-1)[0] = float("nan")
    with pytest.raises((ValueError, RuntimeError)):
        layer.merge(safe_merge=True, adapter_names=["std", "mini"])
    assert "mini" not in layer.merged_adapters
    assert torch.isfinite(layer.base_layer.weight).all()
    if layer.merged:
        layer.unmerge()
    assert torch.allclose(layer.base_layer.weight, w0, atol=1e-6)


def test_singular_bat_unmerge_refused():
    layer = make_layer()
    with torch.no_grad():
        layer.miss_block["bat"][1] = -torch.eye(8)  # I + B_1 singular
    layer.merge(adapter_names=["bat"])
    before = layer_state(layer)
    with pytest.raises((ValueError, RuntimeError)):
        layer.unmerge()
    assert_layer_unchanged(layer, before)
    assert layer.merged_adapters == ["bat"]


def test_merge_unknown_adapter_refused():
    layer = make_layer()
    before = layer_state(layer)
    with pytest.raises(ValueError, match="nope"):
        layer.merge(adapter_names=["std", "nope"])
    assert_layer_unchanged(layer, before)
    with pytest.raises(ValueError, match="nope"):
        layer.get_delta_weight("nope")


# ---------------------------------------------------------------------------------------
# Dtypes (SPEC sec. 3)


@pytest.mark.parametrize("names", [["std"], ["mini"], ["bat"], ["bat", "std", "mini"]],
                         ids=["std", "mini", "bat", "bat+std+mini"])
def test_bf16_base_fp32_block(names, x):
    layer = make_layer(dtype=torch.bfloat16)
    for block in layer.miss_block.values():
        assert block.dtype == torch.float32, "PEFT's default: fp32 adapters on a bf16 model"
    layer.set_adapter(names)
    xb = x.to(torch.bfloat16)
    y = check_forward(layer, xb, names)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    for n in names:
        assert layer.miss_block[n].grad.dtype == torch.float32
    # merge in bf16 (fp32 math, rounded once) keeps the dtype and gives the same forward
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        y0 = layer(xb)
        layer.merge()
        w_merged = layer.base_layer.weight.detach().clone()
        assert layer.base_layer.weight.dtype == torch.bfloat16
        y1 = layer(xb)
        scale = y0.float().abs().max().item()
        assert (y1.float() - y0.float()).abs().max().item() <= 0.05 * scale
        layer.unmerge()
    if "bat" not in names:
        # standard/mini: within 1 bf16 ulp, measured at the larger of |W| and |W merged| (the
        # merged weight is stored in bf16, so its rounding bounds what unmerge can recover)
        ulp = torch.finfo(torch.bfloat16).eps * torch.maximum(w0.float().abs(), w_merged.float().abs())
        assert ((layer.base_layer.weight.float() - w0.float()).abs() <= ulp).all()


def test_output_dtype_is_x_dtype(x):
    layer = make_layer(dtype=torch.bfloat16)
    layer.set_adapter(["std", "mini"])
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    layer32 = make_layer()
    layer32.set_adapter(["std", "bat"])
    assert layer32(x).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_block_on_low_precision_layer(dtype, x):
    layer = make_layer(dtype=dtype, block_dtype=dtype)
    assert all(b.dtype == dtype for b in layer.miss_block.values())
    names = ["bat", "std", "mini", "rand"]
    layer.set_adapter(names)
    y = check_forward(layer, x.to(dtype), names)
    assert y.dtype == dtype


def test_explicit_block_dtype(x):
    layer = make_layer(names=("std", "mini"), dtype=torch.float32, block_dtype=torch.bfloat16)
    assert all(b.dtype == torch.bfloat16 for b in layer.miss_block.values())
    layer.set_adapter(["std", "mini"])
    y = check_forward(layer, x, ["std", "mini"])
    assert y.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# Dropout and the reference backend


def dropout_layer(p=0.5, backend="kernels"):
    base = nn.Linear(IN, OUT)
    base.requires_grad_(False)
    layer = MissLinear(base, "d", r=5, miss_dropout=p, backend=backend)
    layer.update_layer("m", 4, 4, p, "mini")
    layer.update_layer("b", 8, 1, p, "bat")
    for i, name in enumerate(("d", "m", "b")):
        set_random_block(layer, name, 50 + i)
    return layer


def test_dropout_only_in_train_mode(x):
    layer = dropout_layer()
    layer.set_adapter(["d", "m"])
    layer.eval()
    y_eval = check_forward(layer, x, ["d", "m"], what="eval: no dropout")
    assert torch.equal(layer(x), y_eval)
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    y1_again = layer(x)
    y2 = layer(x)
    assert torch.equal(y1, y1_again), "torch.manual_seed must make dropout reproducible"
    assert not torch.allclose(y1, y_eval), "train mode: dropout changes the output"
    assert not torch.equal(y1, y2), "a new mask each call"
    # the base part is never dropped: disabling the adapters in train mode gives base(x)
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_bat_applies_no_dropout(x):
    layer = dropout_layer(p=0.5)
    layer.set_adapter("b")
    layer.train()
    y_train = layer(x)
    layer.eval()
    y_eval = layer(x)
    assert torch.allclose(y_train, y_eval, atol=1e-6)


@pytest.mark.parametrize("names", [["d"], ["m"], ["b"], ["b", "d", "m"]], ids=["std", "mini", "bat", "all"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_reference_backend_matches_kernels(names, train, x):
    kernels = dropout_layer(p=0.3)
    ref = copy.deepcopy(kernels)
    ref.backend = "reference"
    assert ref.backend == "reference" and "reference" in repr(ref)
    outs = []
    for layer in (kernels, ref):
        layer.set_adapter(names)
        layer.train(train)
        xl = x.clone().requires_grad_(True)
        torch.manual_seed(123)
        y = layer(xl)
        y.backward(rand(y.shape, gen=generator(5)))
        outs.append((y.detach(), xl.grad, {n: layer.miss_block[n].grad for n in names}))
    (yk, gxk, gbk), (yr, gxr, gbr) = outs
    tol = dict(rtol=1e-5, atol=1e-5)
    assert torch.allclose(yk, yr, **tol), (yk - yr).abs().max()
    assert torch.allclose(gxk, gxr, **tol), (gxk - gxr).abs().max()
    for n in names:
        assert torch.allclose(gbk[n], gbr[n], rtol=1e-5, atol=1e-5 * gbr[n].abs().max().item()), n


def test_backend_value_checked():
    with pytest.raises(ValueError, match="backend"):
        MissLinear(nn.Linear(IN, OUT), "a", r=4, backend="cuda-magic")


# ---------------------------------------------------------------------------------------
# Bad input: a clear error, the layer unchanged


@pytest.mark.parametrize("module", [nn.Conv1d(4, 4, 3), nn.Embedding(10, 4), nn.Sequential(nn.Linear(4, 4))],
                         ids=["conv1d", "embedding", "sequential"])
def test_non_linear_base_refused(module):
    with pytest.raises(TypeError, match="Linear"):
        MissLinear(module, "a", r=2)


@pytest.mark.parametrize(
    "args, words",
    [
        (("x", IN + 1, 1, 0.0, True), ["r", str(IN + 1), str(IN)]),          # r > in_features
        (("x", 0, 1, 0.0, True), ["r"]),
        (("x", -2, 1, 0.0, True), ["r"]),
        (("x", 5, 1, 0.0, "bat"), ["r", "5", str(IN)]),                      # bat: in % r != 0
        (("x", 3, 1, 0.0, "bat"), ["r", "3"]),                               # 24 % 3 == 0, 16 % 3 != 0
        (("x", 4, 3, 0.0, "mini"), ["mini_r", "3", str(OUT)]),               # out % mini_r != 0
        (("x", 4, 0, 0.0, "mini"), ["mini_r"]),
        (("x", 4, 1, 1.5, True), ["miss_dropout"]),
        (("x", 4, 1, -0.1, True), ["miss_dropout"]),
        (("x", 4, 1, 0.0, "balance"), ["init_weights"]),
        (("std", 4, 1, 0.0, True), ["std", "exists"]),                       # duplicate name
        (("", 4, 1, 0.0, True), ["adapter_name"]),
    ],
    ids=["r>in", "r=0", "r<0", "bat-in%r", "bat-out%r", "mini-out%mini_r", "mini_r=0", "dropout>1", "dropout<0",
         "init_weights", "duplicate", "empty-name"],
)
def test_bad_update_layer_leaves_layer_unchanged(args, words, x):
    layer = make_layer()
    layer.set_adapter(["std", "bat"])
    y0 = layer(x)
    before = layer_state(layer)
    with pytest.raises(ValueError) as info:
        layer.update_layer(*args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert_layer_unchanged(layer, before)
    assert torch.equal(layer(x), y0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(r=IN + 1), dict(r=5, init_weights="bat"), dict(r=4, mini_r=3, init_weights="mini"), dict(r=0)],
    ids=["r>in", "bat-in%r", "mini-out%mini_r", "r=0"],
)
def test_bad_constructor_leaves_base_unchanged(kwargs):
    base = nn.Linear(IN, OUT)
    w, b = base.weight.detach().clone(), base.bias.detach().clone()
    with pytest.raises(ValueError):
        MissLinear(base, "a", **kwargs)
    assert torch.equal(base.weight, w) and torch.equal(base.bias, b)
    assert base.weight.requires_grad


def test_set_adapter_unknown_refused(x):
    layer = make_layer()
    layer.set_adapter(["std", "mini"])
    before = layer_state(layer)
    with pytest.raises(ValueError, match="nope"):
        layer.set_adapter(["std", "nope"])
    assert_layer_unchanged(layer, before)
    with pytest.raises(ValueError, match="nope"):
        layer.set_adapter("nope")
    assert_layer_unchanged(layer, before)
    check_forward(layer, x, ["std", "mini"])


def test_wrong_input_width_refused():
    layer = make_layer()
    layer.set_adapter(["std", "mini"])
    with pytest.raises((ValueError, RuntimeError)):
        layer(rand((3, IN + 1)))
    layer.set_adapter("bat")
    with pytest.raises((ValueError, RuntimeError)):
        layer(rand((3, IN - 1)))


def test_integer_input_refused():
    layer = make_layer()
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        layer(torch.ones(3, IN, dtype=torch.int64))


def test_state_dict_layout_matches_peft():
    """PEFT's attribute layout: base_layer.weight/bias and miss_block.<adapter>."""
    layer = make_layer(names=("std", "mini"))
    assert set(layer.state_dict()) == {"base_layer.weight", "base_layer.bias", "miss_block.std", "miss_block.mini"}
    assert MissLinear.adapter_layer_names == ("miss_block",)
