"""MissModel / get_miss_model end to end: a short training run lowers the loss, and a bad config
gives a clear error and leaves the model unchanged. The config, adapter management and adapter
files have their own files: tests/test_model_config.py, test_model_adapters.py, test_model_files.py.
"""

from __future__ import annotations


import pytest
import torch
from torch import nn

from miss_ext import MissConfig, get_miss_model

import models as M
from model_helpers import (make)

# transformers' own deprecation noise when PEFT inspects a model
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# ---------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("init, extra", [(True, dict(miss_dropout=0.1)), ("mini", dict(mini_r=4)), ("bat", {})],
                         ids=["standard-dropout", "mini", "bat"])
def test_training_lowers_the_loss(init, extra):
    torch.manual_seed(0)
    base = M.make_mlp()
    teacher = M.make_mlp(seed=1)
    x = M.mlp_input(batch=64, seed=2)
    with torch.no_grad():
        target = 0.5 * base(x) + 0.5 * teacher(x)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    mm = get_miss_model(base, MissConfig(r=8, target_modules="all-linear", init_weights=init, **extra))
    params = [p for p in mm.parameters() if p.requires_grad]
    assert params and all("miss_block" in n for n, p in mm.named_parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(params, lr=1e-2)

    def eval_loss():
        mm.eval()
        with torch.no_grad():
            return nn.functional.mse_loss(mm(x), target).item()

    initial = eval_loss()
    mm.train()
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(mm(x), target)
        loss.backward()
        optimizer.step()
    final = eval_loss()
    assert final < 0.7 * initial, (initial, final)
    for name, layer in mm.miss_layers():  # the base weights never moved
        assert torch.equal(layer.base_layer.weight, frozen[f"{name}.weight"])


# ---------------------------------------------------------------------------------------
# Bad input: a clear error, the model unchanged


@pytest.mark.parametrize(
    "kind, kwargs, error, words",
    [
        ("llama", dict(target_modules=["nonexistent"]), ValueError, ["nonexistent"]),
        ("llama", dict(target_modules=["q_proj", "nonexistent_proj"], layers_to_transform=[5]), ValueError, []),
        ("llama", dict(target_modules=r"q_proj"), ValueError, ["q_proj"]),  # a regex must match the full name
        ("mixed", dict(target_modules=["embed"]), TypeError, ["embed", "Embedding"]),
        ("mixed", dict(target_modules=["proj", "conv"]), TypeError, ["conv", "Conv1d"]),
        ("mixed", dict(target_modules=r".*"), TypeError, []),
        ("llama", dict(target_modules=["embed_tokens", "q_proj"]), TypeError, ["embed_tokens"]),
        ("llama", dict(target_modules="all-linear", r=48), ValueError, ["48", "32"]),     # r > in_features
        ("mlp", dict(target_modules="all-linear", r=24), ValueError, ["proj_in", "24", "16"]),
        ("llama", dict(target_modules="all-linear", r=32, init_weights="bat"), ValueError, ["k_proj"]),
        ("llama", dict(target_modules="all-linear", r=6, init_weights="bat"), ValueError, []),
        ("llama", dict(target_modules="all-linear", r=8, mini_r=32, init_weights="mini"), ValueError, ["mini_r"]),
        ("llama", dict(target_modules=["q_proj"], modules_to_save=["nonexistent_head"]), ValueError,
         ["nonexistent_head"]),
    ],
    ids=["unknown", "no-layer", "regex-no-fullmatch", "embedding", "conv1d-after-linear", "regex-everything",
         "embedding-llama", "r>in", "r>in-first-layer", "bat-out%r", "bat-in%r", "mini-out%mini_r",
         "unknown-modules_to_save"],
)
def test_bad_config_leaves_model_unchanged(kind, kwargs, error, words):
    model = make(kind)
    model.train()
    before = M.snapshot(model)
    config = MissConfig(**{"r": 8, **kwargs})
    with pytest.raises(error) as info:
        get_miss_model(model, config)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    M.assert_unchanged(model, before)
    # the same config added to an adapted model changes nothing either
    mm = get_miss_model(make(kind), MissConfig(r=2, target_modules=["proj"] if kind == "mixed" else
                                               (["fc2"] if kind == "mlp" else ["v_proj"])))
    before = M.snapshot(mm)
    with pytest.raises(error):
        mm.add_adapter("second", config)
    M.assert_unchanged(mm, before)
    assert set(mm.peft_config) == {"default"} and mm.active_adapters == ["default"]
