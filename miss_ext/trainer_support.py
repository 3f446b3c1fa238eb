"""PeftMissModel: a MissModel that is a ``peft.PeftModel``, for Trainer, TRL and accelerate.

Why a subclass of PeftModel. transformers' ``Trainer`` (``trainer_utils._is_peft_model``),
accelerate (``utils.is_peft_model``, which TRL's trainers call) and TRL's ``SFTTrainer`` decide
whether a model is an adapter model by one check, ``isinstance(model, peft.PeftModel)``, and
from that answer alone:

- the forward signature and label names: Trainer reads them from ``model.get_base_model()``
  (``find_labels`` on its class), not from the wrapper's ``forward(*args, **kwargs)``, so with
  default arguments the batch columns are kept and evaluation computes ``eval_loss``;
- checkpoints and ``save_model``: ``model.save_pretrained(dir, state_dict=...,
  is_main_process=...)`` (an adapter) instead of the whole ``state_dict`` as model.safetensors;
- resume and ``load_best_model_at_end``: ``model.load_adapter(checkpoint, adapter_name,
  is_trainable=...)`` into the existing adapter, from ``adapter_model.safetensors``;
- TRL: the base model's forward is patched for its fused LM head, and the run is tagged as PEFT.

No duck typing reaches these branches (``PeftModel`` is a plain class, not an ABC that could
register a virtual subclass), and a Trainer subclass or callback would fix Trainer only, for
users who know to use it. So where PEFT is installed every MissModel is created as this class
(``MissModel.__new__``). Nothing of PEFT's runs in it: MissModel comes first in the method
order and defines every public method and property of ``PeftModel`` but those in
``INHERITED_FROM_PEFT``: prompt learning (``get_prompt``, ``get_prompt_embedding_to_save``,
which fail on it as on PEFT's own MiSS models), helpers that take the model as an argument
(``prepare_model_for_gradient_checkpointing``, ``create_or_update_model_card``), and PEFT's
status reports (``get_layer_status``, ``get_model_status``), which read PEFT's layer classes
and raise PEFT's TypeError on any other tuner. tests/test_peft_api.py checks that list
against PEFT's class, so a PEFT release that adds a method fails it until someone decides.
"""

from __future__ import annotations

import peft

from .model import MissModel

__all__ = ["PeftMissModel"]

# PeftModel members that MissModel deliberately does not define (see the module doc).
INHERITED_FROM_PEFT = ("get_prompt", "get_prompt_embedding_to_save", "prepare_model_for_gradient_checkpointing",
                       "create_or_update_model_card", "get_layer_status", "get_model_status")


class PeftMissModel(MissModel, peft.PeftModel):
    """A :class:`~miss_ext.MissModel` for which ``isinstance(model, peft.PeftModel)`` holds."""

    @property
    def peft_type(self):
        return peft.PeftType.MISS
