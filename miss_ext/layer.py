"""MissLinear: an nn.Linear adapted by one or more named MiSS adapters.

The forward runs through torch.ops.miss only: no Python loop over shards, no copy of x, no
repeated block. Several adapters can sit on one layer, each with its own variant, r, mini_r
and dropout (PEFT takes the variant from the first adapter only): active BAT adapters
transform the weight in order (W1 = W + delta_1(W), W2 = W1 + delta_2(W1), ...), and active
standard/mini adapters add their contributions on top.

The attribute layout follows PEFT's MissLinear (``base_layer``, ``miss_block`` as a
ParameterDict keyed by adapter name), so state dicts line up with PEFT's.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import base_layers
from . import ops as kernel_ops
from . import reference as reference_ops
from .adapter_names import ActiveAdapters, checked_names
from .config import check_adapter_hyperparameters, variant_of

BACKENDS = ("kernels", "reference")


def check_adapter_name(adapter_name) -> None:
    """A name that can key a ParameterDict: a non-empty str without '.'."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty str without '.', got {adapter_name!r}")


def default_block_dtype(weight: Tensor) -> torch.dtype:
    """PEFT's default: float32 adapters on float16/bfloat16 models, else the weight's dtype;
    float32 on a quantized weight (bitsandbytes stores packed integers)."""
    if weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point():
        return torch.float32
    return weight.dtype


