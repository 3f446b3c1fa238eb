"""Hugging Face PEFT and miss_ext: PEFT's MiSS models on miss_ext's kernels, and conversions.

- :func:`use_miss_kernels` makes an existing PEFT MiSS model (``peft.get_peft_model`` or
  ``peft.PeftModel.from_pretrained``) compute its MiSS layers with ``torch.ops.miss``: each PEFT
  ``MissLinear`` gets an instance-level ``forward`` that reads PEFT's own attributes
  (``miss_block``, ``miss_dropout``, ``miss_fn``, ``miss_mini_r``, active adapters, disabled and
  merged state). Nothing is added to or removed from the model's parameters, buffers or
  ``state_dict``; saving, merging, ``set_adapter`` and the rest of PEFT work as before.
  :func:`restore_peft_forward` removes those forwards again.
- :func:`peft_to_miss_model` turns a PEFT MiSS model into a :class:`miss_ext.MissModel`, and
  :func:`miss_model_to_peft` a MissModel into a PEFT model: same base modules, same adapters
  (values, dtypes, active set, trainable flags, train/eval flags); :func:`to_peft_config` gives
  the ``peft.MissConfig`` of a miss_ext config.

The kernel forward keeps PEFT's semantics exactly: the variant of every adapter on a layer is
the layer's ``miss_fn`` (PEFT takes it from the layer's first adapter), active BAT adapters
compose in order, standard/mini adapters add up, dropout applies where PEFT's ``miss_dropout``
module is an ``nn.Dropout`` in training mode (BAT: none, as in PEFT), and the output has x's
dtype (PEFT casts its result back to ``previous_dtype``, also under autocast). The dropout
masks are miss_ext's (Philox, seeded from torch's generator), not those of ``nn.Dropout``:
equal in distribution, not bit for bit. Any call the kernels do not cover exactly (extra
forward arguments such as ``adapter_names``, a base layer that is not a plain ``nn.Linear``,
a quantization backend, a block whose shape PEFT's forward would reject, a custom dropout
module, a disabled or merged layer) runs PEFT's own forward, so its results and its errors
stay PEFT's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import types
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops as kernel_ops
from ..base_layers import reads_weight_directly
from ..config import MissConfig, variant_of
from ..model import MissModel

__all__ = ["use_miss_kernels", "restore_peft_forward", "uses_miss_kernels", "peft_to_miss_model", "miss_model_to_peft",
           "to_peft_config"]


def _peft():
    try:
        import peft
    except ImportError as error:  # pragma: no cover - the tests need peft
        raise ImportError("miss_ext.integrations.peft needs the `peft` package (pip install peft)") from error
    return peft


def _peft_layer_class():
    from peft.tuners.miss.layer import MissLinear as PeftMissLinear

    return PeftMissLinear


def _peft_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    cls = _peft_layer_class()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


# ---------------------------------------------------------------------------------------
# PEFT's layers on our kernels


def _dropout_p(module: nn.Module) -> Optional[float]:
    """The dropout probability PEFT's ``miss_dropout[adapter]`` applies now; None when it is a
    module whose effect the kernels cannot reproduce."""
    if type(module) is nn.Identity:
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p) if module.training else 0.0
    return None


def _block_fits(layer: nn.Module, name: str, block: Tensor) -> bool:
    """Whether PEFT's forward would accept this block and compute what the kernels compute."""
    in_features, out_features = layer.in_features, layer.out_features
    if not block.is_floating_point() or block.device != layer.get_base_layer().weight.device:
        return False
    if layer.miss_fn == "bat":
        if block.dim() != 3 or block.shape[1] != block.shape[2]:
            return False
        r = block.shape[-1]
        return in_features % r == 0 and block.shape[0] * r == out_features
    if block.dim() != 2 or not 0 < block.shape[0] <= in_features:
        return False
    if layer.miss_fn == "mini":  # PEFT: block.repeat(1, out // mini_r) must give [r, out]
        m = layer.miss_mini_r.get(name)
        return block.shape[1] == m and out_features % m == 0
    # standard: [r, out], or [r, 1], which PEFT broadcasts over every output (= mini_r 1)
    return block.shape[1] in (out_features, 1)


