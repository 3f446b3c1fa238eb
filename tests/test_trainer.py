"""transformers.Trainer treats a MissModel as the adapter model it is (issue 16).

With default TrainingArguments: the batch columns the wrapped model takes are kept and the
others dropped, checkpoints and ``save_model`` hold only the adapter in PEFT's format
(adapter_config.json + adapter_model.safetensors), a run resumed from a checkpoint ends where
the uninterrupted run ended, evaluation computes ``eval_loss`` so ``load_best_model_at_end``
loads the best adapter, label smoothing finds the causal LM, and what Trainer saved loads in
``PeftModel.from_pretrained`` and ``MissModel.from_pretrained`` with equal outputs.

The blocks start random and non-zero, so a reload that dropped them would be seen.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from miss_ext import MissConfig, MissModel, get_miss_model

import models as M

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = [
    # Trainer's default pin_memory=True warns on a machine without an accelerator; users see it too.
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
WHOLE_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


def adapted(seed: int = 6) -> MissModel:
    mm = get_miss_model(M.make_llama(), MissConfig(r=8, target_modules=TARGETS))
    M.randomize_blocks(mm, seed=seed)
    return mm


class TokenRows(torch.utils.data.Dataset):
    """input_ids and labels, and a column the model does not take (Trainer must drop it)."""

    def __init__(self, rows: int = 16, length: int = 8, seed: int = 11):
        self.ids = torch.randint(0, M.VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i], "row_id": i}


def make_trainer(output_dir, *, evaluate: bool = False, **arguments):
    arguments = {"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 4, **arguments}
    args = transformers.TrainingArguments(output_dir=str(output_dir), **arguments)
    return transformers.Trainer(model=adapted(), args=args, train_dataset=TokenRows(),
                                eval_dataset=TokenRows(8, seed=12) if evaluate else None)


def blocks_of(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "miss_block" in n}


def saved_blocks(directory) -> dict:
    """The blocks of an adapter directory under the model's parameter names."""
    return {f"{k}.default": v for k, v in load_file(os.path.join(directory, "adapter_model.safetensors")).items()}


def test_default_arguments_checkpoint_an_adapter_resume_and_reload_in_peft(tmp_path):
    before = blocks_of(adapted())
    trainer = make_trainer(tmp_path / "straight")
    assert trainer.label_names == ["labels"], "the labels of the wrapped model's forward"
    trainer.train()
    after = blocks_of(trainer.model)
    assert all(not torch.equal(after[n], before[n]) for n in before), "Trainer did not train the blocks"

    checkpoint = tmp_path / "straight" / "checkpoint-2"
    trainer.save_model(str(tmp_path / "final"))
    for directory in (checkpoint, tmp_path / "final"):
        files = set(os.listdir(directory))
        assert ADAPTER_FILES <= files and not files & WHOLE_MODEL_FILES, f"{directory.name}: {sorted(files)}"
        assert set(load_file(os.path.join(directory, "adapter_model.safetensors"))) == set(
            trainer.model.adapter_state_dict("default"))
    assert saved_blocks(tmp_path / "final").keys() == after.keys()
    assert all(torch.equal(saved_blocks(tmp_path / "final")[n], after[n]) for n in after)

    resumed = make_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in blocks_of(resumed.model).items():
        torch.testing.assert_close(value, after[name], rtol=1e-5, atol=1e-7)

    tokens = M.token_input()
    expected = M.run(trainer.model.eval(), "llama", tokens)
    by_peft = peft.PeftModel.from_pretrained(M.make_llama(), str(tmp_path / "final"))
    torch.testing.assert_close(M.run(by_peft, "llama", tokens), expected, rtol=1e-5, atol=1e-6)
    ours = MissModel.from_pretrained(M.make_llama(), str(checkpoint))
    assert torch.equal(blocks_of(ours)["base_model.model.model.layers.0.self_attn.q_proj.miss_block.default"],
                       saved_blocks(checkpoint)["base_model.model.model.layers.0.self_attn.q_proj.miss_block.default"])


def test_evaluation_computes_eval_loss_and_the_best_adapter_is_loaded_at_the_end(tmp_path):
    # greater_is_better on the loss makes the *worst* checkpoint "best": with a learning rate
    # that lowers the loss, that is checkpoint-2, not the last one, so loading it shows.
    trainer = make_trainer(tmp_path, evaluate=True, eval_strategy="steps", eval_steps=2, learning_rate=1e-2,
                           load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    trainer.train()
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(losses) == 2 and losses[0] > losses[1], losses
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best, last = saved_blocks(tmp_path / "checkpoint-2"), saved_blocks(tmp_path / "checkpoint-4")
    now = blocks_of(trainer.model)
    assert all(torch.equal(now[n], best[n]) for n in best) and not all(torch.equal(now[n], last[n]) for n in last)
    assert "eval_loss" in trainer.evaluate()


def test_label_smoothing_finds_the_causal_lm_through_base_model_model(tmp_path):
    """Trainer's label smoother shifts the labels of causal LMs, which it recognises by
    ``model.base_model.model`` of an adapter model (PEFT's layout)."""
    trainer = make_trainer(tmp_path, label_smoothing_factor=0.1)
    model = trainer.model
    assert model.base_model.model is model.get_base_model()
    batch = {"input_ids": TokenRows().ids[:4], "labels": TokenRows().ids[:4]}
    loss = trainer.compute_loss(model, dict(batch))
    outputs = model(input_ids=batch["input_ids"])
    expected = transformers.trainer_pt_utils.LabelSmoother(epsilon=0.1)(outputs, batch["labels"], shift_labels=True)
    torch.testing.assert_close(loss, expected)
