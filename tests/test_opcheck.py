"""torch.library.opcheck on every op of miss_ext.ops.op_names(), several samples each.

opcheck checks the registration (schema and mutation, autograd registration, fake kernel,
torch.compile/aot_dispatch), not the math: the math is test_ops.py and test_grads.py.
"""

import pytest
import torch

import miss_ext

from op_samples import sample_inputs

DEVICE = "cpu"
FORWARD_OPS = {"shard_fold", "shard_tile_add", "shard_linear", "shard_delta_add", "bat_weight", "bat_linear"}
MUTATING_OPS = {"merge_", "unmerge_"}


def _samples():
    cases = []
    for name, args, label in sample_inputs(DEVICE, requires_grad=False):
        cases.append(pytest.param(name, args, id=f"{name}-{label}"))
    for name, args, label in sample_inputs(DEVICE, requires_grad=True):
        if name in FORWARD_OPS:
            cases.append(pytest.param(name, args, id=f"{name}-{label}-requires_grad"))
    return cases


def _fresh(args):
    """A copy of the sample for one opcheck run (opcheck runs the op several times)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.detach().clone().requires_grad_(a.requires_grad)
        out.append(a)
    return tuple(out)


def test_every_op_has_samples():
    names = {name for name, _, _ in sample_inputs(DEVICE)}
    assert names == set(miss_ext.ops.op_names())
    # and every name is a registered op
    for name in miss_ext.ops.op_names():
        assert hasattr(torch.ops.miss, name)


@pytest.mark.parametrize("name,args", _samples())
def test_opcheck(name, args):
    op = getattr(torch.ops.miss, name)
    args = _fresh(args)
    if name in MUTATING_OPS:
        weight = args[0]
        before = weight.clone()
        torch.library.opcheck(op, (weight.clone(),) + args[1:])
        assert torch.equal(weight, before), "opcheck must run on a clone of the weight"
    else:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", sorted(MUTATING_OPS))
def test_mutation_is_declared_in_schema(name):
    schema = getattr(torch.ops.miss, name).default._schema
    weight_arg = schema.arguments[0]
    assert weight_arg.name == "weight"
    assert weight_arg.alias_info is not None and weight_arg.alias_info.is_write
    for arg in schema.arguments[1:]:
        assert arg.alias_info is None or not arg.alias_info.is_write


def test_torch_compile_fullgraph_training_step():
    """STYLE.md's trio (reference, opcheck, compile): a training step through shard_linear with
    dropout, shard_delta_add and bat_linear traces with fullgraph=True (the backward is made of
    custom ops) and gives eager's loss and gradients. aot_eager keeps the test fast on a CPU
    box; it runs the same traced forward and backward graphs that inductor would compile."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_()

    x, w, b, blk, blk2 = t(6, 10), t(12, 10, scale=0.3), t(12), t(4, 12, scale=0.5), t(3, 4, scale=0.5)
    w2, bat = t(8, 12, scale=0.3), t(2, 4, 4, scale=0.1)
    seed = torch.tensor([11], dtype=torch.int64)

    def step(x, w, b, blk, blk2, w2, bat, seed):
        y = miss_ext.shard_linear(x, w, b, blk, 0.3, seed)
        y = miss_ext.shard_delta_add(y, x, blk2, 0.3, seed)
        return miss_ext.bat_linear(y, w2, None, bat).square().sum()

    inputs = (x, w, b, blk, blk2, w2, bat)
    eager = step(*inputs, seed)
    eager_grads = torch.autograd.grad(eager, inputs)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs, seed)
    grads = torch.autograd.grad(loss, inputs)
    torch.testing.assert_close(loss, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# The public op API as first released (csrc/registration.cpp). Changing a schema in a way
# that breaks callers (renaming, reordering, removing or retyping an argument, dropping a
# default) fails here; adding a trailing argument with a default does not.
FROZEN_SCHEMAS = {
    "shard_fold": "miss::shard_fold(Tensor x, int r, float p=0., Tensor? seed=None) -> Tensor",
    "shard_tile_add": "miss::shard_tile_add(Tensor grad_x, Tensor g, float p=0., Tensor? seed=None) -> Tensor",
    "shard_linear": "miss::shard_linear(Tensor x, Tensor weight, Tensor? bias, Tensor block, float p=0., "
                    "Tensor? seed=None) -> (Tensor, Tensor)",
    "shard_delta_add": "miss::shard_delta_add(Tensor y, Tensor x, Tensor block, float p=0., Tensor? seed=None) "
                       "-> (Tensor, Tensor)",
    "shard_linear_backward": "miss::shard_linear_backward(Tensor grad_out, Tensor fold, Tensor? weight, "
                             "Tensor block, int in_features, float p, Tensor? seed, Tensor? grad_fold, "
                             "bool[2] output_mask) -> (Tensor, Tensor)",
    "bat_weight": "miss::bat_weight(Tensor weight, Tensor block) -> Tensor",
    "bat_block_grad": "miss::bat_block_grad(Tensor grad_weight, Tensor weight, int r) -> Tensor",
    "bat_weight_grad": "miss::bat_weight_grad(Tensor grad_weight, Tensor block) -> Tensor",
    "bat_linear": "miss::bat_linear(Tensor x, Tensor weight, Tensor? bias, Tensor block) -> Tensor",
    "bat_linear_backward": "miss::bat_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor block, "
                           "bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    "merge_": "miss::merge_(Tensor(a!) weight, Tensor block, bool check_finite=False) -> ()",
    "unmerge_": "miss::unmerge_(Tensor(a!) weight, Tensor block) -> ()",
}


@pytest.mark.parametrize("name", sorted(FROZEN_SCHEMAS))
def test_schema_is_backward_compatible(name):
    current = getattr(torch.ops.miss, name).default._schema
    frozen = torch._C.parse_schema(FROZEN_SCHEMAS[name])
    assert current.is_backward_compatible_with(frozen), f"{current} breaks {frozen}"
