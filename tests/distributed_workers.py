"""Worker processes of tests/test_distributed.py (a module of its own so that
torch.multiprocessing.spawn's children import it, not the test module).

Every worker joins a gloo process group through a FileStore in the test's temporary
directory (no port to pick), works on its share of one batch and writes what the parent
compares to ``<tmp>/rank<r>.pt``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from integration_helpers import batch, make_model, trainable

ROWS = 8  # the whole batch; each of the 2 ranks gets half
LR = 0.1


def _init(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank, world_size=world)


def _local(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world)[rank]


def worker(rank: int, world: int, tmp: str, ddp_variants: list, fsdp_variants: list) -> None:
    """One process group for both (a spawn costs seconds of imports): DDP, then FSDP2."""
    _init(rank, world, tmp)
    try:
        results = {"ddp": ddp(rank, world, ddp_variants), "fsdp": fsdp(rank, world, tmp, fsdp_variants),
                   "fsdp_per_linear": fsdp(rank, world, tmp, ddp_variants, per_linear=True)}
        torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def ddp(rank: int, world: int, variants: list) -> dict:
    """DDP over the MissModel, a backward on this rank's half batch and an SGD step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    results = {}
    for variant in variants:
        model = make_model(variant, dropout=0.0).train()
        wrapped = DDP(model)
        x = _local(batch(rows=ROWS), rank, world)
        wrapped(x).square().mean().backward()
        params = trainable(model)
        grads = {n: p.grad.clone() for n, p in params.items()}
        torch.optim.SGD(params.values(), lr=LR).step()
        results[variant] = {"grads": grads, "params": {n: p.detach().clone() for n, p in params.items()}}
    return results


def fsdp(rank: int, world: int, tmp: str, variants: list, per_linear: bool = False) -> dict:
    """FSDP2 (fully_shard: each residual block, then the root), a backward and an SGD step;
    the adapter state of each variant is then saved with torch.distributed.checkpoint from the
    sharded model (DTensors) into ``<tmp>/dcp_<variant>``. Empty where torch has no FSDP2.

    per_linear: fully_shard on every nn.Linear first (the base layers inside the MissLinears and
    the head), whose weights are then DTensor shards that only FSDP's hooks on the Linear
    unshard: standard and mini must call the layer, bat gathers the whole weight (no DCP save)."""
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return {}

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for variant in variants:
        model = make_model(variant, dropout=0.0).train()
        linears = [m for m in model.modules() if type(m) is nn.Linear] if per_linear else []
        for module in [*linears, *model.model.layers, model.model]:
            fully_shard(module, mesh=mesh)
        x = _local(batch(rows=ROWS), rank, world)
        model(x).square().mean().backward()
        params = trainable(model)
        grads = {n: p.grad.full_tensor() for n, p in params.items()}
        torch.optim.SGD(params.values(), lr=LR).step()
        results[variant] = {
            "grads": grads,
            "params": {n: p.detach().full_tensor() for n, p in params.items()},
            "sharded": {n: type(p).__name__ for n, p in params.items()},
            "sharded_linears": len(linears),
            "base_weights": sorted({type(m.weight).__name__ for m in linears}),
        }
        if not per_linear:
            adapter_state = {k: v for k, v in model.model.state_dict().items() if ".miss_block." in k}
            dcp.save(adapter_state, checkpoint_id=os.path.join(tmp, f"dcp_{variant}"))
    return results
