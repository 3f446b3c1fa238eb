"""Broken adapter files, odd shapes and odd op arguments that users met (issue 12, item 6):
each gets a clear error that names the file or argument, or simply works as documented."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import miss_ext
from miss_ext import MissConfig, MissLinear, MissModel, get_miss_model

import models as M
from conftest import generator, rand, seed_tensor

WEIGHTS = "adapter_model.safetensors"


def saved_adapter(tmp_path) -> str:
    mm = get_miss_model(M.make_mlp(), MissConfig(r=8, target_modules=["fc1", "fc2"]))
    M.randomize_blocks(mm, seed=3)
    mm.save_pretrained(str(tmp_path))
    return str(tmp_path)


def test_truncated_weights_file_is_a_value_error_naming_the_file(tmp_path):
    directory = saved_adapter(tmp_path)
    path = os.path.join(directory, WEIGHTS)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    model = M.make_mlp()
    before = M.snapshot(model)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*not a readable safetensors file"):
        MissModel.from_pretrained(model, directory)
    M.assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64])
def test_adapter_file_with_non_float_block_is_refused(tmp_path, dtype):
    """Integer, bool or complex blocks were cast silently into the model's dtype."""
    from safetensors.torch import load_file, save_file

    directory = saved_adapter(tmp_path)
    path = os.path.join(directory, WEIGHTS)
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("miss_block"))
    tensors[key] = torch.ones(tensors[key].shape, dtype=dtype)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=rf"not float16/bfloat16/float32/float64.*{key}: {dtype}"):
        MissModel.from_pretrained(M.make_mlp(), directory)
    mm = get_miss_model(M.make_mlp(), MissConfig(r=8, target_modules=["fc1", "fc2"]))
    with pytest.raises(ValueError, match="not float16"):
        mm.load_adapter(directory, "other")
    assert list(mm.peft_config) == ["default"]


@pytest.mark.parametrize("leading", [9, 12])
def test_x_with_more_than_eight_unmergeable_leading_dims(leading):
    """Any leading dims, any strides (the README's promise): an x whose leading dims are all of
    size 2 and permuted so that no two merge is read in place and gives the contiguous result."""
    gen = generator(leading)
    base = rand((2,) * leading + (6,), gen=gen, dtype=torch.float64)
    x = base.permute(*reversed(range(leading)), leading)  # reversed leading dims: none merge
    assert not x.is_contiguous()
    weight, bias = rand((4, 6), gen=gen, dtype=torch.float64), rand((4,), gen=gen, dtype=torch.float64)
    block, seed = rand((3, 4), gen=gen, dtype=torch.float64), seed_tensor(5)
    y, fold = torch.ops.miss.shard_linear(x, weight, bias, block, 0.3, seed)
    y_contiguous, fold_contiguous = torch.ops.miss.shard_linear(x.contiguous(), weight, bias, block, 0.3, seed)
    assert torch.equal(fold, fold_contiguous)  # same sums in the same order: the same bits
    torch.testing.assert_close(y, y_contiguous, rtol=1e-13, atol=1e-13)  # the base GEMM may block differently


def test_x_with_too_many_unmergeable_leading_dims_names_the_fix():
    """Past 25 (torch's own limit for CUDA elementwise ops) the error says what to do. A small
    storage seen through overlapping strides keeps the test light."""
    leading = 26
    x = torch.randn(400).as_strided((2,) * leading + (3,), tuple(range(leading + 1, 1, -1)) + (1,))
    with pytest.raises(RuntimeError, match=r"26 leading dims whose strides cannot be merged.*\.contiguous\(\)"):
        miss_ext.shard_fold(x, 1)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # torch's, for nn.Linear(5, 0)
@pytest.mark.parametrize("init_weights", [True, "mini", "bat"])
def test_layer_without_outputs_is_refused_at_construction(init_weights):
    """nn.Linear(5, 0) was accepted and failed at the first forward."""
    with pytest.raises(ValueError, match="out_features >= 1.*out_features=0"):
        MissLinear(nn.Linear(5, 0), r=1, mini_r=1, init_weights=init_weights)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.empty = nn.Linear(5, 0)

    model = Net()
    with pytest.raises(ValueError, match="cannot adapt 'empty'.*out_features >= 1"):
        get_miss_model(model, MissConfig(r=1, target_modules=["empty"]))
    assert isinstance(model.empty, nn.Linear) and not isinstance(model.empty, MissLinear)


def shard_backward_args(**overrides):
    gen = generator(9)
    args = dict(grad_out=rand((4, 6), gen=gen), fold=rand((4, 3), gen=gen), weight=None,
                block=rand((3, 6), gen=gen), in_features=7, p=0.0, seed=None, grad_fold=None,
                output_mask=[True, True])
    args.update(overrides)
    return list(args.values())


def test_shard_linear_backward_refuses_an_integer_grad_fold():
    grad_fold = torch.ones(4, 3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="argument 'grad_fold' must have dtype float32.*got Long"):
        torch.ops.miss.shard_linear_backward(*shard_backward_args(grad_fold=grad_fold))


def test_shard_linear_backward_names_an_impossible_in_features():
    with pytest.raises(RuntimeError, match=r"cannot allocate grad_x of shape \[4, 1099511627776\] for argument 'in_features'"):
        torch.ops.miss.shard_linear_backward(*shard_backward_args(in_features=2**40))