def _kernel_plan(layer: nn.Module, x, args: tuple, kwargs: dict) -> Optional[list[str]]:
    """The adapters the kernel forward computes for this call, or None for PEFT's forward."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    base = layer.get_base_layer()
    # Hooks, a Linear subclass, a quantized or sharded weight: PEFT's forward calls the base layer.
    if not reads_weight_directly(base) or getattr(layer, "quantization_backend", None) is not None:
        return None
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0 or x.shape[-1] != layer.in_features:
        return None
    if base.bias is not None and base.bias.dtype != base.weight.dtype:
        return None
    names = [n for n in layer.active_adapters if n in layer.miss_block]
    if not names:
        return None
    for name in names:
        if not _block_fits(layer, name, layer.miss_block[name]):
            return None
        if layer.miss_fn != "bat" and _dropout_p(layer.miss_dropout[name]) is None:
            return None
    if layer.miss_fn != "bat" and x.dtype != base.weight.dtype and kernel_ops.autocast_dtype(x.device.type) is None:
        return None  # PEFT's base_layer(x) raises on mixed dtypes: let it
    return names


def _kernel_forward(self, x, *args, **kwargs):
    """PEFT ``MissLinear.forward`` on torch.ops.miss (bound to one layer by use_miss_kernels)."""
    names = _kernel_plan(self, x, args, kwargs)
    if names is None:
        return type(self).forward(self, x, *args, **kwargs)
    previous_dtype = x.dtype
    base = self.get_base_layer()
    weight, bias = base.weight, base.bias
    device_type = x.device.type
    autocast_dtype = kernel_ops.autocast_dtype(device_type)
    if autocast_dtype is None:
        x_in = x if x.dtype == weight.dtype else x.to(weight.dtype)
        context = contextlib.nullcontext()
    else:  # the dtype PEFT's base_layer(x) would compute in; the blocks are read as they are
        x_in, weight, bias = (kernel_ops.autocast_cast(t, autocast_dtype, device_type) for t in (x, weight, bias))
        context = torch.autocast(device_type, enabled=False)
    with context:
        if self.miss_fn == "bat":
            for name in names[:-1]:
                weight = kernel_ops.bat_weight(weight, self.miss_block[name])
            y = kernel_ops.bat_linear(x_in, weight, bias, self.miss_block[names[-1]])
        else:
            y = None
            for name in names:
                p = _dropout_p(self.miss_dropout[name])
                seed = kernel_ops.dropout_seed(x_in.device) if p > 0.0 else None  # as MissLinear draws it
                block = self.miss_block[name]
                if y is None:
                    y = kernel_ops.shard_linear(x_in, weight, bias, block, p, seed)
                else:
                    y = kernel_ops.shard_delta_add(y, x_in, block, p, seed)
    return y.to(previous_dtype)


def _is_patched(layer: nn.Module) -> bool:
    forward = layer.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _kernel_forward


def use_miss_kernels(model: nn.Module) -> int:
    """Makes every PEFT MiSS layer in ``model`` (a ``PeftModel`` or any module holding PEFT
    ``MissLinear`` layers) compute with miss_ext's kernels; returns how many layers there are.

    The state_dict is unchanged; calling it again is harmless (layers added since, e.g. by
    ``load_adapter``, are patched too). Undo with :func:`restore_peft_forward`.
    """
    layers = _peft_layers(model)
    if not layers:
        raise ValueError("no PEFT MiSS layer (peft.tuners.miss.layer.MissLinear) in this model")
    taken = [name for name, layer in layers if "forward" in layer.__dict__ and not _is_patched(layer)]
    if taken:
        raise ValueError(f"layers {taken[:3]} already have an instance-level forward set by someone else; "
                         "miss_ext leaves them alone")
    for _, layer in layers:
        if not _is_patched(layer):
            layer.forward = types.MethodType(_kernel_forward, layer)
    return len(layers)


def restore_peft_forward(model: nn.Module) -> int:
    """Undoes :func:`use_miss_kernels`: PEFT's own forward again; returns how many layers
    were restored."""
    restored = 0
    for _, layer in _peft_layers(model):
        if _is_patched(layer):
            del layer.__dict__["forward"]
            restored += 1
    return restored


def uses_miss_kernels(model: nn.Module) -> bool:
    """Whether every PEFT MiSS layer of ``model`` runs on miss_ext's kernels."""
    layers = _peft_layers(model)
    return bool(layers) and all(_is_patched(layer) for _, layer in layers)


