"""A training step of a small Llama-style transformers model (built from a config, no download)
with an adapter on every linear layer: ours (each MiSS variant, on the kernels) against PEFT's
MiSS and PEFT LoRA at the same and at half the rank, measured side by side in one run.

It reports tokens per second of a full step (forward, loss, backward, AdamW step), the ratio to
PEFT's MiSS of the same variant, and the bytes autograd saves for backward (CPU) or the peak
CUDA memory of a step. A frozen model whose input embeddings require grad (so backward still
runs every Linear's dx GEMM) is the "no adapter" reference.

    python benchmarks/bench_model.py                     # CPU: 4 layers, hidden 1024
    python benchmarks/bench_model.py --device cuda --dtype bf16 --batch 8 --seq 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import miss_ext  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INIT_WEIGHTS = {"standard": True, "mini": "mini", "bat": "bat"}
NO_ADAPTER = "no adapter (frozen)"


def base_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, args.seq), attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=DTYPES[args.dtype])


def randomize_blocks_(model, generator: torch.Generator) -> None:
    """Non-zero adapter blocks (MiSS starts from zero, LoRA from B = 0): a trained state."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ("miss_block" in name or "lora_B" in name):
                param.copy_(torch.randn(param.shape, generator=generator).to(param) * 0.02)


def build_candidates(args, device) -> Dict[str, torch.nn.Module]:
    import peft

    generator = torch.Generator().manual_seed(0)
    candidates = {}
    frozen = base_model(args, device)
    frozen.requires_grad_(False)
    frozen.get_input_embeddings().weight.requires_grad_(True)
    candidates[NO_ADAPTER] = frozen
    for variant in args.variants.split(","):
        extra = {"mini_r": args.mini_r} if variant == "mini" else {}
        dropout = 0.0 if variant == "bat" else args.dropout
        peft_config = peft.MissConfig(r=args.r, miss_dropout=dropout, target_modules="all-linear",
                                      init_weights=INIT_WEIGHTS[variant], **extra)
        candidates[f"PEFT MiSS {variant}"] = peft.get_peft_model(base_model(args, device), peft_config)
        ours_config = miss_ext.MissConfig(r=args.r, miss_dropout=dropout, target_modules="all-linear",
                                          init_weights=INIT_WEIGHTS[variant], **extra)
        candidates[f"ours {variant}"] = miss_ext.get_miss_model(base_model(args, device), ours_config)
    for rank in (args.r, args.r // 2):
        lora = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=args.dropout, target_modules="all-linear")
        candidates[f"PEFT LoRA r={rank}"] = peft.get_peft_model(base_model(args, device), lora)
    for model in candidates.values():
        randomize_blocks_(model, generator)
        model.train()
    return candidates


def training_step(model, input_ids) -> tuple[Callable[[], object], Callable[[], torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def forward():
        return model(input_ids=input_ids, labels=input_ids).loss

    def step():
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, forward


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def to_markdown(info: dict, args, rows: list) -> str:
    text = harness.header_markdown("Model benchmark: a Llama-style training step", info)
    text += (f"LlamaForCausalLM from a config: {args.layers} layers, hidden {args.hidden}, intermediate "
             f"{args.intermediate}, {args.heads} heads, vocab {args.vocab}, {args.dtype}; batch {args.batch} x "
             f"seq {args.seq} tokens; adapters on all linear layers (r={args.r}, mini_r={args.mini_r}, dropout "
             f"{args.dropout}; bat without dropout). A step is forward, loss, backward and AdamW. Median of "
             f"{args.repeats} round-robin repeats after {args.warmup} warm-up. \"saved\": bytes autograd keeps "
             "for backward, parameters not counted, deduplicated by storage.\n\n")
    cuda = any(r["peak_bytes"] is not None for r in rows)
    text += ("| candidate | trainable params | step ms | tokens/s | speed-up over PEFT MiSS (same variant) | saved MiB |"
             + (" peak MiB |" if cuda else "") + "\n")
    text += "|---|---|---|---|---|---|" + ("---|" if cuda else "") + "\n"
    for r in rows:
        speedup = "" if r["speedup_vs_peft"] is None else f"**{r['speedup_vs_peft']:.2f}x**"
        text += (f"| {r['candidate']} | {r['trainable']:,} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                 f"{speedup} | {r['saved_bytes'] / 2**20:.1f} |"
                 + (f" {r['peak_bytes'] / 2**20:.0f} |" if cuda else "") + "\n")
    return text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="model dtype (adapter blocks are fp32 on a bf16 model, PEFT's default, in both)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--mini-r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0, help="miss_dropout / lora_dropout")
    parser.add_argument("--variants", default="standard,mini,bat")
    harness.add_run_args(parser, repeats=3)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, info = harness.start_run(args)
    candidates = build_candidates(args, device)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator).to(device)
    steps = {name: training_step(model, input_ids) for name, model in candidates.items()}
    print(f"[bench_model] {len(candidates)} candidates, {args.batch * args.seq} tokens per step", flush=True)
    samples = harness.round_robin_samples({name: s[0] for name, s in steps.items()}, device, args.repeats,
                                          args.warmup)
    times = {name: statistics.median(values) for name, values in samples.items()}
    tokens = args.batch * args.seq
    rows = []
    for name, model in candidates.items():
        saved = harness.saved_bytes(steps[name][1], exclude=tuple(model.parameters()))
        peak = harness.peak_cuda_bytes(steps[name][0], device) if device.type == "cuda" else None
        peft_twin = name.replace("ours", "PEFT MiSS", 1) if name.startswith("ours") else None
        rows.append({
            "candidate": name, "trainable": trainable_count(model), "step_ms": times[name] * 1e3,
            "tokens_per_s": tokens / times[name], "saved_bytes": saved, "peak_bytes": peak,
            # median over rounds of PEFT's step time over ours in the same round
            "speedup_vs_peft": 1 / harness.paired_ratios(samples, peft_twin)[name] if peft_twin in times else None,
        })
    markdown = to_markdown(info, args, rows)
    name = args.name or f"model_{device.type}_llama{args.layers}x{args.hidden}_{args.dtype}"
    json_path, md_path = harness.write_results(name, {"machine": info, "args": vars(args), "rows": rows},
                                               markdown, args.out_dir)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
