"""torch.compile on models with MissLinear layers: every variant (standard and mini with
dropout on, bat, and all of them stacked on one layer) compiles with fullgraph=True for
training and inference and gives eager's outputs and gradients; a changing sequence length
compiles at most twice (the static first graph, then one dynamic graph), never once per
length; autocast traces too.

Most cases use the aot_eager backend: Dynamo and AOTAutograd trace exactly the graphs inductor
would compile (forward, backward, the custom ops' fake kernels and autograd formulas), without
a C++ compile per case. One case runs the real inductor backend, training with dropout and
dynamic shapes.

Dropout under inductor: the seed is drawn with ``torch.randint`` inside the graph. Inductor
replaces eager's random ops by its own Philox streams (seeded from torch's generator), so a
compiled model draws *different* seeds than eager for the same ``torch.manual_seed``; it is
still reproducible (the same seed gives the same masks, checked below). To compare inductor
with eager bit for bit, ``torch._inductor.config.fallback_random = True`` makes inductor call
eager's random ops, which is what the inductor test does.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from integration_helpers import (
    VARIANTS,
    assert_grads_close,
    batch,
    check_inductor_training_matches_eager,
    loss_and_grads,
    make_model,
)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compile_fullgraph_training_and_inference_match_eager(variant):
    model = make_model(variant).train()
    x = batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    eager_loss, eager_grads = loss_and_grads(model, model, x)
    loss, grads = loss_and_grads(model, compiled, x)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    assert_grads_close(grads, eager_grads, what=f"{variant} training")

    # dropout really is on in training (else the test above would prove little)
    if variant != "bat":
        with torch.no_grad():
            torch.manual_seed(0)
            a = compiled(x)
            torch.manual_seed(1)
            b = compiled(x)
        assert not torch.equal(a, b), "different seeds gave the same dropout masks"

    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-7)


def test_dynamic_sequence_length_compiles_at_most_twice():
    """Automatic dynamic shapes: the first length compiles a static graph, the second a
    dynamic one that serves every later length, in training and in inference."""
    model = make_model("mixed").train()
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for length in (5, 7, 12, 3):
        x = batch(length=length)
        torch.manual_seed(length)
        compiled(x).square().mean().backward()
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 4 sequence lengths"

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model.eval(), fullgraph=True, backend=counter)
    first = batch(length=4)
    torch._dynamo.mark_dynamic(first, 1)  # declared dynamic: one graph from the start
    with torch.no_grad():
        for x in (first, batch(length=8), batch(length=11)):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1


def test_compile_under_autocast_matches_eager():
    model = make_model("mixed").train()
    x = batch()

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grads = loss_and_grads(model, step, x)
    loss, grads = loss_and_grads(model, compiled, x)
    torch.manual_seed(0)
    assert compiled(x).dtype == torch.bfloat16
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    assert_grads_close(grads, eager_grads, rtol=1e-5, atol=1e-6, what="autocast")


def test_inductor_training_with_dropout_and_dynamic_length_matches_eager():
    pytest.importorskip("torch._inductor.config")
    check_inductor_training_matches_eager(loss_tol=(1e-5, 0.0), grad_tol=(1e-4, 1e-5))


def test_inductor_dropout_is_reproducible_without_fallback_random():
    """Inductor's own random numbers: not eager's, but a function of torch.manual_seed."""
    model = make_model("standard").train()
    layer = model.model.layers[0].fc1
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    x = torch.randn(4, 3, 32)
    with torch.no_grad():
        torch.manual_seed(7)
        a = compiled(x)
        torch.manual_seed(7)
        b = compiled(x)
        torch.manual_seed(8)
        c = compiled(x)
        layer.eval()
        no_dropout = layer(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, no_dropout)
