"""One process of tests/test_accelerate.py, started by torchrun (2 processes, gloo on CPU).

Each process builds the same adapted Llama, lets ``accelerate`` wrap it (DDP) with an SGD
optimizer, runs one step on its half of the batch and writes what it saw to
``<out>/rank<N>.pt``: the block gradients after accelerate's all-reduce, the blocks after the
step, and whether accelerate's PEFT check saw an adapter model. The main process also saves
the adapter of the unwrapped model, as a training script does at its end.

Usage: torchrun --nproc_per_node 2 tests/accelerate_worker.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import models as M  # noqa: E402
from miss_ext import MissConfig, MissModel, get_miss_model  # noqa: E402

ROWS, LENGTH, LR, SEED = 8, 8, 0.5, 4
CONFIG = dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"])


def adapted() -> MissModel:
    mm = get_miss_model(M.make_llama(), MissConfig(**CONFIG))
    M.randomize_blocks(mm, seed=SEED)
    return mm.train()


def tokens() -> torch.Tensor:
    return torch.randint(0, M.VOCAB, (ROWS, LENGTH), generator=torch.Generator().manual_seed(SEED))


def blocks(model) -> dict:
    return {n: p for n, p in model.named_parameters() if "miss_block" in n}


def main(out: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import is_peft_model

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    model = adapted()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    # every process takes its half of the batch: the mean loss of each half has as many
    # tokens, so the average DDP takes is the mean loss of the whole batch
    half = tokens().chunk(accelerator.num_processes)[accelerator.process_index]
    loss = model(input_ids=half, labels=half).loss
    accelerator.backward(loss)
    unwrapped = accelerator.unwrap_model(model)
    grads = {n: p.grad.detach().clone() for n, p in blocks(unwrapped).items()}
    optimizer.step()
    optimizer.zero_grad()
    result = {
        "backend": str(torch.distributed.get_backend()),
        "wrapped": type(model).__name__,
        "is_peft_model": is_peft_model(model),
        "unwrapped_is_miss_model": isinstance(unwrapped, MissModel),
        "grads": grads,
        "blocks": {n: p.detach().clone() for n, p in blocks(unwrapped).items()},
    }
    unwrapped.save_pretrained(os.path.join(out, "adapter"), is_main_process=accelerator.is_main_process)
    accelerator.wait_for_everyone()
    torch.save(result, os.path.join(out, f"rank{accelerator.process_index}.pt"))
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