# ---------------------------------------------------------------------------------------
# Conversions


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def _tuner_of(peft_model: nn.Module):
    """PEFT's MiSS tuner (peft.tuners.miss.MissModel) of a PeftModel, or the tuner itself."""
    from peft.tuners.miss.model import MissModel as PeftTuner

    if isinstance(peft_model, PeftTuner):
        return peft_model
    tuner = getattr(peft_model, "base_model", None)
    if isinstance(peft_model, _peft().PeftModel) and isinstance(tuner, PeftTuner):
        return tuner
    raise TypeError(f"expected a PEFT MiSS model (PeftModel with a MiSS adapter), got {type(peft_model).__name__}")


def _swap(root: nn.Module, replacements: dict) -> dict:
    """Sets each ``root.<path>`` to its module; returns the modules that were there."""
    old = {}
    for path, module in replacements.items():
        parent_name, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        old[path] = getattr(parent, child)
        setattr(parent, child, module)
    return old


def _replace_tensors(target: nn.Module, source: dict, keys) -> None:
    """Gives the parameters/buffers ``keys`` of ``target`` copies of ``source``'s tensors
    (values, dtype and device)."""
    with torch.no_grad():
        for key in keys:
            module_name, _, attr = key.rpartition(".")
            owner = target.get_submodule(module_name) if module_name else target
            current = getattr(owner, attr)
            value = source[key].detach().clone()
            if isinstance(current, nn.Parameter):
                current.data = value
            else:
                setattr(owner, attr, value)


def _adapter_keys(state: dict) -> list[str]:
    return [k for k in state if ".miss_block." in f".{k}" or ".modules_to_save." in f".{k}"]


def _check_same_keys(ours: dict, theirs: dict, direction: str) -> None:
    """miss_ext's and PEFT's layers and wrappers use the same attribute names, so the same
    adapters on the same base model give the same state_dict keys."""
    mine, other = set(ours), set(theirs)
    if mine != other:
        raise ValueError(
            f"{direction}: the two models do not hold the same adapters (targets differ?): "
            f"only in miss_ext: {sorted(mine - other)[:5]}, only in PEFT: {sorted(other - mine)[:5]}"
        )


def to_peft_config(config: MissConfig):
    """The ``peft.MissConfig`` with the same fields, for code that takes only PEFT configs (TRL's
    ``SFTTrainer(peft_config=...)`` refuses any other class); pair the PEFT model it builds with
    :func:`use_miss_kernels` to run it on miss_ext's kernels."""
    peft = _peft()
    if not isinstance(config, MissConfig):
        raise TypeError(f"config must be a miss_ext.MissConfig, got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(peft.MissConfig)} - {"peft_type", "peft_version", "auto_mapping"}
    return peft.MissConfig(**{k: v for k, v in config.to_dict().items() if k in fields})


def peft_to_miss_model(peft_model: nn.Module, *, backend: str = "kernels") -> MissModel:
    """A :class:`~miss_ext.MissModel` with the adapters of a PEFT MiSS model, on the same base
    model (the PEFT model is consumed: its MiSS layers and modules_to_save wrappers are
    replaced by miss_ext's; do not use it afterwards).

    Every adapter comes over with its config, values and dtype; the active adapters, which
    parameters are trainable and the train/eval flags are kept. A merged PEFT model is refused
    (``unmerge_adapter()`` first); on any error the PEFT model is left as it was.
    """
    peft = _peft()
    tuner = _tuner_of(peft_model)
    inner = tuner.model
    configs = {}
    for name, config in tuner.peft_config.items():
        if _plain(config.peft_type) != "MISS":
            raise ValueError(f"adapter {name!r} is a {_plain(config.peft_type)} adapter, not MiSS")
        values = {k: _plain(v) for k, v in config.to_dict().items()}
        values.pop("peft_type", None)
        configs[name] = MissConfig.from_dict(values)
    if not configs:
        raise ValueError("the PEFT model has no adapter")
    layers = _peft_layers(inner)
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"PEFT layers {merged[:3]} are merged: unmerge_adapter() before converting")
    for path, layer in layers:
        for name in layer.miss_block:
            if name in configs and configs[name].variant != variant_of(layer.miss_fn):
                raise ValueError(
                    f"PEFT computes adapter {name!r} on {path!r} as a {variant_of(layer.miss_fn)!r} adapter (the "
                    f"variant of the layer's first adapter), but its config says {configs[name].variant!r}"
                )
    wrapper_cls = peft.utils.other.ModulesToSaveWrapper
    wrappers = [(n, m) for n, m in inner.named_modules() if isinstance(m, wrapper_cls)]
    others = [n for n, m in inner.named_modules()
              if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) and not isinstance(m, _peft_layer_class())]
    if others:
        raise ValueError(f"modules {others[:3]} are PEFT layers of another method: only MiSS converts")

    state = inner.state_dict(keep_vars=True)
    requires_grad = {n: p.requires_grad for n, p in inner.named_parameters()}
    training = {n: m.training for n, m in inner.named_modules()}
    active = list(tuner.active_adapters)
    originals = _swap(inner, {**{n: layer.get_base_layer() for n, layer in layers},
                              **{n: w.original_module for n, w in wrappers}})
    # PEFT's tuner copies its configs onto the model it wraps; its own unload() removes them
    # too (a model carrying them would be taken for a PEFT model by a later get_peft_model).
    peft_attribute = inner.__dict__.pop("peft_config", None)
    try:
        names = list(configs)
        miss_model = MissModel(inner, configs[names[0]], names[0], backend=backend)
        for name in names[1:]:
            miss_model.add_adapter(name, configs[name])
        miss_model.set_adapter([n for n in active if n in configs])
        _check_same_keys(inner.state_dict(), state, "peft_to_miss_model")
    except BaseException:
        _swap(inner, originals)
        if peft_attribute is not None:
            inner.peft_config = peft_attribute
        raise
    _replace_tensors(inner, state, _adapter_keys(state))
    for name, param in inner.named_parameters():
        param.requires_grad_(requires_grad[name])
    for name, module in inner.named_modules():
        if name in training:
            module.training = training[name]
    miss_model.training = miss_model.base_model.training = peft_model.training
    return miss_model


