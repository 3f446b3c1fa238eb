"""TRL's SFTTrainer with MiSS, both routes (issue 16).

- ``SFTTrainer(model=get_miss_model(...))``: TRL sees a PEFT model (accelerate's
  ``is_peft_model``), trains the blocks, and its checkpoints hold the adapter in PEFT's
  format, which PEFT and miss_ext load with equal outputs.
- ``peft_config=``: TRL takes only ``peft.PeftConfig`` (its TypeError for miss_ext's config
  is kept); ``to_peft_config`` gives PEFT's MissConfig, and ``use_miss_kernels`` puts the PEFT
  model TRL built on miss_ext's kernels.

SFTConfig's defaults but two: ``bf16=False`` (TRL's default bf16 refuses a machine without a
GPU) and ``report_to="none"``. A word-level tokenizer built in memory stands in for a
pretrained one (nothing is downloaded).
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from miss_ext import MissConfig, MissModel, get_miss_model

import models as M

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

WORDS = [f"w{i}" for i in range(M.VOCAB - 3)]
CONFIG = dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"])


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def text_dataset(rows: int = 16, length: int = 8):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(WORDS), (rows, length), generator=gen).tolist()
    return datasets.Dataset.from_dict({"text": [" ".join(WORDS[j] for j in row) for row in ids]})


def sft_config(output_dir, **overrides):
    values = dict(output_dir=str(output_dir), max_steps=3, save_steps=3, per_device_train_batch_size=4,
                  bf16=False, report_to="none")
    return trl.SFTConfig(**{**values, **overrides})


def blocks_of(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "miss_block" in n}


def test_sft_trainer_trains_a_miss_model_and_checkpoints_a_peft_adapter(tmp_path):
    mm = get_miss_model(M.make_llama(), MissConfig(**CONFIG))
    M.randomize_blocks(mm, seed=1)
    before = blocks_of(mm)
    trainer = trl.SFTTrainer(model=mm, args=sft_config(tmp_path), train_dataset=text_dataset(),
                             processing_class=tokenizer())
    assert trainer.args.gradient_checkpointing, "SFTConfig's default: checkpointing on"
    trainer.train()
    after = blocks_of(trainer.model)
    assert all(not torch.equal(after[n], before[n]) for n in before), "SFTTrainer did not train the blocks"

    checkpoint = tmp_path / "checkpoint-3"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, sorted(files)
    saved = load_file(str(checkpoint / "adapter_model.safetensors"))
    assert saved.keys() == {n[:-len(".default")] for n in after}
    assert all(torch.equal(saved[n[:-len(".default")]], value) for n, value in after.items())

    tokens = M.token_input()
    by_peft = peft.PeftModel.from_pretrained(M.make_llama(), str(checkpoint))
    ours = MissModel.from_pretrained(M.make_llama(), str(checkpoint))
    torch.testing.assert_close(M.run(by_peft, "llama", tokens), M.run(ours, "llama", tokens), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(M.run(ours, "llama", tokens), M.run(M.make_llama(), "llama", tokens), atol=1e-4)


def test_peft_config_route_takes_the_peft_config_and_runs_on_miss_kernels(tmp_path):
    from miss_ext.integrations.peft import to_peft_config, use_miss_kernels, uses_miss_kernels

    config = MissConfig(**CONFIG)
    with pytest.raises(TypeError, match="peft_config` must be a `peft.PeftConfig` instance"):
        trl.SFTTrainer(model=M.make_llama(), args=sft_config(tmp_path / "refused"), train_dataset=text_dataset(),
                       processing_class=tokenizer(), peft_config=config)

    trainer = trl.SFTTrainer(model=M.make_llama(), args=sft_config(tmp_path, max_steps=2, save_steps=2),
                             train_dataset=text_dataset(), processing_class=tokenizer(),
                             peft_config=to_peft_config(config))
    assert use_miss_kernels(trainer.model) == 6 and uses_miss_kernels(trainer.model)
    with torch.no_grad():  # PEFT's blocks are zero at init: make the kernels' work visible
        for name, param in trainer.model.named_parameters():
            if "miss_block" in name:
                param.add_(0.05)
    trainer.train()
    tokens = M.token_input()
    ours = MissModel.from_pretrained(M.make_llama(), str(tmp_path / "checkpoint-2"))
    trained = trainer.model.eval()
    torch.testing.assert_close(M.run(ours, "llama", tokens), trained(input_ids=tokens).logits.detach(),
                               rtol=1e-5, atol=1e-6)
