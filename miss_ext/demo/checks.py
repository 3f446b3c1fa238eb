"""The checks the demo runs on each trained MiSS adapter: saved in PEFT's format, reloaded on a
fresh base model (by miss_ext, and by PEFT when it is installed), merged; all must give the
trained model's logits."""

from __future__ import annotations

import os

from .models import fresh_base
from .training import Result, evaluate

# Merged vs unmerged logits: float32 rounding through six layers; reload: bit-identical
# weights, so the same logits up to run-to-run rounding.
MERGE_TOLERANCE = 1e-4
RELOAD_TOLERANCE = 1e-5


def check_adapter(variant, model, base, test_data, trained_logits, adapter_dir, device, result: Result,
                  with_peft: bool) -> None:
    """Save, reload on a fresh base (miss_ext, and PEFT when installed), merge; compare logits."""
    from miss_ext import MissLinear, MissModel

    model.save_pretrained(adapter_dir)
    result.adapter_dir = adapter_dir
    result.adapter_bytes = sum(os.path.getsize(os.path.join(adapter_dir, f)) for f in os.listdir(adapter_dir)
                               if os.path.isfile(os.path.join(adapter_dir, f)))
    if variant == "lora":
        return
    reloaded = MissModel.from_pretrained(fresh_base(base), adapter_dir)
    _, reload_logits = evaluate(reloaded, test_data, device)
    result.reload_diff = (reload_logits - trained_logits).abs().max().item()
    merged = reloaded.merge_and_unload()
    if any(isinstance(m, MissLinear) for m in merged.modules()):
        result.checks_ok = False
        result.notes.append("merge_and_unload left MissLinear layers in the model")
    _, merged_logits = evaluate(merged, test_data, device)
    result.merge_diff = (merged_logits - reload_logits).abs().max().item()
    scale = result.logit_scale = max(1.0, trained_logits.abs().max().item())
    if not result.reload_diff <= RELOAD_TOLERANCE * scale:
        result.checks_ok = False
        result.notes.append(f"reloaded adapter differs from the trained one: max |diff| {result.reload_diff:.2e}")
    if not result.merge_diff <= MERGE_TOLERANCE * scale:
        result.checks_ok = False
        result.notes.append(f"merged model differs from the unmerged one: max |diff| {result.merge_diff:.2e}")
    if with_peft:
        try:
            from peft import PeftModel

            peft_model = PeftModel.from_pretrained(fresh_base(base), adapter_dir)
            _, peft_logits = evaluate(peft_model, test_data, device)
            result.peft_diff = (peft_logits - trained_logits).abs().max().item()
            if not result.peft_diff <= MERGE_TOLERANCE * scale:
                result.checks_ok = False
                result.notes.append(f"PEFT's model of the saved adapter differs: max |diff| {result.peft_diff:.2e}")
        except Exception as error:  # PEFT's own limits are reported, not fatal
            result.notes.append(f"PEFT could not load the adapter ({type(error).__name__}: {error})")
