"""Shared helpers of the training-stack integration tests (compile, autocast, checkpointing,
distributed, PEFT integration, LoRA export), CPU and CUDA: a small MLP adapted by each MiSS
variant (dropout on where the variant has it), a loss with its block gradients, and a
comparison that names what differs."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import miss_ext
from miss_ext import MissConfig, get_miss_model

import models as M

# variant -> the adapters put on MLP's proj_in / fc1 / fc2 (in/out features 16, 32, 64):
# "standard" has in % r != 0 on every layer (r = 5), "mixed" stacks a bat and a mini adapter
# on the standard one (every forward op of the library in one layer).
TARGETS = ["proj_in", "fc1", "fc2"]
VARIANTS = {
    "standard": [("default", dict(r=5, init_weights=True))],
    "mini": [("default", dict(r=4, mini_r=4, init_weights="mini"))],
    "bat": [("default", dict(r=8, init_weights="bat"))],
    "mixed": [
        ("default", dict(r=5, init_weights=True)),
        ("tiles", dict(r=8, init_weights="bat")),
        ("mini", dict(r=4, mini_r=8, init_weights="mini")),
    ],
}
DROPOUT = 0.25


def make_model(variant: str, *, dropout: float = DROPOUT, dtype=torch.float32, device="cpu", seed: int = 0,
               block_dtype: Optional[torch.dtype] = None) -> miss_ext.MissModel:
    """MLP (16 -> 32 -> 16, two residual blocks) adapted by ``variant``, random non-zero blocks."""
    base = M.make_mlp(seed, dtype=dtype).to(device)
    adapters = VARIANTS[variant]
    model = None
    for name, values in adapters:
        config = MissConfig(target_modules=TARGETS, miss_dropout=dropout, **values)
        if model is None:
            model = get_miss_model(base, config, name)
        else:
            model.add_adapter(name, config)
    model.set_adapter([name for name, _ in adapters])
    for i, (name, _) in enumerate(adapters):
        M.randomize_blocks(model, name, seed=10 + i + 100 * seed, scale=0.3)
    if block_dtype is not None:
        for _, layer in model.miss_layers():
            for param in layer.miss_block.values():
                param.data = param.data.to(block_dtype)
    return model


def batch(rows: int = 6, length: int = 5, *, dtype=torch.float32, device="cpu", seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, length, 16, generator=gen).to(dtype=dtype, device=device)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model: nn.Module, fn, *args, seed: int = 123) -> tuple[torch.Tensor, dict]:
    """``fn(*args).float().square().mean()`` after ``torch.manual_seed(seed)`` (so dropout
    draws the same seeds), and its gradients w.r.t. every trainable parameter of model."""
    params = trainable(model)
    for p in params.values():
        p.grad = None
    torch.manual_seed(seed)
    loss = fn(*args).float().square().mean()
    loss.backward()  # not autograd.grad: reentrant checkpointing supports only backward()
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in params.items()}
    for p in params.values():
        p.grad = None
    return loss.detach(), grads


def single_process_step(variant: str, rows: int, lr: float, steps: int = 1) -> tuple[dict, dict]:
    """The block gradients of the last of ``steps`` SGD steps on the whole batch, and the blocks
    after it, in one process: what the distributed tests' processes must reach together
    (dropout off)."""
    model = make_model(variant, dropout=0.0).train()
    params = trainable(model)
    optimizer = torch.optim.SGD(params.values(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        model(batch(rows=rows)).square().mean().backward()
        grads = {n: p.grad.clone() for n, p in params.items()}
        optimizer.step()
    return grads, {n: p.detach().clone() for n, p in params.items()}


def assert_grads_close(got: dict, expected: dict, *, rtol: float = 1e-5, atol: float = 1e-6, what: str = "") -> None:
    assert got.keys() == expected.keys(), f"{what}: gradients of different parameters"
    assert got, f"{what}: no trainable parameter"
    for name in expected:
        assert expected[name] is not None, f"{what}: {name} got no gradient"
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")


class CastLog(TorchDispatchMode):
    """Records the source tensor of every dtype conversion (aten._to_copy) and every op."""

    def __init__(self):
        super().__init__()
        self.casts: list[torch.Tensor] = []
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        if func is torch.ops.aten._to_copy.default:
            self.casts.append(args[0])
        return func(*args, **(kwargs or {}))


def relative_error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def check_inductor_training_matches_eager(*, device="cpu", loss_tol=(1e-5, 0.0), grad_tol=(1e-4, 1e-5)) -> None:
    """A layer with a standard (dropout), a bat and a mini adapter (every forward op of the
    library), compiled by inductor; two sequence lengths through one dynamic graph. With
    fallback_random inductor draws eager's seeds, so loss and gradients equal eager's within
    (rtol, atol) = loss_tol / grad_tol."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    layer = make_model("mixed", device=device).train().model.layers[0].fc1
    counter = torch._dynamo.utils.counters
    counter.clear()
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(layer, fullgraph=True, backend="inductor")
        for length in (5, 9):
            x = torch.randn(3, length, 32, device=device).requires_grad_()
            torch._dynamo.mark_dynamic(x, 1)
            eager_loss, eager_grads = loss_and_grads(layer, layer, x)
            loss, grads = loss_and_grads(layer, compiled, x)
            torch.testing.assert_close(loss, eager_loss, rtol=loss_tol[0], atol=loss_tol[1])
            assert_grads_close(grads, eager_grads, rtol=grad_tol[0], atol=grad_tol[1],
                               what=f"inductor, length {length}")
    assert counter["stats"]["unique_graphs"] == 1, dict(counter["stats"])
