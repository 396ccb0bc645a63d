"""Scoring and evaluation: the three TrustMAE variants, scikit-learn metrics, a training-only threshold, provenance."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from trustmae_lib.config import RunSpec, load_profile
from trustmae_lib.data.mvtec import scan_category
from trustmae_lib.data.tensors import load_tensors
from trustmae_lib.engine import evaluate as ev
from trustmae_lib.engine.runs import load_trained
from trustmae_lib.engine.train import load_or_train
from trustmae_lib.errors import TrustMAEError

pytestmark = pytest.mark.usefixtures("isolated_data")


@pytest.fixture(scope="module")
def trustmae_run(tmp_path_factory):
    spec = RunSpec(method="trustmae", category="brick", noise_ratio=0.2, steps=3)
    return load_or_train(spec, tmp_path_factory.mktemp("runs"), progress=False)


class _Reconstructor(nn.Module):
    """A stand-in auto-encoder: returns the input itself, or always the same clean image."""

    def __init__(self, clean: torch.Tensor | None = None):
        super().__init__()
        self.clean = clean

    def forward(self, x):
        return SimpleNamespace(recon=x.clone() if self.clean is None else self.clean.expand_as(x).clone())


def _stub(clean=None, size=64):
    return SimpleNamespace(method="trustmae", score_size=size, input_size=size, profile=load_profile("smoke"),
                           device=torch.device("cpu"), models={"model": _Reconstructor(clean)})  # fmt: skip


def _brick_images(n=2, size=64):
    from trustmae_lib.data.embedded import ensure_dataset

    index = scan_category(ensure_dataset("synthetic", load_profile("smoke")), "brick")
    images, _ = load_tensors(index.train[:n], size)
    return images


def test_identity_reconstruction_gives_zero_maps():
    stub = _stub()
    images = _brick_images()
    for variant in ev.VARIANTS:
        maps, scores, recons = ev.score(stub, images, variant)
        assert maps.shape == (2, 1, 64, 64) and scores.shape == (2,) and recons.shape == (2, 3, 64, 64)
        torch.testing.assert_close(maps, torch.zeros_like(maps), atol=1e-6, rtol=0)
        torch.testing.assert_close(scores, torch.zeros(2), atol=1e-6, rtol=0)


def test_a_local_change_makes_the_map_peak_there():
    clean = _brick_images(1)
    changed = clean.clone()
    changed[:, :, 40:48, 12:20] = torch.tensor([-1.0, 1.0, -1.0]).view(1, 3, 1, 1)  # a green square
    stub = _stub(clean)
    for variant in ("perceptual", "pixel"):
        maps, scores, _ = ev.score(stub, changed, variant)
        row, col = divmod(int(maps[0, 0].argmax()), 64)
        assert 36 <= row < 52 and 8 <= col < 24, f"{variant}: peak at {(row, col)}"
        assert maps[0, 0, 40:48, 12:20].mean() > 3 * maps[0, 0, :24, 40:].mean()
        assert float(scores[0]) == pytest.approx(float(maps[0].max()))
    maps, scores, _ = ev.score(stub, changed, "global")
    assert float(scores[0]) > 0 and torch.all(maps == scores[0])  # w/o SP: one number, a constant map
    assert float(ev.score(stub, clean, "global").pred_scores[0]) == pytest.approx(0.0, abs=1e-6)


def test_perceptual_map_is_a_weighted_sum_of_channel_normalised_layer_distances():
    fx = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    fy = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)]
    got = ev.perceptual_distance_map(fx, fy, (16, 16), (0.5, 2.0))
    want = 0
    for a, b, w in zip(fx, fy, (0.5, 2.0), strict=True):
        d = (a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)).pow(2).sum(1, keepdim=True)
        want = want + w * nn.functional.interpolate(d, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want)
    # Unit vectors: each layer's squared distance lies in [0, 4].
    assert float(got.min()) >= 0 and float(got.max()) <= 4 * 2.5 + 1e-5


def test_weighted_sum_of_the_layer_maps_is_the_perceptual_map_to_the_bit():
    from trustmae_lib.errors import TrustMAEError
    from trustmae_lib.model.distance import perceptual_distance_layers, weighted_sum

    g = torch.Generator().manual_seed(1)
    fx = [torch.randn(2, c, s, s, generator=g) for c, s in ((4, 8), (6, 4), (8, 2))]
    fy = [torch.randn(2, c, s, s, generator=g) for c, s in ((4, 8), (6, 4), (8, 2))]
    weights = (0.3, 1.7, 0.9)
    stacked = torch.cat(perceptual_distance_layers(fx, fy, (16, 16)), dim=1)  # (B, L, H, W), as the probe holds it
    assert torch.equal(weighted_sum(stacked.split(1, dim=1), weights),
                       ev.perceptual_distance_map(fx, fy, (16, 16), weights))  # fmt: skip
    with pytest.raises(TrustMAEError, match="one weight per map"):
        weighted_sum(stacked.split(1, dim=1), weights[:2])


def test_metrics_agree_with_scikit_learn():
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert ev.image_auroc(labels, scores) == pytest.approx(0.75)
    assert ev.image_auroc([1, 1], [0.2, 0.3]) is None
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 1, 20, 20, generator=g) > 0.8).float()
    maps = masks * 0.5 + torch.rand(3, 1, 20, 20, generator=g)
    full = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert ev.pixel_auroc(masks, maps) == pytest.approx(full)
    sub = ev.pixel_auroc(masks, maps, max_pixels=600)
    assert sub == ev.pixel_auroc(masks, maps, max_pixels=600) and abs(sub - full) < 0.1  # seeded subsample
    m = ev.threshold_metrics([0, 0, 1, 1, 1], [0.1, 0.9, 0.8, 0.2, 0.7], threshold=0.5)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)


def test_threshold_rule_accounts_for_the_known_contamination():
    train = np.arange(100, dtype=float)
    t = ev.fit_threshold(train, noise_ratio=0.1)
    assert t["quantile"] == pytest.approx(0.85) and t["value"] == pytest.approx(np.quantile(train, 0.85))
    assert ev.fit_threshold(train, 0.3)["value"] < t["value"] < ev.fit_threshold(train, 0.0)["value"]


def test_evaluate_writes_result_with_provenance_and_sklearn_auc(trustmae_run):
    result = ev.evaluate(trustmae_run)
    on_disk = json.loads((trustmae_run / ev.RESULT).read_text())
    assert on_disk == json.loads(json.dumps(result))
    missing = [k for k in ev.PROVENANCE_KEYS if k not in on_disk]
    assert not missing
    assert on_disk["backbone"] == "efficientnet_lite0" and on_disk["profile"] == "smoke"
    assert on_disk["noise_ratio"] == 0.2 and on_disk["steps"] == 3 and on_disk["device"] == "cpu"
    assert len(on_disk["manifest_hash"]) == 12 and on_disk["config_hash"] == trustmae_run.name.rsplit("-", 1)[1]
    assert set(on_disk["metrics"]) == set(ev.VARIANTS)
    assert on_disk["metrics"]["global"]["pixel_auroc"] is None
    with open(trustmae_run / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = [int(r["label"]) for r in rows]
    for variant in ev.VARIANTS:
        scores = [float(r[variant]) for r in rows]
        assert on_disk["metrics"][variant]["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
        cm = np.array(on_disk["metrics"][variant]["confusion_matrix"])
        assert cm.sum() == len(rows) and cm[1].sum() == sum(labels)


def test_threshold_uses_training_scores_only(trustmae_run, monkeypatch):
    before = ev.evaluate(trustmae_run, variants=["perceptual", "pixel"])
    real = ev._test_tensors

    def shifted_test_set(trained, size):
        images, masks = real(trained, size)
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
        return (images + 0.5 * noise).clamp(-1, 1), masks

    monkeypatch.setattr(ev, "_test_tensors", shifted_test_set)
    after = ev.evaluate(trustmae_run, variants=["perceptual", "pixel"])
    for variant in ("perceptual", "pixel"):
        assert after["metrics"][variant]["threshold"] == before["metrics"][variant]["threshold"]
        assert after["metrics"][variant]["confusion_matrix"] != before["metrics"][variant]["confusion_matrix"] or (
            after["metrics"][variant]["image_auroc"] != before["metrics"][variant]["image_auroc"]
        )


def test_baseline_scores_its_residual_map_and_rejects_trustmae_variants(tmp_path):
    run = load_or_train(RunSpec(method="memae", category="widget", steps=2), tmp_path, progress=False)
    trained = load_trained(run)
    images, _ = load_tensors(list(trained.split.test[:3]), trained.score_size)
    maps, scores, recons = ev.score(trained, images)
    assert maps.shape == (3, 1, 64, 64) and torch.all(maps >= 0)
    torch.testing.assert_close(scores, maps.amax((1, 2, 3)))
    with pytest.raises(TrustMAEError, match="do not apply"):
        ev.score(trained, images, "perceptual")


def test_texture_baseline_is_scored_with_sliding_windows_at_4x(tmp_path):
    run = load_or_train(RunSpec(method="ae_l2", category="brick", steps=1), tmp_path, progress=False)
    trained = load_trained(run)
    assert trained.score_size == 4 * trained.input_size == 256
    images, _ = load_tensors(list(trained.split.test[:1]), trained.score_size)
    maps, scores, recons = ev.score(trained, images)
    assert maps.shape == (1, 1, 256, 256) and recons.shape == (1, 3, 256, 256)
    assert torch.isfinite(maps).all() and float(scores[0]) > 0
