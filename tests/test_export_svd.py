"""LoRA export of BAT adapters by truncated SVD (SPEC.md sec. 8): each layer's update
``W' - W`` cut to a fixed rank or to an energy fraction, its relative Frobenius error
reported; the same ranks and factors as PEFT's ``convert_to_lora`` on the same adapter; the
directory loads in PEFT's LoRA; standard and mini stay exact whatever rank is passed.

The oracle of the errors and ranks is independent of the export: each layer's update is
taken from ``merge_and_unload`` (merged weight minus base weight) and its singular values in
float64; Eckart-Young says the truncated SVD's relative error is the norm of the dropped ones.
"""

from __future__ import annotations

import copy

import pytest
import torch

from miss_ext import MissConfig, export_lora, get_miss_model
from miss_ext.export import lora_adapter

import models as M

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

BAT = dict(r=8, init_weights="bat", target_modules="all-linear")


def bat_llama(seed: int = 3):
    base = M.make_llama()
    model = get_miss_model(copy.deepcopy(base), MissConfig(**BAT))
    # blocks are zero at init (a zero update): perturb them, larger than the default so the
    # updates have a spread of singular values worth truncating
    M.randomize_blocks(model, seed=seed, scale=0.5)
    return base, model


def independent_updates(base, model) -> dict[str, torch.Tensor]:
    """``W_merged - W`` per adapted layer, in float64, from merge_and_unload of a copy."""
    merged = copy.deepcopy(model).merge_and_unload()
    weights = dict(base.named_parameters())
    return {name: (param.detach().double() - weights[name].detach().double())
            for name, param in merged.named_parameters() if name[:-len(".weight")] in dict(model.miss_layers())}


def singular_values(updates: dict) -> dict[str, torch.Tensor]:
    return {name[:-len(".weight")]: torch.linalg.svdvals(u) for name, u in updates.items()}


def expected_error(s: torch.Tensor, k: int) -> float:
    return (s[k:].square().sum() / s.square().sum()).sqrt().item()


@pytest.mark.parametrize("rank", [4, 0.9])
def test_ranks_and_errors_follow_the_singular_values(rank):
    base, model = bat_llama()
    adapter = lora_adapter(model, rank=rank)
    svs = singular_values(independent_updates(base, model))
    assert set(adapter.ranks) == set(svs) and len(svs) == 14
    for name, s in svs.items():
        k = adapter.ranks[name]
        if isinstance(rank, int):
            assert k == rank
        else:  # the smallest k whose top-k singular values hold 90% of the energy
            energy = s.square().cumsum(0) / s.square().sum()
            assert energy[k - 1] >= rank and (k == 1 or energy[k - 2] < rank), name
        assert 0.0 < adapter.relative_errors[name] < 1.0
        assert adapter.relative_errors[name] == pytest.approx(expected_error(s, k), rel=1e-4, abs=1e-6), name
        a = adapter.tensors[f"base_model.model.{name}.lora_A.weight"]
        b = adapter.tensors[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == k and a.dtype == b.dtype == torch.float32


@pytest.mark.parametrize("rank", [4, 0.9])
def test_matches_peft_convert_to_lora_on_the_same_adapter(rank, tmp_path):
    base, model = bat_llama()
    model.save_pretrained(str(tmp_path))
    theirs_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    theirs_config, theirs = peft.convert_to_lora(theirs_model, rank=rank)
    ours = lora_adapter(model, rank=rank)

    assert set(ours.tensors) == set(theirs)
    for key in [k for k in theirs if k.endswith("lora_A.weight")]:
        key_b = key.replace("lora_A", "lora_B")
        assert ours.tensors[key].shape == theirs[key].shape, key
        # singular vectors are defined up to sign: compare the products B @ A
        product, reference = (ours.tensors[key_b] @ ours.tensors[key]), (theirs[key_b] @ theirs[key])
        torch.testing.assert_close(product, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item(), msg=key)
    assert ours.config["r"] == theirs_config.r and ours.config["lora_alpha"] == theirs_config.lora_alpha
    assert ours.config["rank_pattern"] == theirs_config.rank_pattern
    assert ours.config["alpha_pattern"] == theirs_config.alpha_pattern


def test_exported_directory_loads_in_peft_lora_within_the_reported_error(tmp_path):
    base, model = bat_llama()
    tokens = M.token_input()
    expected = M.run(model.eval(), "llama", tokens)
    assert not torch.allclose(expected, M.run(base, "llama", tokens), atol=1e-3), "the adapter must change outputs"

    full = export_lora(model, str(tmp_path / "full"), rank=1.0)  # all the energy: exact up to rounding
    assert full == str(tmp_path / "full") and full.max_relative_error < 1e-5
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), full)
    assert isinstance(lora.peft_config["default"], peft.LoraConfig)
    torch.testing.assert_close(M.run(lora, "llama", tokens), expected, rtol=1e-4, atol=1e-5)

    low = export_lora(model, str(tmp_path / "low"), rank=2)
    assert set(low.ranks.values()) == {2} and low.max_relative_error > 0.05
    approx = M.run(peft.PeftModel.from_pretrained(copy.deepcopy(base), low), "llama", tokens)
    assert not torch.allclose(approx, expected, atol=1e-4), "a rank-2 cut must lose something"


def test_standard_and_mini_stay_exact_whatever_the_rank(tmp_path):
    for config in (dict(r=8), dict(r=8, init_weights="mini", mini_r=4)):
        model = get_miss_model(M.make_llama(), MissConfig(target_modules="all-linear", **config))
        M.randomize_blocks(model)
        exact = lora_adapter(model)
        for rank in (2, 0.5):
            cut = lora_adapter(model, rank=rank)
            assert set(cut.ranks.values()) == {8} and set(cut.relative_errors.values()) == {0.0}
            assert cut.tensors.keys() == exact.tensors.keys()
            assert all(torch.equal(cut.tensors[k], exact.tensors[k]) for k in exact.tensors)
