"""miss_ext.integrations.peft: an existing PEFT MiSS model on miss_ext's kernels with one
call (use_miss_kernels) and back (restore_peft_forward), its state_dict untouched and its
outputs and gradients PEFT's within rounding; conversions PEFT -> MissModel -> PEFT.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from miss_ext import MissConfig, MissModel, get_miss_model
from miss_ext.integrations.peft import (
    miss_model_to_peft,
    peft_to_miss_model,
    restore_peft_forward,
    use_miss_kernels,
    uses_miss_kernels,
)

import models as M

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

VARIANTS = {
    "standard": dict(init_weights=True),
    "mini": dict(init_weights="mini", mini_r=4),
    "bat": dict(init_weights="bat"),
}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.namespace)
        return func(*args, **(kwargs or {}))


def assert_close(ours, theirs, rel=1e-5, what=""):
    ours, theirs = ours.detach().double(), theirs.detach().double()
    assert ours.shape == theirs.shape, what
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert err <= rel * max(scale, 1e-12), f"{what}: max error {err:.3e} > {rel:.1e} * {scale:.3e}"


def peft_model(variant="standard", dtype=torch.float32, seed=0, **overrides):
    values = dict(r=8, target_modules="all-linear", **VARIANTS[variant])
    values.update(overrides)
    model = peft.get_peft_model(M.make_llama(dtype=dtype), peft.MissConfig(**values))
    M.randomize_blocks(model, seed=seed, scale=0.2)
    return model


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert M.same_bits(a[key], b[key]), key


def block_grads(model, tokens, seed=0):
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    M.forward(model, "llama", tokens).float().square().mean().backward()
    return {M.strip(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------
# use_miss_kernels / restore_peft_forward


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_call_runs_a_peft_model_on_the_kernels_and_one_call_undoes_it(variant):
    model = peft_model(variant).eval()
    tokens = M.token_input()
    before = state(model)
    with OpLog() as log:
        expected = M.run(model, "llama", tokens)
    assert "miss" not in log.ops

    layers = use_miss_kernels(model)
    assert layers == 14 and uses_miss_kernels(model)
    assert use_miss_kernels(model) == 14  # idempotent
    with OpLog() as log:
        got = M.run(model, "llama", tokens)
    assert "miss" in log.ops, "the kernels did not run"
    assert_close(got, expected, what="output")
    assert_same_state(state(model), before)

    model.train()
    kernel_grads = block_grads(model, tokens)
    assert restore_peft_forward(model) == 14 and not uses_miss_kernels(model)
    peft_grads = block_grads(model, tokens)
    assert kernel_grads.keys() == peft_grads.keys() and kernel_grads
    for name in peft_grads:
        assert_close(kernel_grads[name], peft_grads[name], rel=1e-4, what=f"grad {name}")
    model.eval()
    with OpLog() as log:
        assert torch.equal(M.run(model, "llama", tokens), expected)
    assert "miss" not in log.ops
    assert_same_state(state(model), before)


def test_a_model_from_peft_from_pretrained(tmp_path):
    trained = peft_model("mini")
    trained.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(M.make_llama(), str(tmp_path))
    tokens = M.token_input()
    expected = M.run(loaded, "llama", tokens)
    before = state(loaded)
    use_miss_kernels(loaded)
    assert_close(M.run(loaded, "llama", tokens), expected)
    assert_same_state(state(loaded), before)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_several_active_adapters_as_peft_combines_them(variant):
    model = peft_model(variant)
    model.add_adapter("second", peft.MissConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                **{**VARIANTS[variant], "mini_r": 2} if variant == "mini"
                                                else VARIANTS[variant]))
    M.randomize_blocks(model, "second", seed=3, scale=0.2)
    model.base_model.set_adapter(["default", "second"])
    model.eval()
    tokens = M.token_input()
    expected = M.run(model, "llama", tokens)
    use_miss_kernels(model)
    assert_close(M.run(model, "llama", tokens), expected, what="two adapters")
    model.base_model.set_adapter("second")
    restore_peft_forward(model)
    expected = M.run(model, "llama", tokens)
    use_miss_kernels(model)
    assert_close(M.run(model, "llama", tokens), expected, what="the second adapter alone")


def test_disabled_and_merged_states_behave_as_in_peft():
    model = peft_model("standard").eval()
    tokens = M.token_input()
    with model.disable_adapter():
        base = M.run(model, "llama", tokens)
    adapted = M.run(model, "llama", tokens)
    use_miss_kernels(model)
    with model.disable_adapter():
        assert torch.equal(M.run(model, "llama", tokens), base)
    model.merge_adapter()
    assert_close(M.run(model, "llama", tokens), adapted, rel=1e-4, what="merged")
    model.unmerge_adapter()
    assert_close(M.run(model, "llama", tokens), adapted, what="unmerged")


def test_dropout_follows_peft_modules_and_matches_miss_ext_given_the_seed():
    """PEFT's nn.Dropout in training mode means dropout (eval: none); the masks are
    miss_ext's, the very masks a converted MissModel draws with the same torch.manual_seed."""
    model = peft_model("standard", miss_dropout=0.3)
    twin = copy.deepcopy(model)
    use_miss_kernels(model)
    ours = peft_to_miss_model(twin)
    tokens = M.token_input()
    model.eval()
    ours.eval()
    evaluated = M.run(model, "llama", tokens)
    assert_close(evaluated, M.run(ours, "llama", tokens))
    model.train()
    ours.train()
    torch.manual_seed(11)
    dropped = M.run(model, "llama", tokens)
    torch.manual_seed(11)
    assert_close(dropped, M.run(ours, "llama", tokens))
    assert not torch.allclose(dropped, evaluated)
    grads, our_grads = block_grads(model, tokens, seed=4), block_grads(ours, tokens, seed=4)
    for name in grads:
        assert_close(our_grads[name], grads[name], rel=1e-4, what=name)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_model_with_fp32_adapters(variant):
    model = peft_model(variant, dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "miss_block" in n)
    oracle = peft.get_peft_model(M.make_llama().to(torch.bfloat16).float(),
                                 copy.deepcopy(model.peft_config["default"]))
    oracle.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    tokens = M.token_input()
    theirs = M.run(model, "llama", tokens)
    use_miss_kernels(model)
    ours = M.run(model, "llama", tokens)
    reference = M.run(oracle.eval(), "llama", tokens)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    err_ours, err_theirs = M.relative_error(ours, reference), M.relative_error(theirs, reference)
    assert err_ours <= 2 * err_theirs + 4e-3, (err_ours, err_theirs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_under_autocast_the_output_dtype_is_peft_s(variant):
    """PEFT casts a layer's result back to x's dtype, also under autocast; so do we here."""
    model = peft_model(variant).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        theirs = layer(x)
        use_miss_kernels(model)
        ours = layer(x)
    assert ours.dtype == theirs.dtype == torch.float32
    assert_close(ours, theirs, rel=2e-2, what="autocast")


def test_what_peft_rejects_is_still_rejected_by_peft():
    """A mini adapter on a layer whose first adapter is standard: PEFT's forward fails (it
    computes every adapter as the layer's first variant); with the kernels PEFT's forward
    runs and fails alike."""
    model = peft_model("standard")
    model.add_adapter("mini", peft.MissConfig(r=8, target_modules="all-linear", init_weights="mini", mini_r=4))
    model.base_model.set_adapter(["default", "mini"])
    tokens = M.token_input()
    with pytest.raises(RuntimeError) as theirs:
        M.run(model, "llama", tokens)
    use_miss_kernels(model)
    with pytest.raises(RuntimeError) as ours:
        M.run(model, "llama", tokens)
    assert str(ours.value) == str(theirs.value)


def test_without_a_peft_miss_layer_it_says_so():
    with pytest.raises(ValueError, match="no PEFT MiSS layer"):
        use_miss_kernels(M.make_mlp())


# ---------------------------------------------------------------------------------------
# Conversions


def miss_values(model):
    return {M.strip(n, ("base_model.model.",)): p for n, p in model.named_parameters()}


def peft_values(model):
    return {M.strip(n, ("base_model.model.",)): p for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_to_miss_model_and_back(variant):
    model = peft_model(variant)
    model.add_adapter("other", peft.MissConfig(r=8, target_modules=["q_proj"], **VARIANTS[variant]))
    M.randomize_blocks(model, "other", seed=7, scale=0.2)
    model.eval()
    tokens = M.token_input()
    expected = M.run(model, "llama", tokens)
    before = state(model)
    trainable = M.trainable_names(model)

    ours = peft_to_miss_model(model)
    assert isinstance(ours, MissModel)
    assert list(ours.peft_config) == ["default", "other"] and ours.active_adapters == ["default"]
    assert ours.peft_config["default"].variant == variant
    assert_close(M.run(ours, "llama", tokens), expected)
    assert M.trainable_names(ours) == trainable
    assert not ours.training and not any(m.training for m in ours.modules())
    values = miss_values(ours)
    for key, value in before.items():
        assert M.same_bits(values[M.strip(key, ("base_model.model.",))].detach(), value), key

    back = miss_model_to_peft(ours)
    assert isinstance(back, peft.PeftModel)
    assert_same_state(state(back), before)
    assert M.trainable_names(back) == trainable
    assert_close(M.run(back, "llama", tokens), expected, rel=0)


def test_from_pretrained_inference_adapter_stays_frozen_and_in_eval(tmp_path):
    peft_model("standard").save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(M.make_llama().train(), str(tmp_path))
    tokens = M.token_input()
    expected = M.run(loaded, "llama", tokens)
    ours = peft_to_miss_model(loaded)
    assert M.trainable_names(ours) == set()
    assert ours.peft_config["default"].inference_mode
    assert_close(M.run(ours, "llama", tokens), expected)


def test_miss_model_with_bias_and_modules_to_save_converts_to_peft_and_back():
    config = MissConfig(r=6, target_modules=["fc1", "fc2"], bias="MiSS_only", modules_to_save=["head"],
                        init_weights="mini", mini_r=4)
    ours = get_miss_model(M.make_mlp(), config)
    M.randomize_blocks(ours)
    with torch.no_grad():
        ours.model.head.modules_to_save["default"].weight.mul_(1.5)
    x = M.mlp_input()
    expected = M.run(ours, "mlp", x)
    before = {M.strip(k, ("base_model.model.",)): v.detach().clone() for k, v in ours.state_dict().items()}
    trainable = M.trainable_names(ours)
    block_dtypes = {n: p.dtype for n, p in miss_values(ours).items()}

    theirs = miss_model_to_peft(ours)
    assert_close(M.run(theirs, "mlp", x), expected)
    assert M.trainable_names(theirs) == trainable
    assert {n: p.dtype for n, p in peft_values(theirs).items()} == block_dtypes
    after = {M.strip(k, ("base_model.model.",)): v for k, v in theirs.state_dict().items()}
    assert_same_state(after, before)

    again = peft_to_miss_model(theirs)
    assert_close(M.run(again, "mlp", x), expected)
    assert M.trainable_names(again) == trainable


def test_bf16_adapters_keep_their_dtype_both_ways():
    base = M.make_llama(dtype=torch.bfloat16)
    model = peft.get_peft_model(base, peft.MissConfig(r=8, target_modules=["q_proj", "v_proj"]),
                                autocast_adapter_dtype=False)
    assert {p.dtype for n, p in model.named_parameters() if "miss_block" in n} == {torch.bfloat16}
    M.randomize_blocks(model)
    before = state(model)
    ours = peft_to_miss_model(model)
    assert {p.dtype for _, layer in ours.miss_layers() for p in layer.miss_block.values()} == {torch.bfloat16}
    back = miss_model_to_peft(ours)
    assert_same_state(state(back), before)


def test_conversions_refuse_what_the_other_side_cannot_hold():
    # a layer with a standard and a mini adapter: PEFT would compute both as standard
    ours = get_miss_model(M.make_mlp(), MissConfig(r=4, target_modules=["fc1"]))
    ours.add_adapter("mini", MissConfig(r=4, target_modules=["fc1"], init_weights="mini", mini_r=4))
    snapshot = M.snapshot(ours)
    with pytest.raises(ValueError, match="different variants"):
        miss_model_to_peft(ours)
    M.assert_unchanged(ours, snapshot)

    ours.delete_adapter("mini")
    ours.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        miss_model_to_peft(ours)

    theirs = peft_model("standard")
    theirs.add_adapter("mini", peft.MissConfig(r=8, target_modules="all-linear", init_weights="mini", mini_r=4))
    snapshot = M.snapshot(theirs)
    with pytest.raises(ValueError, match="first adapter"):
        peft_to_miss_model(theirs)
    M.assert_unchanged(theirs, snapshot)

    theirs = peft_model("standard")
    theirs.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        peft_to_miss_model(theirs)
