"""The scoring probe (trustmae_lib.study.layers): the per-layer maps rebuild the run's own score, each scoring does
what its name says, and a sweep without checkpoints is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trustmae_lib.engine import evaluate as ev
from trustmae_lib.engine.runs import load_trained, run_dir_for
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.distance import smoothing_sigma
from trustmae_lib.study import layers, sweep

pytestmark = pytest.mark.usefixtures("isolated_data")


@pytest.fixture(scope="module")
def probe_sweep(tmp_path_factory):
    """A one-cell sweep file (a widget TrustMAE run of 3 smoke steps) and its folders; nothing trained yet."""
    root = tmp_path_factory.mktemp("probe")
    path = root / "sweep_probe.yaml"
    path.write_text(
        "profile: smoke\n"
        "datasets:\n  synthetic: [widget]\n"
        "methods: [trustmae]\n"
        "noise_ratios: [0.0]\n"
        "seeds: [0]\n"
        "steps: 3\n"
        f"results: {root / 'results'}\n"
        f"runs: {root / 'runs'}\n"
    )
    return path


def test_a_sweep_without_checkpoints_is_a_one_line_error_that_names_the_sweep(probe_sweep, tmp_path):
    with pytest.raises(TrustMAEError, match="trustmae sweep .*sweep_probe.yaml") as err:
        layers.probe_sweeps([str(probe_sweep)], tmp_path / "probe.json", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "probe.json").exists()


def test_the_paper_scoring_is_the_runs_own_perceptual_score_to_the_bit(probe_sweep, tmp_path):
    config = sweep.load_sweep(probe_sweep)
    (spec,) = config.grid()
    outcome = sweep.run_cell(spec, config.results_dir, config.runs_dir)
    assert outcome["ok"], outcome.get("error")
    result = outcome["result"]
    run_dir = run_dir_for(spec, config.runs_dir)

    record = layers.probe_sweeps([str(probe_sweep)], tmp_path / "probe.json", progress=False)
    (run,) = record["runs"]
    aurocs = run["image_auroc"]
    assert aurocs["paper"] == result["metrics"]["perceptual"]["image_auroc"]
    n_layers = len(record["layer_weights"])
    assert set(aurocs) == {"paper", "equal", "normalised", "paper_top1"} | {f"layer{i + 1}" for i in range(n_layers)}
    assert all(0.0 <= v <= 1.0 for v in aurocs.values())
    assert run["run"] == run_dir.name and run["steps"] == 3 and run["category"] == "widget"
    text = (tmp_path / "probe.json").read_text()
    assert json.loads(text) == json.loads(json.dumps(record, default=str))
    assert str(tmp_path) not in text and str(config.runs_dir) not in text  # no machine paths, names only

    # per image: the same scores as evaluate's perceptual variant, not only the same ranking
    trained = load_trained(run_dir)
    images, _ = ev._test_tensors(trained, trained.score_size)
    with torch.inference_mode():
        maps = layers.layer_maps(trained, images)
    assert maps.shape == (len(images), n_layers, trained.score_size, trained.score_size) and (maps >= 0).all()
    scores = layers.image_scores(maps, [1.0] * n_layers, record["layer_weights"], smoothing_sigma(trained.score_size))
    expected = ev.score(trained, images, "perceptual").pred_scores.numpy()
    np.testing.assert_array_equal(scores["paper"], expected)


def _maps(n=4, layers_=3, size=16):
    return torch.rand(n, layers_, size, size, generator=torch.Generator().manual_seed(0)) * 0.1


def test_a_defect_seen_by_one_layer_raises_only_that_layers_score_and_the_sums():
    maps = _maps()
    maps[0, 1, 4:8, 4:8] += 5.0  # image 0: a strong difference in layer 2 only
    scores = layers.image_scores(maps, [1.0, 1.0, 1.0], [0.25, 0.5, 1.0], sigma=0.0)
    for name in ("layer2", "equal", "paper", "normalised", "paper_top1"):
        assert scores[name].argmax() == 0, name
    for name in ("layer1", "layer3"):  # untouched layers do not see it
        assert scores[name][0] <= 0.1 + 1e-6, name
    assert scores["equal"][0] == pytest.approx(float(maps[0].sum(0).max()), rel=1e-6)


def test_normalising_by_the_training_mean_undoes_a_layers_scale():
    maps = _maps()
    scaled = maps.clone()
    scaled[:, 0] *= 1000.0  # one layer on a thousand times larger a scale
    weights = [1.0, 1.0, 1.0]
    plain = layers.image_scores(maps, [0.05, 0.05, 0.05], weights, sigma=1.0)
    loud = layers.image_scores(scaled, [50.0, 0.05, 0.05], weights, sigma=1.0)
    np.testing.assert_allclose(loud["normalised"], plain["normalised"], rtol=1e-5)
    assert not np.allclose(loud["equal"], plain["equal"], rtol=1e-2)  # equal weights are dominated by that layer
    np.testing.assert_allclose(loud["equal"], loud["layer1"], rtol=2e-2)  # ... and nearly that layer alone


def test_the_top_share_score_lies_between_the_maps_mean_and_its_maximum():
    maps = _maps(size=32)
    scores = layers.image_scores(maps, [1.0, 1.0, 1.0], [0.2, 0.3, 0.5], sigma=0.0)
    paper = (maps * torch.tensor([0.2, 0.3, 0.5]).view(1, 3, 1, 1)).sum(1)
    assert (scores["paper_top1"] <= scores["paper"] + 1e-7).all()
    assert (scores["paper_top1"] >= paper.mean((1, 2)).numpy()).all()
    flat = torch.full((2, 3, 32, 32), 0.5)
    flat_scores = layers.image_scores(flat, [1.0, 1.0, 1.0], [0.2, 0.3, 0.5], sigma=0.0)
    np.testing.assert_allclose(flat_scores["paper_top1"], flat_scores["paper"], rtol=1e-6)


def test_mismatched_layer_counts_are_a_one_line_error():
    with pytest.raises(TrustMAEError, match="one of each per layer"):
        layers.image_scores(_maps(), [1.0, 1.0], [1.0, 1.0, 1.0], sigma=0.0)


COMMITTED_PROBE = Path(__file__).resolve().parent.parent / "results" / "analysis" / "scoring_layers_validation.json"


def test_the_committed_probe_scored_the_committed_validation_runs():
    """Chapter 10's probe file covers every cell of its sweeps, and its ``paper`` scoring of each run is the image
    AUROC of that cell's committed result file: the runs it took apart are the ones the book reports."""
    probe = json.loads(COMMITTED_PROBE.read_text())
    by_run = {r["run"]: r for r in probe["runs"]}
    assert len(by_run) == len(probe["runs"])
    expected = set()
    for name in probe["sweeps"]:
        config = sweep.load_sweep(name)
        for spec in config.grid():
            result = sweep.current_result(spec, config.results_dir)
            assert result is not None, f"{spec.file_stem()}: no current committed result"
            run = by_run[run_dir_for(spec, config.runs_dir).name]
            assert run["image_auroc"]["paper"] == result["metrics"]["perceptual"]["image_auroc"], run["run"]
            assert run["steps"] == result["steps"] and run["seed"] == spec.seed
            expected.add(run["run"])
    assert expected == set(by_run)
    assert {"cpu", "cpu_capability", "native_bf16", "threads", "torch"} <= set(probe["platform"])
