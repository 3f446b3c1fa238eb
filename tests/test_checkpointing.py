"""Gradient (activation) checkpointing: the same gradients as without, with dropout on.

MissLinear draws its dropout seeds with torch.randint from torch's generator, and checkpoint
recomputation restores the generator state of the forward (preserve_rng_state=True, its
default), so the recomputed forward draws the same seeds and regenerates the same masks. The
tests would fail if it did not: with dropout 0.25 a different mask gives different gradients.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from miss_ext import MissConfig, get_miss_model

import models as M
from integration_helpers import VARIANTS, assert_grads_close, batch, loss_and_grads, make_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' deprecation notices


def mlp_forward(model, x, use_reentrant=None):
    """The MLP's forward with each residual block checkpointed (None: not checkpointed)."""
    mlp = model.model
    h = mlp.proj_in(x)
    for block in mlp.layers:
        h = block(h) if use_reentrant is None else checkpoint(block, h, use_reentrant=use_reentrant)
    return mlp.head(mlp.norm(h))


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_torch_utils_checkpoint_gives_the_same_gradients(variant, use_reentrant):
    model = make_model(variant).train()
    x = batch()
    expected_loss, expected = loss_and_grads(model, mlp_forward, model, x, None)
    loss, got = loss_and_grads(model, mlp_forward, model, x, use_reentrant)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    assert_grads_close(got, expected, rtol=1e-6, atol=1e-7, what=f"checkpoint(use_reentrant={use_reentrant})")


def test_without_restored_rng_the_masks_differ():
    """The control: recomputation that does not restore the generator draws other seeds, and
    the gradients change; so the test above does check the masks."""
    model = make_model("standard").train()
    x = batch()
    expected_loss, expected = loss_and_grads(model, mlp_forward, model, x, None)

    def unrestored(model, x):
        mlp = model.model
        h = mlp.proj_in(x)
        for block in mlp.layers:
            h = checkpoint(block, h, use_reentrant=False, preserve_rng_state=False)
        return mlp.head(mlp.norm(h))

    loss, got = loss_and_grads(model, unrestored, model, x)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    assert any(not torch.allclose(got[k], expected[k]) for k in expected)


LLAMA_VARIANTS = {"standard": dict(init_weights=True), "mini": dict(init_weights="mini", mini_r=4),
                  "bat": dict(init_weights="bat")}


def make_llama_model(dropout: float = 0.25, variant: str = "standard"):
    config = MissConfig(r=8, target_modules="all-linear", miss_dropout=dropout, **LLAMA_VARIANTS[variant])
    model = get_miss_model(M.make_llama(), config)
    M.randomize_blocks(model, scale=0.2)
    return model.train()


def llama_loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": False}, {"use_reentrant": True}],
                         ids=["default", "non_reentrant", "reentrant"])
@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_transformers_gradient_checkpointing_gives_the_same_gradients(kwargs, variant):
    pytest.importorskip("transformers")
    tokens = M.token_input(batch=2, length=9)
    model = make_llama_model(variant=variant)
    expected_loss, expected = loss_and_grads(model, llama_loss, model, tokens)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.model.is_gradient_checkpointing
    loss, got = loss_and_grads(model, llama_loss, model, tokens)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert_grads_close(got, expected, rtol=1e-5, atol=1e-7, what=f"gradient_checkpointing_enable({kwargs})")
