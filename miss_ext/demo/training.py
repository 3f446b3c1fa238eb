"""Training, evaluation and step timing of one adapted model, and the record each variant's
run fills in (Result, written to results.json)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Result:
    variant: str
    trainable: int
    total: int
    acc_before: float
    acc_after: float = 0.0
    losses: list = field(default_factory=list)
    train_s: float = 0.0
    step_kernels_ms: Optional[float] = None
    step_reference_ms: Optional[float] = None
    logit_scale: float = 1.0  # the tolerances are relative to max(1, max |logit|)
    reload_diff: Optional[float] = None
    merge_diff: Optional[float] = None
    peft_diff: Optional[float] = None
    adapter_dir: Optional[str] = None
    adapter_bytes: int = 0
    checks_ok: bool = True
    notes: list = field(default_factory=list)


class Batches:
    """Random training batches, the same sequence for every variant (seeded)."""

    def __init__(self, size: int, batch_size: int, seed: int):
        import torch

        self.size, self.batch_size = size, min(batch_size, size)
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = None, size

    def next(self):
        import torch

        if self.position + self.batch_size > self.size:
            self.order = torch.randperm(self.size, generator=self.generator)
            self.position = 0
        index = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return index


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, data, index, device) -> float:
    import torch.nn.functional as F

    input_ids, attention_mask, labels = (t[index].to(device) for t in data)
    logits = model(input_ids=input_ids, attention_mask=attention_mask)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def timed_step(model, optimizer, data, index, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    train_step(model, optimizer, data, index, device)
    synchronize(device)
    return time.perf_counter() - start


def evaluate(model, data, device, batch_size: int = 128):
    """(accuracy, logits on CPU) in eval mode."""
    import torch

    input_ids, attention_mask, labels = data
    was_training = model.training
    model.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            part = slice(start, start + batch_size)
            outputs.append(model(input_ids=input_ids[part].to(device),
                                 attention_mask=attention_mask[part].to(device)).float().cpu())
    model.train(was_training)
    logits = torch.cat(outputs)
    return (logits.argmax(-1) == labels).float().mean().item(), logits


def set_backend(miss_model, backend: str) -> None:
    for _, layer in miss_model.miss_layers():
        layer.backend = backend


def measure_step_times(variant, model, optimizer, train_data, batches, device, steps: int):
    """Median training-step time (ms) on the kernels and on the reference (MiSS only),
    measured alternately on the same batches after one warm-up step of each."""
    backends = ["kernels", "reference"] if variant != "lora" else ["kernels"]
    times = {b: [] for b in backends}
    index = batches.next()
    for repeat in range(steps + 1):
        for backend in backends:
            if variant != "lora":
                set_backend(model, backend)
            seconds = timed_step(model, optimizer, train_data, index, device)
            if repeat:  # the first round warms up
                times[backend].append(seconds)
    if variant != "lora":
        set_backend(model, "kernels")
    return {b: 1e3 * statistics.median(t) for b, t in times.items()}
