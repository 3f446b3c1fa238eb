"""Helpers of the MissLinear tests (tests/test_layer*.py): a layer with several named adapters
of each variant, its float64 expectation (docs/spec.md, through miss_ext.reference), and a
snapshot of its whole state to show that bad input changed nothing."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

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


def layer_input() -> torch.Tensor:
    """The input of most layer tests: [3, 5, IN], random and non-zero."""
    return rand((3, 5, IN), gen=generator(7))
