"""DeepSpeed ZeRO-2 and ZeRO-3 with MiSS adapters, on 2 CPU processes (DeepSpeed's CPU
accelerator, gloo), 3 steps: the block gradients and the blocks of one process on the whole batch.

Under ZeRO-3 every parameter, the frozen base weights too, is an empty partition outside the
forward of its own module; DeepSpeed gathers it in a pre-forward hook on that module. The
fused op, which reads the weight without calling the layer, saw the empty partition; now
standard/mini call the layer and bat gathers the weight (base_layers.py). Dropout is off: each
process draws its own seeds.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import deepspeed_workers as W
import integration_helpers as helpers
from integration_helpers import VARIANTS, assert_grads_close

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
WORLD = 2
STAGES = [2, 3]


def single_process_step(variant: str):
    return helpers.single_process_step(variant, W.ROWS, W.LR, steps=W.STEPS)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deepspeed")
    mp.spawn(W.worker, args=(WORLD, str(tmp), STAGES, sorted(VARIANTS)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_zero_gives_the_gradients_and_the_step_of_one_process(ranks, stage, variant):
    grads, params = single_process_step(variant)
    for rank, results in enumerate(ranks):
        got = results[(stage, variant)]
        assert got["partitioned"] == (stage == 3), "ZeRO-3 partitions the frozen base weights, ZeRO-2 does not"
        assert_grads_close(got["grads"], grads, what=f"ZeRO-{stage} {variant} rank {rank}")
        assert_grads_close(got["params"], params, what=f"ZeRO-{stage} {variant} rank {rank} after a step")
