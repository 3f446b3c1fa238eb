"""Autograd semantics of the in-place ops ``miss.merge_`` and ``miss.unmerge_``.

The kernels write the weight through a raw pointer, which autograd cannot see. Torch's own
in-place ops do two things that make that safe, and these registrations give our ops both:

- at the ADInplaceOrView key, the mutated tensor's version counter is bumped, so a backward
  that saved the weight before a merge refuses to run ("modified by an inplace operation")
  instead of silently using the merged weight;
- at the Autograd key, a call that autograd would have to record is refused before anything
  is written: a leaf that requires grad (as ``w.add_(1)`` refuses it) or any input that
  requires grad while grad mode is on (the merge has no derivative). Under
  ``torch.no_grad()``, as MissLinear.merge() calls them, they run.

This is what ``torch.library.custom_op`` registers for mutable ops defined in Python; the
ops here are defined in C++ (csrc/registration.cpp), so it is done by hand.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (the schemas must exist before kernels are added to them)

# op name -> (position of the mutated tensor, position of the block)
MUTATING_OPS = {"merge_": (0, 1), "unmerge_": (0, 1)}

_lib = torch.library.Library("miss", "IMPL")


def _register(op_name: str, mutated: int, block: int) -> None:
    op = getattr(torch.ops.miss, op_name).default

    def bump_version_and_redispatch(keyset, *args):
        torch.autograd.graph.increment_version(args[mutated])
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)

    def refuse_what_autograd_would_record(keyset, *args):
        weight, blk = args[mutated], args[block]
        if torch.is_grad_enabled():
            if weight.requires_grad and weight.is_leaf:
                raise RuntimeError(
                    f"miss.{op_name}: argument 'weight' is a leaf tensor that requires grad and "
                    "cannot be changed in place while grad mode is on (as torch's in-place ops "
                    "refuse it); call it under torch.no_grad(). Weight left unchanged."
                )
            if weight.requires_grad or blk.requires_grad:
                raise RuntimeError(
                    f"miss.{op_name} is not differentiable, but grad mode is on and 'weight' "
                    f"(requires_grad={weight.requires_grad}) or 'block' "
                    f"(requires_grad={blk.requires_grad}) requires grad; call it under "
                    "torch.no_grad(). Weight left unchanged."
                )
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _lib.impl(op_name, bump_version_and_redispatch, "ADInplaceOrView", with_keyset=True)
    _lib.impl(op_name, refuse_what_autograd_would_record, "Autograd", with_keyset=True)


for _name, (_mutated, _block) in MUTATING_OPS.items():
    _register(_name, _mutated, _block)
