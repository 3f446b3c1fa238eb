"""torch.distributed with MiSS adapters, on 2 CPU processes (gloo):

- DDP: each process on half the batch gives, after DDP's all-reduce, the block gradients of
  one process on the whole batch, and the same SGD step on every rank;
- FSDP2 (``fully_shard``, which works on CPU with gloo in torch 2.14): the same, with the
  blocks sharded as DTensors, per residual block and per nn.Linear (the base weights are then
  DTensor shards that only FSDP's hooks on the Linear unshard); the sharded adapter state goes through
  torch.distributed.checkpoint and loads, resharded, into a plain single-process model;
- torch.distributed.checkpoint in one process (no process group): an adapter's state
  saves and loads back bit for bit.

Dropout is off in the comparisons: each process draws its own seeds and numbers its own rows,
so a process's masks are not the rows of the single process's masks.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_workers as W
import integration_helpers as helpers
from integration_helpers import VARIANTS, assert_grads_close, make_model, trainable

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
WORLD = 2


def single_process_step(variant: str):
    return helpers.single_process_step(variant, W.ROWS, W.LR)


FSDP_VARIANTS = ["standard", "mixed"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 processes computed (one spawn for DDP and FSDP2: it costs seconds)."""
    tmp = tmp_path_factory.mktemp("distributed")
    mp.spawn(W.worker, args=(WORLD, str(tmp), sorted(VARIANTS), FSDP_VARIANTS), nprocs=WORLD, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ddp_two_processes_give_the_gradients_of_one_process_on_the_whole_batch(ranks):
    _, results = ranks
    for variant in sorted(VARIANTS):
        grads, params = single_process_step(variant)
        for rank, result in enumerate(results):
            assert_grads_close(result["ddp"][variant]["grads"], grads, what=f"DDP {variant} rank {rank}")
            assert_grads_close(result["ddp"][variant]["params"], params, what=f"DDP {variant} rank {rank} after a step")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fsdp2_fully_shard_on_cpu_and_its_adapter_state_through_dcp(ranks):
    tmp, results = ranks
    if not results[0]["fsdp"]:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    import torch.distributed.checkpoint as dcp

    for variant in FSDP_VARIANTS:
        grads, params = single_process_step(variant)
        for rank, result in enumerate(results):
            assert set(result["fsdp"][variant]["sharded"].values()) == {"DTensor"}, "the blocks were not sharded"
            assert_grads_close(result["fsdp"][variant]["grads"], grads, what=f"FSDP2 {variant} rank {rank}")
            assert_grads_close(result["fsdp"][variant]["params"], params,
                               what=f"FSDP2 {variant} rank {rank} after a step")

        # the sharded checkpoint loads, resharded, into a plain model in a process without a group
        fresh = make_model(variant, dropout=0.0, seed=5)
        state = {k: v for k, v in fresh.model.state_dict().items() if ".miss_block." in k}
        dcp.load(state, checkpoint_id=os.path.join(tmp, f"dcp_{variant}"))
        assert {f"base_model.model.{k}" for k in state} == params.keys()
        for name, value in trainable(fresh).items():
            torch.testing.assert_close(value, params[name], rtol=1e-5, atol=1e-6)


def test_fsdp2_on_every_linear_gives_the_gradients_of_one_process(ranks):
    """fully_shard on each base Linear: its weight is a DTensor shard outside the Linear's own
    forward, so the fused op must not read it (standard/mini call the layer, bat gathers it)."""
    _, results = ranks
    if not results[0]["fsdp_per_linear"]:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    for variant in sorted(VARIANTS):
        grads, _ = single_process_step(variant)
        for rank, result in enumerate(results):
            got = result["fsdp_per_linear"][variant]
            # the 5 adapted base layers and the head
            assert got["sharded_linears"] == 6 and got["base_weights"] == ["DTensor"], got
            assert_grads_close(got["grads"], grads, what=f"FSDP2 per Linear {variant} rank {rank}")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dcp_round_trip_of_the_adapter_state_in_one_process(variant, tmp_path):
    import torch.distributed.checkpoint as dcp

    model = make_model(variant)
    dcp.save({"adapter": model.adapter_state_dict("default")}, checkpoint_id=str(tmp_path / "ckpt"))
    other = make_model(variant, seed=9)
    before = {n: p.detach().clone() for n, p in trainable(other).items()}
    # adapter_state_dict's tensors share the parameters' storage: DCP loads in place into them
    dcp.load({"adapter": other.adapter_state_dict("default")}, checkpoint_id=str(tmp_path / "ckpt"))
    for name, param in model.named_parameters():
        if name.endswith("miss_block.default"):
            assert torch.equal(dict(other.named_parameters())[name], param), name
            assert not torch.equal(before[name], param), f"{name}: the test models must start different"
