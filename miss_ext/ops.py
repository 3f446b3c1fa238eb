"""Typed wrappers over torch.ops.miss.*, with their fake kernels and autograd.

The schemas live in csrc/registration.cpp. Every forward op here has an autograd formula
whose backward calls custom ops (plus plain ATen reductions), so torch.compile can trace
training through them. Dropout is driven by a one-element int64 ``seed`` tensor drawn with
:func:`dropout_seed` from torch's generator for the data's device: the ops stay pure, and
backward regenerates the forward's mask from the same seed instead of storing it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the library registers torch.ops.miss)

__all__ = [
    "dropout_seed",
    "shard_fold",
    "shard_tile_add",
    "shard_linear",
    "shard_delta_add",
    "bat_weight",
    "bat_block_grad",
    "bat_weight_grad",
    "bat_linear",
    "merge_",
    "unmerge_",
    "autocast_dtype",
    "autocast_cast",
]


def dropout_seed(device: torch.device | str) -> Tensor:
    """A one-element int64 seed tensor drawn from torch's default generator for ``device``.

    So ``torch.manual_seed`` makes dropout reproducible; on CUDA the seed stays on the device
    (no host sync) and the kernels read it there.
    """
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device=device)


def _rows(t: Tensor):
    return math.prod(t.shape[:-1])


# Whether torch.autocast exists for a device type, read once here: it cannot change while
# the process runs, and torch.compile cannot trace torch._C._is_autocast_available on some
# torch versions (2.11), while a lookup in this dict traces as a constant.
_AUTOCAST_AVAILABLE = {
    device_type: torch._C._is_autocast_available(device_type)
    for device_type in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "meta")
}


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` lowers to on ``device_type``, or None outside a region."""
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:  # another backend (privateuse1 ...): asked once, then remembered
        available = _AUTOCAST_AVAILABLE[device_type] = torch._C._is_autocast_available(device_type)
    if not available:
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def autocast_cast(t: Optional[Tensor], dtype: torch.dtype, device_type: Optional[str] = None) -> Optional[Tensor]:
    """``t`` cast as autocast casts the inputs of ``F.linear``: floating tensors other than
    float64 (on ``device_type``, when given) go to ``dtype``; a tensor already in ``dtype`` is
    returned as is (no copy)."""
    if (
        t is None
        or not t.is_floating_point()
        or t.dtype in (dtype, torch.float64)
        or (device_type is not None and t.device.type != device_type)
    ):
        return t
    return t.to(dtype)


# ---------------------------------------------------------------------------------------
# Python entry points. Each returns what a user wants; extra outputs (the fold kept for
# backward) stay internal.


def shard_fold(x: Tensor, r: int, p: float = 0.0, seed: Optional[Tensor] = None) -> Tensor:
    """``fold[n, c] = sum over i % r == c of drop(x)[n, i]``: ``[..., in] -> [N, r]`` float32."""
    return torch.ops.miss.shard_fold(x, r, p, seed)


def shard_tile_add(grad_x: Tensor, g: Tensor, p: float = 0.0, seed: Optional[Tensor] = None) -> Tensor:
    """``grad_x + drop(n, i) * g[n, i % r]``: the adjoint of :func:`shard_fold`, added to grad_x."""
    return torch.ops.miss.shard_tile_add(grad_x, g, p, seed)


def shard_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    block: Tensor,
    p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> Tensor:
    """The layer adapted by a standard (block ``[r, out]``) or mini (``[r, mini_r]``) adapter."""
    return torch.ops.miss.shard_linear(x, weight, bias, block, p, seed)[0]


def shard_delta_add(
    y: Tensor, x: Tensor, block: Tensor, p: float = 0.0, seed: Optional[Tensor] = None
) -> Tensor:
    """``y`` plus the contribution of one more standard/mini adapter on input ``x``."""
    return torch.ops.miss.shard_delta_add(y, x, block, p, seed)[0]


def bat_weight(weight: Tensor, block: Tensor) -> Tensor:
    """``W'_kj = W_kj + W_kj @ B_k + B_k`` for every r x r tile (block ``[out/r, r, r]``)."""
    return torch.ops.miss.bat_weight(weight, block)


def bat_block_grad(grad_weight: Tensor, weight: Tensor, r: int) -> Tensor:
    """``dB_k = sum_j W_kj^T G_kj + G_kj`` (float32), G the gradient with respect to W'."""
    return torch.ops.miss.bat_block_grad(grad_weight, weight, r)


def bat_weight_grad(grad_weight: Tensor, block: Tensor) -> Tensor:
    """``dW_kj = G_kj (I + B_k)^T``, G the gradient with respect to W'."""
    return torch.ops.miss.bat_weight_grad(grad_weight, block)