def miss_model_to_peft(miss_model: MissModel):
    """A PEFT MiSS model (what ``peft.get_peft_model`` returns) with the adapters of a
    :class:`~miss_ext.MissModel`, on the same base model (the MissModel is consumed).

    PEFT gives every layer one variant (its first adapter's), so a layer whose adapters have
    different variants is refused, as is a merged model; on any error the MissModel is left as
    it was. Values, dtypes, the active adapters, trainable flags and train/eval flags are kept.
    """
    peft = _peft()
    if not isinstance(miss_model, MissModel):
        raise TypeError(f"expected a miss_ext.MissModel, got {type(miss_model).__name__}")
    if not miss_model.peft_config:
        raise ValueError("the MissModel has no adapter")
    layers = list(miss_model.miss_layers())
    mixed = [n for n, layer in layers if len(set(layer.miss_variant.values())) > 1]
    if mixed:
        raise ValueError(f"layers {mixed[:3]} hold adapters of different variants: PEFT gives a layer one variant "
                         "(that of its first adapter)")
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"layers {merged[:3]} are merged: unmerge_adapter() before converting")

    inner = miss_model.model
    state = inner.state_dict(keep_vars=True)
    requires_grad = {n: p.requires_grad for n, p in inner.named_parameters()}
    training = {n: m.training for n, m in inner.named_modules()}
    configs = {name: to_peft_config(config) for name, config in miss_model.peft_config.items()}
    active = miss_model.active_adapters
    wrappers = list(miss_model._wrappers())
    originals = _swap(inner, {**{n: layer.base_layer for n, layer in layers},
                              **{n: w.original_module for n, w in wrappers}})
    names = list(configs)
    try:
        peft_model = peft.get_peft_model(inner, configs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, configs[name])
        tuner = peft_model.base_model
        tuner.set_adapter(active if len(active) > 1 else active[0])
        _check_same_keys(state, tuner.model.state_dict(), "miss_model_to_peft")
    except BaseException:
        # whatever PEFT put in (its layers and wrappers) goes; ours come back where they were
        _swap(inner, {n: m.get_base_layer() for n, m in _peft_layers(inner)})
        _swap(inner, {n: m.original_module for n, m in inner.named_modules()
                      if isinstance(m, peft.utils.other.ModulesToSaveWrapper)})
        _swap(inner, {**{n: layer for n, layer in layers}, **{n: w for n, w in wrappers}})
        inner.__dict__.pop("peft_config", None)
        raise
    _replace_tensors(tuner.model, state, _adapter_keys(state))
    for name, param in tuner.model.named_parameters():
        param.requires_grad_(requires_grad[name])
    for name, module in tuner.model.named_modules():
        if name in training:
            module.training = training[name]
    for name, layer in _peft_layers(tuner.model):
        for dropout in layer.miss_dropout.modules():
            dropout.training = training[name]
    peft_model.training = tuner.training = miss_model.training
    return peft_model
