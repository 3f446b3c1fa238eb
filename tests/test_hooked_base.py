"""Base layers that are more than a weight: hooks on them, global module hooks, Linear
subclasses with a forward of their own, weights of other tensor types (miss_ext/base_layers.py).

The fused ops read the weight themselves and never call the base layer; that is right only
for a plain nn.Linear without hooks. Everywhere else standard/mini call ``base_layer(x)`` and
add their delta, as PEFT's MissLinear does, and a hook fires exactly as under PEFT (bat, which
replaces the weight, calls the base layer under neither). Before base_layers.py a hook on the
base layer never fired and its effect was lost.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miss_ext import MissConfig, get_miss_model
from miss_ext.base_layers import reads_weight_directly, where_weight_lives

import models as M
from integration_helpers import CastLog

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TARGETS = ["proj_in", "fc1", "fc2"]
VARIANTS = {
    "standard": dict(r=5, init_weights=True),
    "mini": dict(r=4, mini_r=4, init_weights="mini"),
    "bat": dict(r=8, init_weights="bat"),
    "random": dict(r=6, init_weights=False),
}
HOOKED = ["proj_in", "layers.0.fc1", "layers.1.fc2"]


class Counter:
    """Hooks that change what flows (half the input, one added to the output) and count."""

    def __init__(self):
        self.calls = {"pre": 0, "forward": 0, "backward": 0}

    def pre(self, module, args):
        self.calls["pre"] += 1
        return (args[0] * 0.5,)

    def forward(self, module, args, output):
        self.calls["forward"] += 1
        return output + 1.0

    def backward(self, module, grad_input, grad_output):
        self.calls["backward"] += 1


def hooked_mlp(counter: Counter) -> nn.Module:
    model = M.make_mlp(seed=0)
    for name in HOOKED:
        layer = model.get_submodule(name)
        layer.register_forward_pre_hook(counter.pre)
        layer.register_forward_hook(counter.forward)
        layer.register_full_backward_hook(counter.backward)
    return model


def ours_and_peft(variant: str, make_base):
    """The same base (built twice: hooks hold their own counters) adapted by miss_ext and by
    PEFT, with the same random non-zero blocks."""
    config = MissConfig(target_modules=TARGETS, **VARIANTS[variant])
    ours = get_miss_model(make_base("ours"), config)
    M.randomize_blocks(ours, seed=5, scale=0.3)
    theirs = peft.get_peft_model(make_base("peft"), peft.MissConfig(target_modules=TARGETS, **VARIANTS[variant]))
    M.copy_blocks_to_peft(ours, theirs)
    return ours, theirs


def run_step(model: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().mean().backward()
    grads = {M.strip(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_hook_on_the_base_layer_fires_as_under_peft_with_equal_outputs_and_gradients(variant):
    counters = {"ours": Counter(), "peft": Counter()}
    ours, theirs = ours_and_peft(variant, lambda who: hooked_mlp(counters[who]))
    x = M.mlp_input()
    y, dx, grads = run_step(ours, x)
    y_peft, dx_peft, grads_peft = run_step(theirs, x)
    assert counters["ours"].calls == counters["peft"].calls
    fires = 0 if variant == "bat" else len(HOOKED)  # bat replaces the weight: PEFT never calls the layer
    assert counters["ours"].calls == {"pre": fires, "forward": fires, "backward": fires}
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_peft, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_peft.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], grads_peft[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["standard", "mini"])
def test_a_global_module_hook_sees_the_base_layers_called_as_under_peft(variant):
    seen = {"ours": [], "peft": []}
    who = ["ours"]

    def record(module, args, output):
        if type(module) is nn.Linear:
            seen[who[0]].append(tuple(module.weight.shape))

    ours, theirs = ours_and_peft(variant, lambda _: M.make_mlp(seed=0))
    x = M.mlp_input()
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        y = ours(x)
        who[0] = "peft"
        y_peft = theirs(x)
    finally:
        handle.remove()
    assert seen["ours"] == seen["peft"] and len(seen["ours"]) == 6  # 5 adapted Linears and the head
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)


class DoubledLinear(nn.Linear):
    """A Linear subclass whose forward is its own: the fused op cannot stand in for it."""

    def forward(self, x):
        return 2.0 * F.linear(x, self.weight, self.bias)


def doubled_mlp() -> nn.Module:
    model = M.make_mlp(seed=0)
    for name in HOOKED:
        old = model.get_submodule(name)
        new = DoubledLinear(old.in_features, old.out_features)
        new.load_state_dict(old.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


@pytest.mark.parametrize("variant", ["standard", "mini", "random"])
def test_a_linear_subclass_with_its_own_forward_is_called(variant):
    ours, theirs = ours_and_peft(variant, lambda _: doubled_mlp())
    x = M.mlp_input()
    y, dx, grads = run_step(ours, x)
    y_peft, dx_peft, grads_peft = run_step(theirs, x)
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_peft, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_peft[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_fast_path_is_kept_for_a_plain_linear_and_left_for_a_hooked_one():
    """A plain Linear runs the fused op (no separate base GEMM, no delta op); a hook moves the
    layer to base_layer(x) + shard_delta_add; removing the hook brings the fused op back."""
    model = get_miss_model(M.make_mlp(seed=0), MissConfig(target_modules=["proj_in"], r=4))
    layer = model.base_model.model.proj_in
    x = M.mlp_input()

    def ops_of_forward():
        with CastLog() as log:
            model(x)
        return log.ops

    assert reads_weight_directly(layer.base_layer)
    assert "miss.shard_linear" in ops_of_forward()
    handle = layer.base_layer.register_forward_hook(lambda *args: None)
    assert not reads_weight_directly(layer.base_layer)
    ops = ops_of_forward()
    assert "miss.shard_delta_add" in ops and "miss.shard_linear" not in ops
    handle.remove()
    assert "miss.shard_linear" in ops_of_forward()


class OpaqueParameter(nn.Parameter):
    """A weight type miss_ext knows nothing of (as a quantization library's would be)."""


def opaque_linear() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(16, 32)
    layer.weight = OpaqueParameter(layer.weight.detach().clone(), requires_grad=False)
    return layer


def test_bat_on_a_weight_of_an_unknown_type_is_refused_naming_the_layer_and_the_weight_type():
    layer = opaque_linear()
    assert not reads_weight_directly(layer)
    with pytest.raises(TypeError, match=r"Linear whose weight is a OpaqueParameter .*standard or mini"):
        where_weight_lives(layer)
    model = get_miss_model(nn.Sequential(layer), MissConfig(target_modules=["0"], r=8, init_weights="bat"))
    M.randomize_blocks(model, seed=1, scale=0.3)
    with pytest.raises(TypeError, match="OpaqueParameter"):
        model(torch.randn(3, 16))
    with pytest.raises(TypeError, match="OpaqueParameter"):
        model.merge_adapter()
    assert not model.base_model.model[0].merged


def test_standard_on_a_weight_of_an_unknown_type_calls_the_layer():
    ours = get_miss_model(nn.Sequential(opaque_linear()), MissConfig(target_modules=["0"], r=4))
    M.randomize_blocks(ours, seed=1, scale=0.3)
    plain = nn.Sequential(nn.Linear(16, 32))
    plain[0].load_state_dict({k: v.detach().clone() for k, v in ours.base_model.model[0].base_layer.state_dict().items()})
    expected = get_miss_model(plain, MissConfig(target_modules=["0"], r=4))
    M.copy_blocks_to_peft(ours, expected)
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), expected(x))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_layers_on_miss_kernels_keep_the_hooks_of_their_base_layers(variant):
    """use_miss_kernels runs PEFT's own forward wherever the fused op cannot stand in for the
    base layer, so a hook fires as under PEFT (it never fired before base_layers.py)."""
    from miss_ext.integrations.peft import use_miss_kernels

    counters = {"kernels": Counter(), "peft": Counter()}
    models = {}
    for who in counters:
        models[who] = peft.get_peft_model(hooked_mlp(counters[who]),
                                          peft.MissConfig(target_modules=TARGETS, **VARIANTS[variant]))
        M.randomize_blocks(models[who], seed=5, scale=0.3)
    use_miss_kernels(models["kernels"])
    x = M.mlp_input()
    y, dx, grads = run_step(models["kernels"], x)
    y_peft, dx_peft, grads_peft = run_step(models["peft"], x)
    assert counters["kernels"].calls == counters["peft"].calls
    torch.testing.assert_close(y, y_peft, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_peft, rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_peft[name], rtol=1e-4, atol=1e-6, msg=name)