def bat_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], block: Tensor) -> Tensor:
    """The layer adapted by a BAT adapter; W' is rebuilt in backward, never kept."""
    return torch.ops.miss.bat_linear(x, weight, bias, block)


def merge_(weight: Tensor, block: Tensor, check_finite: bool = False) -> None:
    """Adds the adapter's delta to ``weight`` in place (variant read from the block's rank)."""
    torch.ops.miss.merge_(weight, block, check_finite)


def unmerge_(weight: Tensor, block: Tensor) -> None:
    """Undoes :func:`merge_` in place; a bat unmerge refuses an ill-conditioned ``I + B_k``."""
    torch.ops.miss.unmerge_(weight, block)


# ---------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only, for torch.compile, meta tensors and opcheck. A call
# that mixes meta tensors with real ones is dispatched here too, so the device rule of the
# kernels is repeated: otherwise such a call would return uninitialised real tensors.


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels accumulate in (csrc/checks.h accumulate_dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_devices(op: str, reference: tuple, *others: tuple, seed: Optional[Tensor] = None):
    ref_name, ref = reference
    for name, t in others:
        if t is not None:
            torch._check(
                t.device == ref.device,
                lambda: f"miss.{op}: argument '{name}' must be on the same device as "
                f"'{ref_name}' ({ref.device}), got {t.device}",
            )
    if seed is not None:
        torch._check(
            seed.device == ref.device or seed.device.type == "cpu",
            lambda: f"miss.{op}: argument 'seed' must be on {ref.device} or the CPU, got {seed.device}",
        )


def _fold_like(x: Tensor, r) -> Tensor:
    return x.new_empty((_rows(x), r), dtype=_accumulate_dtype(x.dtype))


@torch.library.register_fake("miss::shard_fold")
def _(x, r, p=0.0, seed=None):
    _check_devices("shard_fold", ("x", x), seed=seed)
    return _fold_like(x, r)


@torch.library.register_fake("miss::shard_tile_add")
def _(grad_x, g, p=0.0, seed=None):
    _check_devices("shard_tile_add", ("grad_x", grad_x), ("g", g), seed=seed)
    return torch.empty_like(grad_x, memory_format=torch.contiguous_format)


@torch.library.register_fake("miss::shard_linear")
def _(x, weight, bias, block, p=0.0, seed=None):
    _check_devices("shard_linear", ("x", x), ("weight", weight), ("bias", bias), ("block", block), seed=seed)
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, _fold_like(x, block.shape[0])


@torch.library.register_fake("miss::shard_delta_add")
def _(y, x, block, p=0.0, seed=None):
    _check_devices("shard_delta_add", ("x", x), ("y", y), ("block", block), seed=seed)
    out = torch.empty_like(y, memory_format=torch.contiguous_format)
    return out, _fold_like(x, block.shape[0])


@torch.library.register_fake("miss::shard_linear_backward")
def _(grad_out, fold, weight, block, in_features, p, seed, grad_fold, output_mask):
    _check_devices(
        "shard_linear_backward",
        ("grad_out", grad_out),
        ("fold", fold),
        ("weight", weight),
        ("block", block),
        ("grad_fold", grad_fold),
        seed=seed,
    )
    need_x, need_block = output_mask
    grad_x = grad_out.new_empty((*grad_out.shape[:-1], in_features) if need_x else (0,))
    grad_block = block.new_empty(block.shape if need_block else (0,))
    return grad_x, grad_block


@torch.library.register_fake("miss::bat_weight")
def _(weight, block):
    _check_devices("bat_weight", ("weight", weight), ("block", block))
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("miss::bat_block_grad")
def _(grad_weight, weight, r):
    _check_devices("bat_block_grad", ("weight", weight), ("grad_weight", grad_weight))
    return weight.new_empty((weight.shape[0] // r, r, r), dtype=_accumulate_dtype(weight.dtype))


@torch.library.register_fake("miss::bat_weight_grad")
def _(grad_weight, block):
    _check_devices("bat_weight_grad", ("grad_weight", grad_weight), ("block", block))
    return torch.empty_like(grad_weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("miss::bat_linear")
def _(x, weight, bias, block):
    _check_devices("bat_linear", ("weight", weight), ("x", x), ("bias", bias), ("block", block))
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("miss::bat_linear_backward")
def _(grad_out, x, weight, block, output_mask):
    _check_devices("bat_linear_backward", ("weight", weight), ("x", x), ("grad_out", grad_out), ("block", block))
    need_x, need_weight, need_block = output_mask
    return (
        x.new_empty(x.shape if need_x else (0,)),
        weight.new_empty(weight.shape if need_weight else (0,)),
        block.new_empty(block.shape if need_block else (0,)),
    )


@torch.library.register_fake("miss::merge_")
def _(weight, block, check_finite=False):
    _check_devices("merge_", ("weight", weight), ("block", block))
    return None


@torch.library.register_fake("miss::unmerge_")
def _(weight, block):
    _check_devices("unmerge_", ("weight", weight), ("block", block))
    return None


# ---------------------------------------------------------------------------------------
# Autograd. Only O(1) and [N, r] tensors are saved for standard/mini (the fold and the
# seed); BAT saves x and the weight it already references, never W'.


def _linear_base_grads(ctx, grad_out: Tensor, x: Optional[Tensor]):
    """Gradients of the frozen part (weight, bias) when a user trains them."""
    grad_weight = grad_bias = None
    out_features = grad_out.shape[-1]
    if ctx.needs_input_grad[1]:
        grad_weight = grad_out.reshape(-1, out_features).t().mm(x.reshape(-1, x.shape[-1]))
    if ctx.needs_input_grad[2]:
        grad_bias = grad_out.reshape(-1, out_features).sum(0)
    return grad_weight, grad_bias


def _materialize_only_when_used(ctx, output) -> None:
    """Unused outputs get None, not zeros: the fold output is rarely used, and a zero
    grad_fold would cost the backward a pass over grad_x (the weight path) for nothing."""
    ctx.set_materialize_grads(False)
    ctx.y_shape, ctx.y_dtype = output[0].shape, output[0].dtype


def _grad_out_or_zeros(ctx, grad_out, like: Tensor) -> Tensor:
    return like.new_zeros(ctx.y_shape, dtype=ctx.y_dtype) if grad_out is None else grad_out


def _shard_linear_setup(ctx, inputs, output):
    x, weight, bias, block, p, seed = inputs
    _, fold = output
    _materialize_only_when_used(ctx, output)
    ctx.p = p
    ctx.in_features = x.shape[-1]
    ctx.save_for_backward(fold, weight, block, seed, x if weight.requires_grad else None)


def _shard_linear_backward(ctx, grad_out, grad_fold):
    fold, weight, block, seed, x = ctx.saved_tensors
    grad_out = _grad_out_or_zeros(ctx, grad_out, fold)
    need_x, need_block = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_x = grad_block = None
    if need_x or need_block:
        grad_x, grad_block = torch.ops.miss.shard_linear_backward(
            grad_out, fold, weight, block, ctx.in_features, ctx.p, seed, grad_fold, [need_x, need_block]
        )
    grad_weight, grad_bias = _linear_base_grads(ctx, grad_out, x)
    return (
        grad_x if need_x else None,
        grad_weight,
        grad_bias,
        grad_block if need_block else None,
        None,
        None,
    )


torch.library.register_autograd(
    "miss::shard_linear", _shard_linear_backward, setup_context=_shard_linear_setup
)


def _shard_delta_add_setup(ctx, inputs, output):
    y, x, block, p, seed = inputs
    _, fold = output
    _materialize_only_when_used(ctx, output)
    ctx.p = p
    ctx.in_features = x.shape[-1]
    ctx.save_for_backward(fold, block, seed)


def _shard_delta_add_backward(ctx, grad_out, grad_fold):
    fold, block, seed = ctx.saved_tensors
    grad_out = _grad_out_or_zeros(ctx, grad_out, fold)
    need_x, need_block = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    grad_x = grad_block = None
    if need_x or need_block:
        grad_x, grad_block = torch.ops.miss.shard_linear_backward(
            grad_out, fold, None, block, ctx.in_features, ctx.p, seed, grad_fold, [need_x, need_block]
        )
    return (
        grad_out if ctx.needs_input_grad[0] else None,
        grad_x if need_x else None,
        grad_block if need_block else None,
        None,
        None,
    )


torch.library.register_autograd(
    "miss::shard_delta_add", _shard_delta_add_backward, setup_context=_shard_delta_add_setup
)


def _shard_fold_setup(ctx, inputs, output):
    x, r, p, seed = inputs
    ctx.p = p
    ctx.x_shape = x.shape
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(seed)


def _shard_fold_backward(ctx, grad_fold):
    (seed,) = ctx.saved_tensors
    zeros = grad_fold.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)
    return torch.ops.miss.shard_tile_add(zeros, grad_fold, ctx.p, seed), None, None, None


torch.library.register_autograd("miss::shard_fold", _shard_fold_backward, setup_context=_shard_fold_setup)


def _shard_tile_add_setup(ctx, inputs, output):
    grad_x, g, p, seed = inputs
    ctx.p = p
    ctx.r = g.shape[1]
    ctx.g_dtype = g.dtype
    ctx.save_for_backward(seed)


def _shard_tile_add_backward(ctx, grad_out):
    (seed,) = ctx.saved_tensors
    grad_g = None
    if ctx.needs_input_grad[1]:
        # The adjoint of "tile g across the shards" is the fold, with the same mask.
        grad_g = torch.ops.miss.shard_fold(grad_out, ctx.r, ctx.p, seed).to(ctx.g_dtype)
    return grad_out if ctx.needs_input_grad[0] else None, grad_g, None, None


torch.library.register_autograd(
    "miss::shard_tile_add", _shard_tile_add_backward, setup_context=_shard_tile_add_setup
)


def _bat_weight_setup(ctx, inputs, output):
    weight, block = inputs
    ctx.save_for_backward(weight, block)


def _bat_weight_backward(ctx, grad_out):
    weight, block = ctx.saved_tensors
    grad_weight = grad_block = None
    if ctx.needs_input_grad[0]:
        grad_weight = torch.ops.miss.bat_weight_grad(grad_out, block)
    if ctx.needs_input_grad[1]:
        grad_block = torch.ops.miss.bat_block_grad(grad_out, weight, block.shape[-1]).to(block.dtype)
    return grad_weight, grad_block


torch.library.register_autograd("miss::bat_weight", _bat_weight_backward, setup_context=_bat_weight_setup)


def _bat_linear_setup(ctx, inputs, output):
    x, weight, bias, block = inputs
    ctx.save_for_backward(x, weight, block)


def _bat_linear_backward(ctx, grad_out):
    x, weight, block = ctx.saved_tensors
    need_x, need_weight, need_block = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    grad_x = grad_weight = grad_block = None
    if need_x or need_weight or need_block:
        grad_x, grad_weight, grad_block = torch.ops.miss.bat_linear_backward(
            grad_out, x, weight, block, [need_x, need_weight, need_block]
        )
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
    return (
        grad_x if need_x else None,
        grad_weight if need_weight else None,
        grad_bias,
        grad_block if need_block else None,
    )


torch.library.register_autograd("miss::bat_linear", _bat_linear_backward, setup_context=_bat_linear_setup)


# ---------------------------------------------------------------------------------------
# Autocast, for users who call the ops directly (MissLinear casts its inputs itself and calls
# the ops with autocast off). The two layer ops behave like F.linear, whose place they take:
# x, weight and bias are cast to the autocast dtype, the output has that dtype. The block is
# NOT cast: the kernels read a block of any float dtype and accumulate in float32, which is
# both cheaper and more accurate than a rounded copy. Every other op runs as called (the fold
# already reads x in its own dtype and returns float32). torch.library.register_autocast
# cannot express this (it casts every floating input to one fixed dtype), so the rule is
# registered the way it registers its own: a Python kernel at the Autocast<Device> key, also
# as a py_impl so that torch.compile traces it.

_AUTOCAST_CAST_ARGS = {"shard_linear": (0, 1, 2), "bat_linear": (0, 1, 2)}
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")
_autocast_lib = torch.library.Library("miss", "IMPL")


def _register_autocast(op_name: str, positions: tuple, device_type: str) -> None:
    op = getattr(torch.ops.miss, op_name).default
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def cast_and_redispatch(*args):
        dtype = torch.get_autocast_dtype(device_type)
        args = tuple(autocast_cast(a, dtype, device_type) if i in positions else a for i, a in enumerate(args))
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*args)

    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key, None)
    op.py_impl(key)(cast_and_redispatch)
    _autocast_lib.impl(op_name, lambda _keyset, *args: cast_and_redispatch(*args), key_name, with_keyset=True)


for _name, _positions in _AUTOCAST_CAST_ARGS.items():
    for _device_type in _AUTOCAST_DEVICE_TYPES:
        _register_autocast(_name, _positions, _device_type)

# Autograd of the backward ops (double backward) and of the in-place ops: imported for the
# registrations they make.
from . import backward_autograd, inplace_autograd  # noqa: E402,F401


def op_names() -> Sequence[str]:
    """Every op of the registry, for tests and docs."""
    return (
        "shard_fold",
        "shard_tile_add",
        "shard_linear",
        "shard_delta_add",
        "shard_linear_backward",
        "bat_weight",
        "bat_block_grad",
        "bat_weight_grad",
        "bat_linear",
        "bat_linear_backward",
        "merge_",
        "unmerge_",
    )
