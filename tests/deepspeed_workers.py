"""Worker processes of tests/test_deepspeed.py (a module of its own so that
torch.multiprocessing.spawn's children import it, not the test module).

Each worker runs DeepSpeed on its CPU accelerator (DS_ACCELERATOR=cpu) over a gloo process
group that meets in a FileStore in the test's temporary directory, trains the MLP of
integration_helpers for STEPS steps on its half of a batch under ZeRO stage 2 and 3, and writes
the full block gradients of the last step and the blocks after it to ``<tmp>/rank<r>.pt``.
"""

from __future__ import annotations

import os

import torch

from integration_helpers import batch, make_model, trainable

ROWS = 8  # the whole batch; each of the 2 ranks gets half
LR = 0.1
STEPS = 3


def _config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": ROWS // 2,
        "gradient_accumulation_steps": 1,
        # no parameter kept whole for being small (the default keeps tensors under 1e5 elements), so
        # every base weight is a partition outside its own forward, as in a model of real size
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "gradient_clipping": 0.0,  # off, as in the single-process step (clipping would scale the step)
        "zero_allow_untested_optimizer": True,  # torch's SGD: DeepSpeed's fused optimizers need its C++ ops
    }


def worker(rank: int, world: int, tmp: str, stages: list, variants: list) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    # The group first, through the FileStore (no port to pick); DeepSpeed then takes it as it is.
    torch.distributed.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}",
                                         rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for stage in stages:
        for variant in variants:
            model = make_model(variant, dropout=0.0).train()
            params = trainable(model)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=list(params.values()),
                                              optimizer=torch.optim.SGD(params.values(), lr=LR),
                                              config=_config(stage))
            base = model.base_model.model.proj_in.base_layer.weight
            partitioned = tuple(base.shape) != (32, 16)  # ZeRO-3: an empty partition outside forward
            x = batch(rows=ROWS).chunk(world)[rank]
            for _ in range(STEPS):
                loss = engine(x).square().mean()
                engine.backward(loss)
                grads = {n: safe_get_full_grad(p).clone() for n, p in params.items()}
                engine.step()
            after = {n: safe_get_full_fp32_param(p).clone() for n, p in params.items()}
            results[(stage, variant)] = {"grads": grads, "params": after, "partitioned": partitioned}
            engine.destroy()
    torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()
