"""The CUDA side of the training-stack integration (run by benchmarks/gpu_suite.sh on a GPU;
skipped without one): autocast in float16 and bfloat16 (dtypes, accuracy, no copy of x or of
the blocks), torch.compile with inductor (training with dropout, dynamic sequence length),
checkpointing with dropout (the CUDA generator state is restored on recomputation), PEFT's
model on the kernels, and the LoRA export of a CUDA model.

``MISS_INTEGRATION_DEVICE=cpu`` runs the same file on the CPU (a dry run of its logic on a
machine without a GPU; CPU autocast takes float16 too).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import miss_ext
from miss_ext import MissConfig, export_lora, get_miss_model

import models as M
from integration_helpers import (
    VARIANTS,
    CastLog,
    assert_grads_close,
    batch,
    check_inductor_training_matches_eager,
    loss_and_grads,
    make_model,
    relative_error,
)

DEVICE = os.environ.get("MISS_INTEGRATION_DEVICE", "cuda")
pytestmark = [
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def test_build_has_cuda_kernels():
    if DEVICE == "cuda":
        assert miss_ext.has_cuda_kernels()


@pytest.mark.parametrize("dtype_id", list(AUTOCAST_DTYPES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_autocast_dtypes_accuracy_and_no_copies(variant, dtype_id):
    dtype = AUTOCAST_DTYPES[dtype_id]
    model = make_model(variant, dropout=0.0, device=DEVICE).eval()
    x = batch(device=DEVICE)
    layer = model.model.layers[0].fc1
    blocks = list(layer.miss_block.values())
    with torch.no_grad():
        expected = model(x)
        with torch.autocast(DEVICE, dtype=dtype):
            out = model(x)
            h = torch.randn(4, 7, 32, device=DEVICE, dtype=dtype)
            with CastLog() as log:
                y = layer(h)
            with CastLog() as linear:
                layer.base_layer(h)
    assert out.dtype == y.dtype == dtype
    assert relative_error(out, expected) < 8 * EPS[dtype], relative_error(out, expected)
    assert not any(t is h for t in log.casts), "x was copied"
    assert not any(t is b for t in log.casts for b in blocks), "a block was cast"
    assert len(log.casts) == len(linear.casts)


@pytest.mark.parametrize("dtype_id", list(AUTOCAST_DTYPES))
def test_training_under_autocast(dtype_id):
    dtype = AUTOCAST_DTYPES[dtype_id]
    model = make_model("mixed", device=DEVICE).train()
    x = batch(device=DEVICE)

    def run(autocast):
        def fn(x):
            with torch.autocast(DEVICE, dtype=dtype, enabled=autocast):
                # a loss scale, as torch.amp.GradScaler applies: float16 gradients of this
                # small loss would otherwise underflow (in both runs alike, so grads compare)
                return model(x) * 64
        return loss_and_grads(model, fn, x)

    (_, expected), (_, got) = run(False), run(True)
    for name in expected:
        assert got[name].dtype == torch.float32
        assert relative_error(got[name], expected[name]) < 32 * EPS[dtype], name


@pytest.mark.parametrize("dtype_id", list(AUTOCAST_DTYPES))
def test_direct_ops_under_autocast(dtype_id):
    dtype = AUTOCAST_DTYPES[dtype_id]
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=gen).to(DEVICE) for s in ((6, 16), (8, 16), (8,)))
    block = (torch.randn(4, 8, generator=gen) * 0.3).to(DEVICE)
    tiles = (torch.randn(2, 4, 4, generator=gen) * 0.1).to(DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        with CastLog() as log:
            y = miss_ext.shard_linear(x, w, b, block)
            z = miss_ext.bat_linear(x, w, b, tiles)
    assert y.dtype == z.dtype == dtype
    assert not any(t is block or t is tiles for t in log.casts)
    torch.testing.assert_close(y, miss_ext.shard_linear(x.to(dtype), w.to(dtype), b.to(dtype), block))


def test_inductor_training_with_dropout_and_dynamic_length_matches_eager():
    pytest.importorskip("torch._inductor.config")
    torch._dynamo.reset()
    check_inductor_training_matches_eager(device=DEVICE, loss_tol=(1e-4, 1e-6), grad_tol=(1e-3, 1e-5))
    torch._dynamo.reset()


def test_compile_under_autocast_matches_eager():
    torch._dynamo.reset()
    model = make_model("mixed", device=DEVICE).train()
    x = batch(device=DEVICE)

    def step(x):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return model(x)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grads = loss_and_grads(model, step, x)
    loss, grads = loss_and_grads(model, compiled, x)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    assert_grads_close(grads, eager_grads, rtol=1e-4, atol=1e-6, what="autocast")
    torch._dynamo.reset()


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointing_with_dropout_gives_the_same_gradients(use_reentrant):
    model = make_model("mixed", device=DEVICE).train()
    x = batch(device=DEVICE)

    def forward(checkpointed):
        mlp = model.model
        h = mlp.proj_in(x)
        for block in mlp.layers:
            h = checkpoint(block, h, use_reentrant=use_reentrant) if checkpointed else block(h)
        return mlp.head(mlp.norm(h))

    expected_loss, expected = loss_and_grads(model, forward, False)
    loss, got = loss_and_grads(model, forward, True)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert_grads_close(got, expected, rtol=1e-5, atol=1e-7, what="checkpoint")


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_peft_model_on_the_kernels(variant):
    peft = pytest.importorskip("peft")
    from miss_ext.integrations.peft import use_miss_kernels

    values = {"standard": dict(init_weights=True), "mini": dict(init_weights="mini", mini_r=4),
              "bat": dict(init_weights="bat")}[variant]
    model = peft.get_peft_model(M.make_llama().to(DEVICE), peft.MissConfig(r=8, target_modules="all-linear",
                                                                           **values))
    M.randomize_blocks(model, scale=0.2)
    model.eval()
    tokens = M.token_input().to(DEVICE)
    expected = M.run(model, "llama", tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_miss_kernels(model)
    got = M.run(model, "llama", tokens)
    assert relative_error(got, expected) < 1e-4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_lora_export_of_a_cuda_model(tmp_path):
    peft = pytest.importorskip("peft")
    base = M.make_llama().to(DEVICE)
    fresh = copy.deepcopy(base)
    model = get_miss_model(base, MissConfig(r=8, target_modules="all-linear", init_weights="mini", mini_r=4))
    M.randomize_blocks(model)
    tokens = M.token_input().to(DEVICE)
    expected = M.run(model, "llama", tokens)
    export_lora(model, str(tmp_path))
    lora = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    assert relative_error(M.run(lora, "llama", tokens), expected) < 1e-4
