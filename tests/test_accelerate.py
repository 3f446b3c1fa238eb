"""accelerate with a MissModel on 2 processes (torchrun, gloo on CPU), against one process.

``tests/accelerate_worker.py`` runs under ``torchrun --nproc_per_node 2``: accelerate wraps the
MissModel in DDP, each process takes half of the batch, and after ``accelerator.backward``
every process holds the block gradients that one process computes here on the whole batch;
the SGD step gives both the same blocks; accelerate's ``is_peft_model`` sees an adapter model
through the DDP wrapper; the adapter the main process saved loads in PEFT with the outputs
of the single-process model after the same step.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

import accelerate_worker as W
import models as M

pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), W.__file__, out]
        done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=out)
        assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
        results = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in range(2)]
        yield results, os.path.join(out, "adapter")


def one_process_step():
    model = W.adapted()
    ids = W.tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    params = W.blocks(model)
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    torch.optim.SGD(params.values(), lr=W.LR).step()
    return model, grads


def test_two_processes_give_the_gradients_and_step_of_one_process(ranks):
    results, _ = ranks
    model, grads = one_process_step()
    blocks = {n: p.detach() for n, p in W.blocks(model).items()}
    assert all(g.abs().max() > 0 for g in grads.values())
    for rank, result in enumerate(results):
        assert result["backend"] == "gloo" and result["wrapped"] == "DistributedDataParallel"
        assert result["is_peft_model"] and result["unwrapped_is_miss_model"]
        assert result["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {name}")
            torch.testing.assert_close(result["blocks"][name], blocks[name], rtol=1e-5, atol=1e-6,
                                       msg=f"rank {rank} {name} after the step")


def test_the_adapter_saved_by_the_main_process_loads_in_peft(ranks):
    _, adapter = ranks
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    model, _ = one_process_step()
    tokens = M.token_input()
    loaded = peft.PeftModel.from_pretrained(M.make_llama(), adapter)
    torch.testing.assert_close(M.run(loaded, "llama", tokens), M.run(model.eval(), "llama", tokens),
                               rtol=1e-4, atol=1e-5)
