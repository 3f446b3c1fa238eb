"""torch.autocast and the miss ops: the dtype autocast lowers to, the cast it applies to the
inputs of F.linear, and the autocast kernels of the two layer ops.

The kernels are for users who call the ops directly (MissLinear casts its inputs itself and calls
the ops with autocast off). The two layer ops behave like F.linear, whose place they take:
x, weight and bias are cast to the autocast dtype, the output has that dtype. The block is
NOT cast: the kernels read a block of any float dtype and accumulate in float32, which is
both cheaper and more accurate than a rounded copy. Every other op runs as called (the fold
already reads x in its own dtype and returns float32). torch.library.register_autocast
cannot express this (it casts every floating input to one fixed dtype), so the rule is
registered the way it registers its own: a Python kernel at the Autocast<Device> key, also
as a py_impl so that torch.compile traces it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (the schemas must exist before kernels are added to them)

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
