"""The demo's models: all-MiniLM-L6-v2 loaded from its local files, a mean-pooling classifier
on top, and each variant's adapter (MiSS standard, mini, bat; PEFT LoRA) on a copy of it."""

from __future__ import annotations

import copy
import os

VARIANTS = ("standard", "mini", "bat", "lora")
# All linear layers of a BERT encoder layer, as module-name suffixes: attention.self.{query,
# key,value}, attention.output.dense, intermediate.dense, output.dense.
TARGET_MODULES = ["query", "key", "value", "output.dense", "intermediate.dense"]

# Adapter sizes. Standard and bat MiSS with r=16 and LoRA with r=8 train exactly the same
# number of parameters on this encoder (MiSS: r * out per layer; LoRA: r * (in + out)); mini
# repeats one [r, mini_r] block across the output columns and trains under a quarter of that.
MISS_R = 16
MINI_R = 64
MINI_MINI_R = 32
LORA_R = 8
LORA_ALPHA = 16


def build_classifier_class():
    from torch import nn

    class SentenceClassifier(nn.Module):
        """A sentence encoder, mean pooling over the tokens, and a linear head."""

        def __init__(self, encoder: nn.Module, num_labels: int):
            super().__init__()
            self.encoder = encoder
            self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            return self.classifier(pooled)

    return SentenceClassifier


def load_encoder(model_dir: str):
    """Tokenizer and BertModel from the local directory; never the network."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    # The sentence encoder's pooler is not used (mean pooling), so it is not built.
    encoder = AutoModel.from_pretrained(model_dir, local_files_only=True, add_pooling_layer=False)
    return tokenizer, encoder


def adapt(variant: str, base):
    """Wraps a copy of ``base`` with the variant's adapter; returns the adapted model."""
    from miss_ext import MissConfig, get_miss_model

    model = copy.deepcopy(base)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=list(TARGET_MODULES),
                            modules_to_save=["classifier"])
        return get_peft_model(model, config)
    init = {"standard": True, "mini": "mini", "bat": "bat"}[variant]
    r = MINI_R if variant == "mini" else MISS_R
    config = MissConfig(r=r, mini_r=MINI_MINI_R, init_weights=init, target_modules=list(TARGET_MODULES),
                        modules_to_save=["classifier"])
    return get_miss_model(model, config)


def fresh_base(base):
    """A copy of the base model with a newly initialised head: what a user who loads the adapter
    has. The trained head must come from the adapter file (modules_to_save)."""
    model = copy.deepcopy(base)
    model.classifier.reset_parameters()
    return model
