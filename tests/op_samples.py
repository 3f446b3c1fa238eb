"""Sample inputs of every op of torch.ops.miss, for torch.library.opcheck (tests/test_opcheck.py)
and, on a GPU, tests/test_cuda.py."""

from __future__ import annotations

import torch

from conftest import generator, rand, seed_tensor


def sample_inputs(device="cpu", requires_grad: bool = False):
    """``[(op_name, args, id)]``: several samples of every op of miss_ext.ops.op_names().

    Forward ops get inputs with ``requires_grad``; backward ops and merge_/unmerge_ never
    (they have no autograd). merge_/unmerge_ samples hold fresh weights: pass a clone anyway.
    """
    gen = generator(1234)
    rg = requires_grad

    def t(shape, dtype=torch.float32, scale=1.0, grad=False):
        return rand(shape, dtype=dtype, device=device, gen=gen, scale=scale).requires_grad_(grad)

    seed = seed_tensor(20240917, device)
    samples = []
    # shard_fold(x, r, p, seed)
    samples += [
        ("shard_fold", (t((5, 10), grad=rg), 4, 0.0, None), "std"),
        ("shard_fold", (t((2, 3, 10), grad=rg), 3, 0.3, seed), "dropout-3d"),
        ("shard_fold", (t((4, 9), torch.bfloat16, grad=rg), 9, 0.0, None), "bf16-r=in"),
    ]
    # shard_tile_add(grad_x, g, p, seed)
    samples += [
        ("shard_tile_add", (t((5, 10), grad=rg), t((5, 4), grad=rg), 0.0, None), "std"),
        ("shard_tile_add", (t((2, 3, 10), grad=rg), t((6, 3), grad=rg), 0.3, seed), "dropout-3d"),
    ]
    # shard_linear(x, weight, bias, block, p, seed)
    samples += [
        ("shard_linear", (t((5, 10), grad=rg), t((12, 10)), t((12,)), t((4, 12), grad=rg), 0.0, None), "std"),
        ("shard_linear", (t((5, 10), grad=rg), t((12, 10)), None, t((4, 3), grad=rg), 0.3, seed), "mini-dropout"),
        ("shard_linear", (t((2, 3, 10), grad=rg), t((12, 10), grad=rg), t((12,), grad=rg), t((4, 12), grad=rg),
                          0.3, seed), "std-dropout-trainable-base"),
        ("shard_linear", (t((5, 10), torch.bfloat16, grad=rg), t((12, 10), torch.bfloat16), None,
                          t((4, 12), grad=rg), 0.0, None), "bf16-x-fp32-block"),
    ]
    # shard_delta_add(y, x, block, p, seed)
    samples += [
        ("shard_delta_add", (t((5, 12), grad=rg), t((5, 10), grad=rg), t((4, 12), grad=rg), 0.0, None), "std"),
        ("shard_delta_add", (t((2, 3, 12), grad=rg), t((2, 3, 10), grad=rg), t((4, 6), grad=rg), 0.3, seed),
         "mini-dropout"),
    ]
    # shard_linear_backward(grad_out, fold, weight, block, in, p, seed, grad_fold, mask)
    samples += [
        ("shard_linear_backward", (t((5, 12)), t((5, 4)), t((12, 10)), t((4, 12)), 10, 0.0, None, None,
                                   [True, True]), "std"),
        ("shard_linear_backward", (t((5, 12)), t((5, 4)), None, t((4, 3)), 10, 0.3, seed, t((5, 4)),
                                   [True, True]), "mini-delta-dropout-grad_fold"),
        ("shard_linear_backward", (t((2, 3, 12)), t((6, 4)), t((12, 10)), t((4, 12)), 10, 0.3, seed, None,
                                   [True, False]), "dropout-only-x"),
        ("shard_linear_backward", (t((5, 12)), t((5, 4)), t((12, 10)), t((4, 12)), 10, 0.0, None, None,
                                   [False, True]), "only-block"),
    ]
    # bat ops
    samples += [
        ("bat_weight", (t((12, 8), grad=rg), t((3, 4, 4), scale=0.1, grad=rg)), "r4"),
        ("bat_weight", (t((8, 8), grad=rg), t((4, 2, 2), scale=0.1, grad=rg)), "r2"),
        ("bat_block_grad", (t((12, 8)), t((12, 8)), 4), "r4"),
        ("bat_block_grad", (t((8, 6)), t((8, 6)), 2), "r2"),
        ("bat_weight_grad", (t((12, 8)), t((3, 4, 4), scale=0.1)), "r4"),
        ("bat_linear", (t((5, 8), grad=rg), t((12, 8), grad=rg), t((12,), grad=rg), t((3, 4, 4), scale=0.1, grad=rg)),
         "r4"),
        ("bat_linear", (t((2, 3, 8), grad=rg), t((8, 8)), None, t((4, 2, 2), scale=0.1, grad=rg)), "r2-3d-frozen-base"),
        ("bat_linear_backward", (t((5, 12)), t((5, 8)), t((12, 8)), t((3, 4, 4), scale=0.1), [True, True, True]), "all"),
        ("bat_linear_backward", (t((2, 3, 12)), t((2, 3, 8)), t((12, 8)), t((3, 4, 4), scale=0.1), [True, False, True]),
         "x-block"),
        ("bat_linear_backward", (t((5, 12)), t((5, 8)), t((12, 8)), t((3, 4, 4), scale=0.1), [False, True, False]),
         "weight"),
    ]
    # low precision, mixed block dtype, 1-D x and N = 0
    bf16 = torch.bfloat16
    samples += [
        ("shard_fold", (t((0, 10), grad=rg), 4, 0.3, seed), "N=0"),
        ("shard_linear", (t((10,), grad=rg), t((12, 10)), t((12,)), t((4, 12), grad=rg), 0.3, seed), "1d-x"),
        ("shard_linear", (t((0, 10), grad=rg), t((12, 10)), t((12,)), t((4, 3), grad=rg), 0.0, None), "N=0-mini"),
        ("shard_linear_backward", (t((5, 12), bf16), t((5, 4)), t((12, 10), bf16), t((4, 12)), 10, 0.3, seed,
                                   t((5, 4)), [True, True]), "bf16-fp32-block"),
        ("bat_linear", (t((5, 8), bf16, grad=rg), t((12, 8), bf16), t((12,), bf16), t((3, 4, 4), scale=0.1, grad=rg)),
         "bf16-fp32-block"),
        ("bat_linear_backward", (t((5, 12), bf16), t((5, 8), bf16), t((12, 8), bf16), t((3, 4, 4), scale=0.1),
                                 [True, True, True]), "bf16-fp32-block"),
        ("merge_", (t((12, 10), bf16), t((4, 12)), True), "bf16-std"),
        ("unmerge_", (t((12, 8), torch.float16), t((3, 4, 4), scale=0.1)), "fp16-bat"),
    ]
    # merge_ / unmerge_ (weight mutated)
    samples += [
        ("merge_", (t((12, 10)), t((4, 12)), False), "std"),
        ("merge_", (t((12, 10)), t((4, 3)), True), "mini-check_finite"),
        ("merge_", (t((12, 8)), t((3, 4, 4), scale=0.1), True), "bat-check_finite"),
        ("unmerge_", (t((12, 10)), t((4, 12))), "std"),
        ("unmerge_", (t((12, 8)), t((3, 4, 4), scale=0.1)), "bat"),
    ]
    return samples
