"""Mechanism diagnostics (trustmae_lib/engine/diagnostics.py): each number on cases whose answer is known, and on a
real training run, where the slots must have moved and the result file must carry every diagnostic."""

from __future__ import annotations

import math

import pytest
import torch

from trustmae_lib.config import RunSpec
from trustmae_lib.engine import diagnostics as dg
from trustmae_lib.engine.checkpoint import load_checkpoint
from trustmae_lib.engine.evaluate import evaluate
from trustmae_lib.engine.runs import CHECKPOINT, load_trained
from trustmae_lib.engine.train import fit


def test_slot_movement_is_relative_to_the_initial_size():
    m0 = torch.ones(4, 3)
    assert dg.slot_movement(m0, m0.clone()) == 0.0
    assert dg.slot_movement(m0, 1.5 * m0) == pytest.approx(0.5)
    assert dg.slot_movement(None, m0) is None


def test_slot_usage_perplexity_counts_the_slots_in_use():
    one_hot = torch.zeros(10, 8)
    one_hot[:, 3] = 1.0  # every location reads slot 3
    assert dg.slot_usage(one_hot) == {"perplexity": 1.0, "used_slots": 1, "nonzero_per_location": 1.0, "slots": 8}
    spread = torch.eye(8).repeat(2, 1)  # each slot read equally often
    assert dg.slot_usage(spread)["perplexity"] == pytest.approx(8.0)
    dense = torch.full((5, 8), 1 / 8)  # a dense average: every location reads every slot
    usage = dg.slot_usage(dense)
    assert usage["perplexity"] == pytest.approx(8.0) and usage["nonzero_per_location"] == 8.0


def test_captured_fraction_finds_the_slots_that_stored_a_defect():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.0]])
    defective = torch.tensor([False, True, False, False])
    slots = torch.tensor([[0.1, 1.0], [1.0, 0.05], [-1.0, 0.1], [0.0, 2.0]])  # slots 0 and 3 sit on the defect
    assert dg.captured_fraction(slots, features, defective) == 0.5
    assert dg.captured_fraction(slots, features, torch.zeros(4, dtype=torch.bool)) == 0.0
    # dot-product similarity (MemAE) prefers long vectors: slot 1 [1, 0.05] now picks feature 0 as before
    assert dg.captured_fraction(slots, features, defective, similarity="dot") == 0.5


def test_untrusted_scores_are_precision_and_recall_against_the_defects():
    trusted = torch.tensor([True, False, False, True, True])
    defect = torch.tensor([False, True, False, True, False])
    s = dg.untrusted_scores(trusted, defect)
    assert s == {"untrusted_fraction": pytest.approx(0.4), "untrusted_precision": 0.5, "untrusted_recall": 0.5}
    clean = dg.untrusted_scores(trusted, torch.zeros(5, dtype=torch.bool))
    assert clean["untrusted_recall"] is None and clean["untrusted_precision"] == 0.0
    assert dg.untrusted_scores(torch.ones(3, dtype=torch.bool), defect[:3])["untrusted_precision"] is None


def test_reconstruction_diversity_is_zero_for_a_collapsed_model_and_one_for_the_identity():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    same = dg.reconstruction_stats(x, x)
    assert same["l1_good"] == 0.0 and same["diversity"] == pytest.approx(1.0)
    collapsed = dg.reconstruction_stats(x, x.mean(0, keepdim=True).expand_as(x))
    assert collapsed["diversity"] == pytest.approx(0.0, abs=1e-6) and collapsed["l1_good"] > 0.1
    # A test folder with no good image (or one) has no spread to measure: None, not NaN (result files are JSON).
    assert dg.reconstruction_stats(x[:0], x[:0]) == {"l1_good": None, "diversity": None, "n_images": 0}
    assert dg.reconstruction_stats(x[:1], x[:1])["diversity"] is None


@pytest.mark.parametrize("method", ["trustmae", "memae", "ae_l2"])
def test_a_trained_run_records_its_initial_slots_and_its_result_carries_the_diagnostics(tmp_path, method):
    spec = RunSpec(method=method, category="widget", noise_ratio=0.2, steps=3)
    run = fit(spec, tmp_path, progress=False)
    result = evaluate(run.run_dir)
    diag = result["diagnostics"]
    assert 0 <= diag["reconstruction"]["l1_good"] <= 2 and diag["reconstruction"]["diversity"] >= 0
    assert diag["reconstruction"]["n_images"] == result["n_test"] - result["n_test_defective"]
    if method == "ae_l2":
        assert set(diag) == {"reconstruction"}
        return
    init = load_checkpoint(run.run_dir / CHECKPOINT)["memory_init"]
    slots = load_trained(run.run_dir).models["model"].memory.memory.detach()
    assert init.shape == slots.shape
    mem = diag["memory"]
    # Three steps of real training moved the slots, by exactly what the two tensors say.
    assert mem["slot_movement"] == pytest.approx(float((slots - init).norm() / init.norm()), rel=1e-5)
    assert mem["slot_movement"] > 0
    assert 1 <= mem["perplexity"] <= mem["slots"] and 1 <= mem["used_slots"] <= mem["slots"]
    assert 0 <= mem["captured_fraction"] <= 1 and mem["defect_locations"] > 0  # 20 % noise: defects in training
    if method == "trustmae":
        trust = diag["trust"]
        assert 0 <= trust["untrusted_fraction"] <= 1 and trust["untrusted_recall"] is not None
        assert mem["nonzero_per_location"] <= spec.load_profile().memory_topk  # top-k addressing reads k slots at most
    else:
        assert "trust" not in diag and math.isfinite(mem["nonzero_per_location"])
