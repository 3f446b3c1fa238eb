"""What a MissLinear may do with its base layer: read the weight itself, or call the layer.

The fused ops (``shard_linear``, ``bat_linear``) read ``base_layer.weight`` and ``bias`` and
compute the base GEMM themselves. That equals ``base_layer(x)`` only when calling the layer
would do nothing but ``F.linear(x, weight, bias)``: :func:`reads_weight_directly` says when.
Everything else lives in what the fused ops would skip:

- hooks on the layer, or global module hooks: DeepSpeed ZeRO-3 gathers the weight in a
  pre-forward hook, FSDP2 ``fully_shard`` on a Linear unshards it in one, users log or edit
  activations in them;
- a weight that is not a dense tensor: a DTensor shard, a ZeRO-3 partition (an empty tensor
  with ``ds_id``), a bitsandbytes 4-bit or 8-bit weight (packed integers);
- a Linear subclass with a forward of its own (bitsandbytes' ``Linear4bit``, ``Linear8bitLt``).

There the layer is called (standard, mini: ``y = base_layer(x)`` plus the delta op), or, for
bat, which replaces the weight and so never calls the layer (nor does PEFT), the dense weight
is obtained from wherever it lives: :func:`dense_weight`.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_globals

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAYER_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _is_dense(t: Optional[Tensor]) -> bool:
    """A plain strided float tensor (or Parameter), not a subclass that stands for something else."""
    return (
        type(t) in (Tensor, nn.Parameter)
        and t.layout == torch.strided
        and t.dtype in FLOAT_DTYPES
        and not hasattr(t, "ds_id")  # a DeepSpeed ZeRO-3 parameter: its data may be a partition
    )


def has_hooks(layer: nn.Module) -> bool:
    """Hooks that calling ``layer`` would run: its own, or global module hooks."""
    return any(getattr(layer, name, None) for name in _LAYER_HOOKS) or any(
        getattr(module_globals, name, None) for name in _GLOBAL_HOOKS
    )


def fused_weight_and_bias(layer: nn.Module) -> Optional[tuple]:
    """``(weight, bias)`` when ``layer(x)`` is exactly ``F.linear(x, weight, bias)``, so the fused
    ops may read them themselves (the fast path); None when the layer must be called.

    Runs at every forward, so it reads the registered parameters from ``_parameters`` (a
    module attribute lookup costs about a microsecond each); a weight that is not registered
    there (a parametrization's computed weight) takes the path that calls the layer."""
    params = layer._parameters
    weight, bias = params.get("weight"), params.get("bias")
    if (
        type(layer).forward is nn.Linear.forward
        and _is_dense(weight)
        and (bias is None or _is_dense(bias))
        and weight.shape == (layer.out_features, layer.in_features)
        and not has_hooks(layer)
    ):
        return weight, bias
    return None


def reads_weight_directly(layer: nn.Module) -> bool:
    """True when the fused ops may read the layer's weight and bias themselves."""
    return fused_weight_and_bias(layer) is not None


# -- bitsandbytes ---------------------------------------------------------------------------
# Only looked up when bitsandbytes is already imported: a model cannot hold its layers otherwise,
# and importing it here would cost every user seconds.


def _bnb():
    return sys.modules.get("bitsandbytes")


def quantization(layer: nn.Module) -> Optional[str]:
    """"bnb-4bit", "bnb-8bit" or None."""
    bnb = _bnb()
    if bnb is None:
        return None
    if isinstance(layer, bnb.nn.Linear4bit):
        return "bnb-4bit"
    if isinstance(layer, bnb.nn.Linear8bitLt):
        return "bnb-8bit"
    return None


def prepare_to_call(layer: nn.Module) -> None:
    """Undoes what would make a training call of the layer fail or go wrong: a 4-bit weight that
    bitsandbytes (0.50) repacked for its CPU inference kernel, in an eval forward without grad,
    makes its next training forward run that kernel, through which no gradient reaches x (the
    blocks of earlier layers then get wrong gradients), or fail with "a view of a leaf Variable
    that requires grad is being used in an in-place operation" where the layer has a bias: the
    evaluate-then-train of a Trainer with eval_strategy. bitsandbytes repacks in eval mode
    only, so in training this unpacks once."""
    if layer.training and quantization(layer) == "bnb-4bit":
        _unpack_for_cpu(layer.weight)


def _int8_scales(layer: nn.Module) -> Optional[Tensor]:
    """The per-row absmax of an 8-bit weight: on the weight until the first forward, which
    moves it into ``layer.state`` (and sets the weight's to None)."""
    scales = getattr(layer.weight, "SCB", None)
    return scales if scales is not None else getattr(getattr(layer, "state", None), "SCB", None)


def _unpack_for_cpu(weight) -> None:
    """An eval-mode forward without grad on a CPU with AVX512-BF16 repacks a 4-bit weight into
    a layout of bitsandbytes' CPU kernel, which dequantize_4bit does not read; this puts it
    back in the canonical layout, in place, as bitsandbytes itself does before a state_dict or
    a move (its next such forward repacks it)."""
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def _dequantize(layer: nn.Module, kind: str) -> Tensor:
    bnb = _bnb()
    weight = layer.weight
    if kind == "bnb-4bit":
        _unpack_for_cpu(weight)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if getattr(weight, "has_fp16_weights", False):
        return weight.data  # an 8-bit layer that keeps its float weight (trained in full)
    scales = _int8_scales(layer)
    if scales is None:
        raise TypeError(f"the {type(layer).__name__} has an int8 weight without its scales (SCB): "
                        "move it to its device first (bitsandbytes quantizes on .to(device))")
    # int8 rows CB with per-row absmax SCB: weight = CB * SCB / 127
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


def _requantize(layer: nn.Module, kind: str, dense: Tensor) -> None:
    """Puts ``dense`` back into the layer in its quantized form, on the layer's device."""
    bnb = _bnb()
    old = layer.weight
    device = old.device
    if kind == "bnb-4bit":
        # The settings of the old weight (quant_type, blocksize, compress_statistics, quant_storage,
        # module), not its data or state; private attributes (torch.compile's) are left behind.
        settings = {k: v for k, v in old.__dict__.items()
                    if not k.startswith("_") and k not in ("data", "quant_state", "bnb_quantized", "requires_grad")}
        layer.weight = bnb.nn.Params4bit(dense.to("cpu"), requires_grad=False, **settings).to(device)
        return
    layer.weight = bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False,
                                     has_fp16_weights=old.has_fp16_weights).to(device)
    layer.state.reset_grads()  # drops the cached CB/SCB of the old weight, which forward would use


