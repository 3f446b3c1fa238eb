"""transformers.Trainer with ``torch_compile=True`` on a MissModel: accelerate compiles the
model (inductor), and the losses of every step and the block gradients equal the eager run's.

Dropout is off: inductor draws its own random numbers, so masks would differ by design.
"""

from __future__ import annotations

import pytest
import torch

from miss_ext import MissConfig, get_miss_model

import models as M

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

VARIANTS = {"standard": dict(init_weights=True), "mini": dict(init_weights="mini", mini_r=4),
            "bat": dict(init_weights="bat")}
STEPS = 3


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows: int = 4 * STEPS, length: int = 8):
        self.ids = torch.randint(0, M.VOCAB, (rows, length), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class BlockGradients(transformers.TrainerCallback):
    """The block gradients of every step, as the optimizer is about to see them."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.clone()
                           for n, p in model.named_parameters() if "miss_block" in n})


def train(tmp_path, variant: str, compile: bool):
    torch.manual_seed(0)
    model = get_miss_model(M.make_llama(), MissConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      **VARIANTS[variant]))
    M.randomize_blocks(model, seed=4, scale=0.2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"{variant}-{compile}"), max_steps=STEPS, per_device_train_batch_size=4,
        logging_steps=1, save_strategy="no", report_to=[], torch_compile=compile, learning_rate=1e-3)
    grads = BlockGradients()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[grads])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, grads


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trainer_torch_compile_gives_the_losses_and_block_gradients_of_the_eager_run(tmp_path, variant):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses, grads = train(tmp_path, variant, compile=True)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert not counters["graph_break"], dict(counters["graph_break"])
    eager_losses, eager_grads = train(tmp_path, variant, compile=False)
    assert len(losses) == len(eager_losses) == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-4, atol=0)
    assert len(grads.steps) == len(eager_grads.steps) == STEPS
    for step, (got, expected) in enumerate(zip(grads.steps, eager_grads.steps)):
        assert got.keys() == expected.keys() and got
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-6, msg=f"step {step} {name}")
