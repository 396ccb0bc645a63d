"""PatchCore-style context baseline: exact nearest-neighbour distances, own-image exclusion, a full evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trustmae_lib.config import RunSpec
from trustmae_lib.engine.evaluate import evaluate_patchcore
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.patchcore import PatchBank, anomaly_maps, patch_features
from trustmae_lib.model.perceptual import build_backbone

pytestmark = pytest.mark.usefixtures("isolated_data")


def _brute_force(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    d = np.sqrt(((queries[:, None, :] - bank[None, :, :]) ** 2).sum(-1))
    return d.min(1)


def test_distances_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(3, 5, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    bank = PatchBank(train)
    assert len(bank) == 3 * 16
    got = bank.distances(test).numpy().reshape(-1)
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, 5).numpy()  # noqa: E731
    np.testing.assert_allclose(got, _brute_force(rows(train), rows(test)), rtol=1e-5, atol=1e-5)


def test_exclusion_leaves_out_the_image_itself():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(3, 5, 2, 2, generator=g)
    bank = PatchBank(train)
    assert torch.all(bank.distances(train) == 0)  # every training patch is in the bank
    excluded = bank.distances(train, exclude=torch.arange(3))
    rows = train.permute(0, 2, 3, 1).reshape(3, 4, 5).numpy()
    for i in range(3):
        others = np.concatenate([rows[j] for j in range(3) if j != i])
        np.testing.assert_allclose(excluded[i].reshape(-1).numpy(), _brute_force(others, rows[i]), rtol=1e-5)


def test_channel_mismatch_is_a_clear_error():
    bank = PatchBank(torch.zeros(1, 4, 2, 2))
    with pytest.raises(TrustMAEError, match="channels"):
        bank.distances(torch.zeros(1, 3, 2, 2))


def test_maps_score_the_maximum():
    d = torch.zeros(2, 4, 4)
    d[1, 2, 2] = 5.0
    maps, scores = anomaly_maps(d, 32)
    assert maps.shape == (2, 1, 32, 32)
    assert scores[0] == 0 and scores[1] > 0
    torch.testing.assert_close(scores, maps.amax((1, 2, 3)))


def test_patch_features_grid_and_channels():
    backbone = build_backbone("efficientnet_lite0").eval()
    feats = patch_features(backbone, torch.zeros(2, 3, 64, 64))
    with torch.inference_mode():
        taps = backbone(torch.zeros(1, 3, 64, 64))
    assert feats.shape == (2, taps[2].shape[1] + taps[3].shape[1], 8, 8)  # stride-8 grid


def test_evaluate_patchcore_on_the_smoke_data():
    spec = RunSpec(category="widget", method="patchcore", profile="smoke", noise_ratio=0.1)
    result = evaluate_patchcore(spec, device="cpu")
    assert result["method"] == "patchcore" and result["steps"] == 0
    assert result["config_hash"] == spec.config_hash()
    assert result["backbone"] == "efficientnet_lite0"
    entry = result["metrics"]["patch_knn"]
    assert 0.0 <= entry["image_auroc"] <= 1.0 and 0.0 <= entry["pixel_auroc"] <= 1.0
    assert result["bank_patches"] == result["n_train"] * (64 // 8) ** 2


def test_patchcore_cannot_be_trained(tmp_path):
    from trustmae_lib.engine.train import train

    with pytest.raises(TrustMAEError, match="nothing to train"):
        train(RunSpec(category="widget", method="patchcore", profile="smoke"), tmp_path, progress=False)