def block_shape(variant: str, r: int, mini_r: int, in_features: int, out_features: int) -> tuple:
    """The block's shape for a variant, after checking that the layer allows it."""
    if out_features < 1:
        # Refused here, not at the first forward: a [r, 0] block has nothing to train.
        raise ValueError(f"a MiSS adapter needs out_features >= 1, got a layer with in_features={in_features}, "
                         f"out_features={out_features}")
    if r > in_features:
        raise ValueError(f"r ({r}) must be less than or equal to in_features ({in_features})")
    if variant == "bat":
        if in_features % r or out_features % r:
            raise ValueError(
                f"bat needs r ({r}) to divide in_features ({in_features}) and out_features ({out_features}): "
                "the weight must split into [r, r] tiles"
            )
        return (out_features // r, r, r)
    if variant == "mini":
        if out_features % mini_r:
            raise ValueError(f"mini needs mini_r ({mini_r}) to divide out_features ({out_features})")
        return (r, mini_r)
    return (r, out_features)


class MissLinear(ActiveAdapters, nn.Module):
    """An ``nn.Linear`` with MiSS adapters.

    Args:
        base_layer: the frozen ``nn.Linear``.
        adapter_name: name of the first adapter.
        r, mini_r, miss_dropout, init_weights: as in :class:`~miss_ext.MissConfig`.
        block_dtype: dtype of the block; default float32 on fp16/bf16 layers (PEFT's
            default), else the weight's dtype.
        backend: "kernels" (torch.ops.miss) or "reference" (pure PyTorch, for tests and
            benchmarks only).
    """

    adapter_layer_names = ("miss_block",)
    other_param_names = ("miss_r", "miss_dropout", "miss_mini_r")

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str = "default",
        r: int = 64,
        mini_r: int = 1,
        miss_dropout: float = 0.0,
        init_weights: Union[bool, str] = True,
        *,
        block_dtype: Optional[torch.dtype] = None,
        backend: str = "kernels",
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MissLinear adapts an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.miss_block = nn.ParameterDict()
        self.miss_r: dict[str, int] = {}
        self.miss_mini_r: dict[str, int] = {}
        self.miss_dropout: dict[str, float] = {}
        self.miss_variant: dict[str, str] = {}
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapters: list[str] = []
        self.backend = backend
        self.update_layer(adapter_name, r, mini_r, miss_dropout, init_weights, block_dtype=block_dtype)
        self.set_adapter(adapter_name)

    # -- adapters ---------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        mini_r: int = 1,
        miss_dropout: float = 0.0,
        init_weights: Union[bool, str] = True,
        *,
        block_dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Adds an adapter (inactive until :meth:`set_adapter`); the layer is unchanged on error."""
        check_adapter_name(adapter_name)
        if adapter_name in self.miss_block:
            raise ValueError(f"adapter {adapter_name!r} already exists on this layer")
        check_adapter_hyperparameters(r, mini_r, miss_dropout, init_weights)
        variant = variant_of(init_weights)
        shape = block_shape(variant, r, mini_r, self.in_features, self.out_features)
        weight = self.base_layer.weight
        dtype = block_dtype if block_dtype is not None else default_block_dtype(weight)
        block = torch.zeros(shape, dtype=dtype, device=weight.device)
        if init_weights is False:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        # A new adapter is trainable only once it is active (set_adapter), as in PEFT.
        self.miss_block[adapter_name] = nn.Parameter(block, requires_grad=adapter_name in self._active_adapters)
        self.miss_r[adapter_name] = r
        self.miss_mini_r[adapter_name] = mini_r
        self.miss_dropout[adapter_name] = float(miss_dropout)
        self.miss_variant[adapter_name] = variant

    def set_adapter(self, adapter_names: Union[str, Sequence[str]]) -> None:
        """Makes these adapters active (and trainable); the others inactive and frozen."""
        names = checked_names(adapter_names, self.miss_block, "layer")
        for name, block in self.miss_block.items():
            block.requires_grad_(name in names)
        self._active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.miss_block:
            raise ValueError(f"unknown adapter {adapter_name!r}; this layer has {list(self.miss_block)}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the weight: unmerge() before deleting it")
        del self.miss_block[adapter_name]
        for table in (self.miss_r, self.miss_mini_r, self.miss_dropout, self.miss_variant):
            del table[adapter_name]
        if adapter_name in self._active_adapters:
            remaining = [n for n in self._active_adapters if n != adapter_name]
            if not remaining and len(self.miss_block):
                remaining = [next(iter(self.miss_block))]
            self.set_adapter(remaining)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Turns the adapters on or off; off, the layer computes exactly ``base_layer(x)`` and
        no block is trainable (as in PEFT)."""
        if enabled:
            self.set_adapter(self._active_adapters)
        else:
            for block in self.miss_block.values():
                block.requires_grad_(False)
        self._disable_adapters = not enabled

    # -- merge ------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _merge_order(self, adapter_names: Optional[Sequence[str]]) -> list[str]:
        """The adapters merge() would merge, in merge order, after checking they can be."""
        names = checked_names(self.active_adapters if adapter_names is None else adapter_names,
                              self.miss_block, "layer")
        names = [n for n in names if n not in self.merged_adapters]
        bats = [n for n in names if self.miss_variant[n] == "bat"]
        merged_shards = [n for n in self.merged_adapters if self.miss_variant[n] != "bat"]
        if bats and merged_shards:
            raise ValueError(
                f"cannot merge bat adapter(s) {bats} on top of merged standard/mini adapter(s) {merged_shards}: "
                "bat transforms the weight, so unmerge() first and merge them together"
            )
        return bats + [n for n in names if n not in bats]

    # Not `_apply`: nn.Module._apply is what .to(), .cuda(), .half() ... call on every module.
    def _merge_blocks_into(self, weight: Tensor, names: Sequence[str], merge: bool,
                           check_finite: bool = False) -> None:
        with torch.no_grad():
            for name in names:
                block = self.miss_block[name].detach()
                if merge:
                    kernel_ops.merge_(weight, block, check_finite=check_finite)
                else:
                    kernel_ops.unmerge_(weight, block)

    def check_merge(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Raises what merge() would raise, changing nothing (with safe_merge, the merge is
        rehearsed on a copy of the weight)."""
        names = self._merge_order(adapter_names)
        base_layers.check_mergeable(self.base_layer)
        if safe_merge and names:
            with base_layers.dense_weight(self.base_layer) as weight:
                self._merge_blocks_into(weight.detach().clone(), names, merge=True, check_finite=True)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Merges adapters (default: the active ones) into the base weight, in place.

        BAT adapters are merged first, in order, then standard/mini ones, which is what the
        unmerged forward computes. ``safe_merge`` refuses a merge that would put NaN/Inf into
        the weight; on any error the weight is bit-identical to before.
        """
        names = self._merge_order(adapter_names)
        already = [n for n in (self.active_adapters if adapter_names is None else adapter_names)
                   if n in self.merged_adapters]
        if already:
            warnings.warn(f"adapter(s) {already} are already merged; merging only the others")
        base_layers.check_mergeable(self.base_layer)
        if safe_merge and len(names) > 1:
            self.check_merge(safe_merge, names)  # one adapter's merge_ is already all-or-nothing
        if not names:
            return
        with base_layers.writable_dense_weight(self.base_layer) as weight:
            self._merge_blocks_into(weight, names, merge=True, check_finite=safe_merge)
        self.merged_adapters.extend(names)

    def check_unmerge(self) -> None:
        """Raises what unmerge() would raise (a singular bat block), changing nothing."""
        if any(self.miss_variant[n] == "bat" for n in self.merged_adapters):
            with base_layers.dense_weight(self.base_layer) as weight:
                self._merge_blocks_into(weight.detach().clone(), self.merged_adapters[::-1], merge=False)

    def unmerge(self) -> None:
        """Undoes every merge, last merged first; on error the weight is unchanged."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        if len(self.merged_adapters) > 1:
            self.check_unmerge()  # one adapter's unmerge_ is already all-or-nothing
        with base_layers.writable_dense_weight(self.base_layer) as weight:
            self._merge_blocks_into(weight, self.merged_adapters[::-1], merge=False)
        self.merged_adapters.clear()

    def get_delta_weight(self, adapter: str) -> Tensor:
        """``W_merged - W`` for one adapter on the current base weight, in float32 (float64 for
        float64 weights), computed without touching the weight."""
        if adapter not in self.miss_block:
            raise ValueError(f"unknown adapter {adapter!r}; this layer has {list(self.miss_block)}")
        with base_layers.dense_weight(self.base_layer) as weight:
            return self._delta_weight(adapter, weight.detach())

    def _delta_weight(self, adapter: str, weight: Tensor) -> Tensor:
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        block = self.miss_block[adapter].detach()
        with torch.no_grad():
            if self.miss_variant[adapter] == "bat":
                w = weight.to(dtype)
                return kernel_ops.bat_weight(w, block) - w
            delta = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
            kernel_ops.merge_(delta, block)
            return delta

    # -- forward ----------------------------------------------------------------------------

    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    def _dropout_args(self, name: str, x: Tensor):
        p = self.miss_dropout[name] if self.training else 0.0
        return (p, kernel_ops.dropout_seed(x.device)) if p > 0.0 else (0.0, None)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if not x.is_floating_point():
            raise TypeError(f"MissLinear: x must be a floating-point tensor, got dtype {x.dtype}")
        names = [n for n in self._active_adapters if n in self.miss_block]
        if self.merged or not names:
            return self.base_layer(x, *args, **kwargs)
        fused = None if args or kwargs else base_layers.fused_weight_and_bias(self.base_layer)
        if fused is None:
            return self._through_base_layer(names, x, *args, **kwargs)
        return self._fused(names, x, *fused)

    def _fused(self, names: list, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The adapted layer by the fused ops, which read ``weight`` themselves."""
        device_type = x.device.type
        autocast_dtype = kernel_ops.autocast_dtype(device_type)
        if autocast_dtype is None:
            x_in = x if x.dtype == weight.dtype else x.to(weight.dtype)
            return self._adapted(names, x_in, weight, bias).to(x.dtype)
        # Inside torch.autocast the layer does what the nn.Linear it replaces does: x, weight
        # and bias go to the autocast dtype (x without a copy when it has it already) and so
        # does the output. The blocks are not cast: the kernels read them in their own dtype
        # and accumulate in float32. The ops run with autocast off, since the casts are done.
        x_in, weight, bias = (kernel_ops.autocast_cast(t, autocast_dtype, device_type) for t in (x, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return self._adapted(names, x_in, weight, bias)

    def _through_base_layer(self, names: list, x: Tensor, *args, **kwargs) -> Tensor:
        """The adapted layer where the base layer must run as itself (hooks, a quantized or
        sharded weight: see base_layers.py): standard/mini add their delta to
        ``base_layer(x)``; bat, which replaces the weight, runs the fused op on the dense
        weight (dequantized or gathered), as PEFT does, without calling the base layer."""
        ops = reference_ops if self._backend == "reference" else kernel_ops
        bats = [n for n in names if self.miss_variant[n] == "bat"]
        shards = [n for n in names if self.miss_variant[n] != "bat"]
        if bats:
            if args or kwargs:
                raise TypeError(f"MissLinear: a bat adapter replaces the weight and takes x only, got extra "
                                f"arguments {args} {sorted(kwargs)} for the base layer")
            self._check_bat_base(bats)
            with base_layers.dense_weight_and_bias(self.base_layer) as (weight, bias):
                y = self._fused(bats, x, weight, bias)
        else:
            base_layers.prepare_to_call(self.base_layer)
            y = self.base_layer(x, *args, **kwargs)
        for name in shards:
            y = ops.shard_delta_add(y, x, self.miss_block[name], *self._dropout_args(name, x))
        return y if kernel_ops.autocast_dtype(x.device.type) is not None else y.to(x.dtype)

    def _check_bat_base(self, bats: list) -> None:
        if self.base_layer.weight.requires_grad and base_layers.where_weight_lives(self.base_layer) != "dense":
            raise ValueError(
                f"bat adapter(s) {bats} on a base layer ({type(self.base_layer).__name__}) whose weight is "
                "quantized or sharded train the block only: freeze base_layer.weight (requires_grad_(False))"
            )

    def _adapted(self, names: list, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The adapted layer on ``x`` (already in the weight's dtype), in that dtype."""
        ops = reference_ops if self._backend == "reference" else kernel_ops
        bats = [n for n in names if self.miss_variant[n] == "bat"]
        shards = [n for n in names if self.miss_variant[n] != "bat"]
        if bats:
            for name in bats[:-1]:
                weight = ops.bat_weight(weight, self.miss_block[name])
            y = ops.bat_linear(x, weight, bias, self.miss_block[bats[-1]])
        else:
            first = shards.pop(0)
            y = ops.shard_linear(x, weight, bias, self.miss_block[first], *self._dropout_args(first, x))
        for name in shards:
            y = ops.shard_delta_add(y, x, self.miss_block[name], *self._dropout_args(name, x))
        return y

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{name}: {self.miss_variant[name]} r={self.miss_r[name]}"
            + (f" mini_r={self.miss_mini_r[name]}" if self.miss_variant[name] == "mini" else "")
            + (f" dropout={self.miss_dropout[name]}" if self.miss_dropout[name] else "")
            + f" {str(block.dtype).replace('torch.', '')}"
            for name, block in self.miss_block.items()
        )
        state = "merged" if self.merged else ("disabled" if self.disable_adapters else f"active={self.active_adapters}")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters={{{adapters}}}, {state}, backend={self._backend}"
        )