# -- the dense weight, wherever it lives ----------------------------------------------------


def _describe(layer: nn.Module) -> str:
    weight = layer.weight
    return f"{type(layer).__name__} whose weight is a {type(weight).__name__} of shape {tuple(weight.shape)}"


def _zero3_gathered(params: list):
    import deepspeed  # a parameter with ds_id exists only where DeepSpeed is imported

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        return None
    return DTensor


def where_weight_lives(layer: nn.Module) -> str:
    """"dense", "bnb-4bit", "bnb-8bit", "dtensor" or "zero3": where :func:`dense_weight` finds
    the whole weight. Raises TypeError, naming the layer's class, for anything else."""
    kind = quantization(layer)
    if kind is not None:
        return kind
    weight = layer.weight
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(weight, dtensor):
        return "dtensor"
    if hasattr(weight, "ds_id"):
        return "zero3"
    if _is_dense(weight) and weight.shape == (layer.out_features, layer.in_features):
        return "dense"
    raise TypeError(
        f"MissLinear cannot read the weight of its base layer, a {_describe(layer)}: bat and merge need "
        "the whole dense weight, and miss_ext knows plain float tensors, bitsandbytes 4-bit/8-bit weights, "
        "FSDP2 DTensors and DeepSpeed ZeRO-3 parameters (use a standard or mini adapter, which only call "
        "the base layer)"
    )


def _whole(t: Optional[Tensor], where: str) -> Optional[Tensor]:
    """A DTensor shard, or a ZeRO-3 parameter inside its gathering, as a whole plain tensor."""
    if t is None:
        return None
    if where == "dtensor":
        return t.full_tensor() if isinstance(t, _dtensor_type()) else t
    return t.detach().clone()  # zero3: the gathered data is released when the gathering ends


@contextlib.contextmanager
def dense_weight(layer: nn.Module) -> Iterator[Tensor]:
    """The layer's whole ``[out, in]`` float weight for the time of the ``with``: the weight
    itself when it is dense, else a dequantized or gathered copy that aliases nothing of the
    layer (so autograd may keep it: the shard or partition is never read later)."""
    with dense_weight_and_bias(layer) as (weight, _):
        yield weight


@contextlib.contextmanager
def dense_weight_and_bias(layer: nn.Module) -> Iterator[tuple]:
    """:func:`dense_weight` and the bias made whole the same way (a sharded layer shards both)."""
    where = where_weight_lives(layer)
    weight, bias = layer.weight, layer.bias
    if where == "dense":
        yield weight, bias
    elif where in ("bnb-4bit", "bnb-8bit"):
        yield _dequantize(layer, where), bias
    elif where == "dtensor":
        yield _whole(weight, where), _whole(bias, where)
    else:
        # Inside a forward DeepSpeed has gathered them already (its parameter getter does, on
        # access): gathering again would free them on exit while the module still uses them.
        partitioned = [t for t in (weight, bias) if t is not None and t.ds_status.name != "AVAILABLE"]
        with _zero3_gathered(partitioned) if partitioned else contextlib.nullcontext():
            yield _whole(weight, where), _whole(bias, where)


def check_mergeable(layer: nn.Module) -> None:
    """Raises ValueError when merge cannot write into the layer's weight: a sharded weight
    (FSDP2 DTensor, ZeRO-3 partition) would need every process to merge its shard together."""
    where = where_weight_lives(layer)
    if where in ("dtensor", "zero3"):
        raise ValueError(
            f"cannot merge into a base layer whose weight is sharded ({_describe(layer)}, "
            f"{'FSDP2' if where == 'dtensor' else 'DeepSpeed ZeRO-3'}): merge needs the whole weight; "
            "gather a full state dict and merge in one process"
        )


@contextlib.contextmanager
def writable_dense_weight(layer: nn.Module) -> Iterator[Tensor]:
    """The weight to merge into, in place: the weight itself when it is dense; for a
    bitsandbytes weight a dequantized float32 copy, requantized into the layer (in the
    dtype it dequantizes to) at the end of a ``with`` that raised nothing, so a failed merge
    leaves the layer as it was. Quantizing again rounds: a merged 4-bit/8-bit layer computes
    close to, not exactly, the unmerged one, and unmerge does not give the original bits back
    (PEFT's LoRA on bitsandbytes does the same, and warns the same)."""
    check_mergeable(layer)
    where = where_weight_lives(layer)
    if where == "dense":
        yield layer.weight
        return
    original = _dequantize(layer, where)
    dense = original.to(torch.float32)
    yield dense
    warnings.warn(
        f"merging into a {where} {type(layer).__name__} quantizes the merged weight again: its outputs "
        "differ from the unmerged adapter's by the rounding, and unmerge() does not restore the original "
        "weight exactly", stacklevel=4)
    _requantize(layer, where, dense.to(original.dtype))
