"""Tiny models for the layer/model/PEFT tests: plain MLPs and transformers models built from
small configs (no downloads), plus helpers that compare models.

Sizes are chosen so that one r fits every variant on every linear layer: the Llama and MLP
layers have in/out features in {16, 32, 64}, so r = 8 divides all of them (bat) and
mini_r = 4 divides every out_features (mini).
"""

from __future__ import annotations

import copy
import math
from typing import Iterable, Optional

import pytest
import torch
from torch import nn

import miss_ext

VOCAB = 64


# ---------------------------------------------------------------------------------------
# Plain PyTorch models


class Block(nn.Module):
    def __init__(self, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(hidden, 2 * hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * hidden, hidden, bias=bias)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class MLP(nn.Module):
    """proj_in [in -> hidden], layers.{i}.fc1 / fc2 (residual blocks), head [hidden -> out]."""

    def __init__(self, in_features: int = 16, hidden: int = 32, out_features: int = 16, n_layers: int = 2,
                 bias: bool = True):
        super().__init__()
        self.proj_in = nn.Linear(in_features, hidden, bias=bias)
        self.layers = nn.ModuleList([Block(hidden, bias) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, out_features, bias=bias)

    def forward(self, x):
        h = self.proj_in(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


class MixedNet(nn.Module):
    """A token model with modules that are not nn.Linear under names a config may match:
    ``embed`` (nn.Embedding), ``conv`` (nn.Conv1d), ``proj`` (nn.Linear), ``out`` (nn.Linear)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size=3, padding=1)
        self.proj = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 8)

    def forward(self, tokens):
        h = self.embed(tokens)  # [B, T, H]
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.out(torch.relu(self.proj(h)))


def make_mlp(seed: int = 0, dtype=torch.float32, **kwargs) -> MLP:
    torch.manual_seed(seed)
    return MLP(**kwargs).to(dtype)


def mlp_input(batch: int = 6, in_features: int = 16, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, in_features, generator=gen).to(dtype)


# ---------------------------------------------------------------------------------------
# transformers models from small configs


def _transformers():
    return pytest.importorskip("transformers")


def make_llama(seed: int = 0, dtype=torch.float32):
    """LlamaForCausalLM: hidden 32, 2 layers, 4 heads / 2 kv heads (k/v out 16), MLP 64."""
    transformers = _transformers()
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def make_bert(seed: int = 0):
    transformers = _transformers()
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return transformers.BertModel(config).eval()


def make_opt(seed: int = 0):
    transformers = _transformers()
    config = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    return transformers.OPTForCausalLM(config).eval()


def make_t5(seed: int = 0):
    transformers = _transformers()
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        dropout_rate=0.0, decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(config).eval()


MODEL_FACTORIES = {"llama": make_llama, "bert": make_bert, "opt": make_opt, "t5": make_t5}


def token_input(batch: int = 2, length: int = 7, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


def run(model: nn.Module, kind: str, inputs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The main output tensor of a model of ``kind`` ("mlp", "mixed", "llama", "bert", ...)."""
    with torch.no_grad():
        return forward(model, kind, inputs)


def forward(model: nn.Module, kind: str, inputs: Optional[torch.Tensor] = None) -> torch.Tensor:
    if kind == "mlp":
        return model(mlp_input() if inputs is None else inputs)
    tokens = token_input() if inputs is None else inputs
    if kind == "mixed":
        return model(tokens)
    if kind == "bert":
        return model(input_ids=tokens).last_hidden_state
    if kind == "t5":
        return model(input_ids=tokens, decoder_input_ids=tokens[:, :4]).logits
    return model(input_ids=tokens).logits


# ---------------------------------------------------------------------------------------
# Adapters with random values and model comparisons


def randomize_blocks(model: nn.Module, adapter_name: str = "default", seed: int = 0, scale: float = 0.1) -> None:
    """Puts non-zero random values in every block of ``adapter_name`` (miss_ext or PEFT
    model), in model order. BAT blocks get entries ~ scale / sqrt(r) so I + B_k stays well
    conditioned."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith(f"miss_block.{adapter_name}"):
                continue
            s = scale / math.sqrt(param.shape[-1]) if param.dim() == 3 else scale
            values = torch.randn(param.shape, generator=gen, dtype=torch.float64) * s
            values = torch.where(values == 0, torch.full_like(values, s), values)
            param.copy_(values.to(param.dtype))


def strip(name: str, prefixes: Iterable[str] = ("base_model.model.", "model.")) -> str:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def miss_layer_names(model: nn.Module) -> set:
    """Names (without wrapper prefixes) of the adapted linear layers of a miss_ext or PEFT model."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Module) and hasattr(module, "miss_block") and hasattr(module, "base_layer"):
            names.add(strip(name))
    return names


def trainable_names(model: nn.Module) -> set:
    return {strip(n) for n, p in model.named_parameters() if p.requires_grad}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN-aware: torch.equal says NaN != NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().contiguous().reshape(-1).view(torch.uint8))


def snapshot(model: nn.Module) -> dict:
    """Everything a failed operation must leave as it was: state_dict values (cloned), module
    types by name, requires_grad flags and the training flag."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"], "module types changed"
    assert after["state"].keys() == before["state"].keys(), (
        f"state_dict keys changed: +{sorted(after['state'].keys() - before['state'].keys())[:5]} "
        f"-{sorted(before['state'].keys() - after['state'].keys())[:5]}")
    for key, value in before["state"].items():
        assert same_bits(after["state"][key], value), f"{key} changed"
    assert after["grad"] == before["grad"], "requires_grad flags changed"
    assert after["training"] == before["training"], "train/eval flags changed"


def peft_copy(model: nn.Module, config: miss_ext.MissConfig, **overrides):
    """PEFT's get_peft_model on a deep copy of ``model`` with the same MissConfig values."""
    peft = pytest.importorskip("peft")
    values = {k: v for k, v in config.to_dict().items()
              if k in {"r", "miss_dropout", "mini_r", "target_modules", "exclude_modules", "init_weights",
                       "layers_to_transform", "layers_pattern", "bias", "modules_to_save", "inference_mode"}}
    values.update(overrides)
    return peft.get_peft_model(copy.deepcopy(model), peft.MissConfig(**values))


def copy_blocks_to_peft(ours: nn.Module, theirs: nn.Module, adapter_name: str = "default") -> int:
    """Copies every block of ``adapter_name`` from a miss_ext model into a PEFT model with the
    same base model (matching names, shapes checked); returns how many were copied."""
    mine = {strip(n): p for n, p in ours.named_parameters() if n.endswith(f"miss_block.{adapter_name}")}
    copied = 0
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if name.endswith(f"miss_block.{adapter_name}"):
                source = mine[strip(name)]
                assert source.shape == param.shape, (name, source.shape, param.shape)
                param.copy_(source.to(param.dtype))
                copied += 1
    assert copied == len(mine) > 0
    return copied


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return ((a64 - b64).norm() / b64.norm().clamp_min(1e-30)).item()
