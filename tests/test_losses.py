"""Tests for trustmae_lib.model.losses (supplement Eq. 9-15)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from skimage import data as skdata
from skimage.filters import gaussian
from skimage.metrics import structural_similarity
from skimage.transform import resize

from trustmae_lib.config import LossWeights
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.losses import (
    LOSS_TERMS,
    feature_matching_loss,
    generator_loss,
    hinge_d_loss,
    hinge_g_loss,
    perceptual_loss,
    reconstruction_loss,
    ssim,
    ssim_loss,
)
from trustmae_lib.model.perceptual import LAYER_WEIGHTS


def sk_ssim(a: torch.Tensor, b: torch.Tensor, full: bool = False):
    """skimage reference for one (C, H, W) pair in [0, 1]."""
    a, b = a.double().permute(1, 2, 0).numpy(), b.double().permute(1, 2, 0).numpy()
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, full=full)
    if a.shape[-1] == 1:
        return structural_similarity(a[..., 0], b[..., 0], **kw)
    return structural_similarity(a, b, channel_axis=-1, **kw)


def to_pm1(img01: torch.Tensor) -> torch.Tensor:
    return img01 * 2 - 1


def real_image(name: str, size: tuple[int, int]) -> torch.Tensor:
    img = resize(getattr(skdata, name)(), size, anti_aliasing=True)  # float64 in [0, 1]
    return torch.from_numpy(img).permute(2, 0, 1).float()


# --------------------------------------------------------------------------------------------------- Eq. 10
def test_reconstruction_loss_is_mean_absolute_error():
    x = torch.tensor([[[[0.0, 1.0], [-1.0, 0.5]]]])
    x_hat = torch.tensor([[[[0.5, 1.0], [1.0, 0.0]]]])
    assert reconstruction_loss(x, x_hat).item() == pytest.approx((0.5 + 0 + 2 + 0.5) / 4)
    with pytest.raises(TrustMAEError, match="shapes differ"):
        reconstruction_loss(x, x_hat[..., :1])


# --------------------------------------------------------------------------------------------------- Eq. 11
@pytest.mark.parametrize("shape", [(2, 3, 11, 11), (2, 3, 16, 23), (1, 1, 40, 33), (2, 3, 64, 64)])
def test_ssim_matches_skimage_on_random_pairs(shape):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.rand(shape, generator=g)
    b = (a + 0.3 * torch.randn(shape, generator=g)).clamp(0, 1)
    ours = ssim(to_pm1(a), to_pm1(b), reduction="none")  # (B, 1, H', W')
    assert ours.shape == (shape[0], 1, shape[2] - 10, shape[3] - 10)
    for i in range(shape[0]):
        ref = sk_ssim(a[i], b[i])
        assert ours[i].mean().item() == pytest.approx(ref, abs=1e-4)
        assert ssim(to_pm1(a[i : i + 1]), to_pm1(b[i : i + 1])).item() == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("name,size", [("astronaut", (96, 96)), ("coffee", (64, 96)), ("astronaut", (128, 80))])
def test_ssim_matches_skimage_on_real_images(name, size):
    img = real_image(name, size)
    noisy = (img + 0.1 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    blurred = torch.from_numpy(gaussian(img.permute(1, 2, 0).numpy(), sigma=1.2, channel_axis=-1)).permute(2, 0, 1)
    for other in (noisy, blurred.float(), img.flip(-1)):
        ref = sk_ssim(img, other)
        ours = ssim(to_pm1(img)[None], to_pm1(other)[None]).item()
        assert ours == pytest.approx(ref, abs=1e-4)
    assert 0.0 < sk_ssim(img, blurred) < 0.999  # the pairs are not trivial


def test_ssim_same_padding_equals_skimage_full_map():
    a = real_image("coffee", (48, 56))
    b = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    _, ref_map = sk_ssim(a, b, full=True)  # (H, W, C), skimage filters with scipy's reflect mode
    ours = ssim(to_pm1(a)[None], to_pm1(b)[None], reduction="none", padding="same", keep_channels=True)
    assert ours.shape == (1, 3, 48, 56)
    np.testing.assert_allclose(ours[0].permute(1, 2, 0).numpy(), ref_map, atol=1e-4)
    mean_map = ssim(to_pm1(a)[None], to_pm1(b)[None], reduction="none", padding="same")
    assert mean_map.shape == (1, 1, 48, 56)
    torch.testing.assert_close(mean_map, ours.mean(1, keepdim=True))


def test_ssim_identity_symmetry_and_input_range():
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    y = torch.rand(2, 3, 24, 24) * 2 - 1
    for padding in ("valid", "same"):
        assert ssim(x, x, padding=padding).item() == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(ssim(x, x, padding=padding, reduction="none"), torch.ones(1), atol=1e-5)
    assert ssim(x, y).item() == pytest.approx(ssim(y, x).item(), abs=1e-7)
    assert ssim(x, y).item() < 0.5
    # [-1, 1] inputs are mapped to [0, 1]: same value as [0, 1] inputs with input_range=(0, 1).
    assert ssim(x, y).item() == pytest.approx(ssim((x + 1) / 2, (y + 1) / 2, input_range=(0, 1)).item(), abs=1e-6)
    assert ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert ssim_loss(x, y).item() == pytest.approx(1 - ssim(x, y).item(), abs=1e-6)


def test_ssim_bad_input():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(TrustMAEError, match="at least 11x11"):
        ssim(x, x)
    with pytest.raises(TrustMAEError, match="odd"):
        ssim(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16), window_size=10)
    with pytest.raises(TrustMAEError, match="shapes differ"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_ssim_gradcheck_float64(padding):
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(1, 2, 12, 11, dtype=torch.float64, generator=g) * 2 - 1).requires_grad_()
    y = (torch.rand(1, 2, 12, 11, dtype=torch.float64, generator=g) * 2 - 1).requires_grad_()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny convolutions: threads only add overhead
    try:
        assert torch.autograd.gradcheck(lambda a, b: ssim(a, b, padding=padding, reduction="none"), (x, y))
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ Eq. 13/14
def test_hinge_losses_hand_computed():
    real = torch.tensor([2.0, 0.5, -1.0])  # -min(0, -1 + d) = [0, 0.5, 2]
    fake = torch.tensor([-2.0, 0.0, 1.0])  # -min(0, -1 - d) = [0, 1, 2]
    assert hinge_d_loss(real, fake).item() == pytest.approx(2.5 / 3 + 1.0)
    assert hinge_g_loss(fake).item() == pytest.approx(-(-1.0 / 3))
    # A perfect discriminator (margin >= 1 on both sides) has zero loss.
    assert hinge_d_loss(torch.full((4, 1, 2, 2), 3.0), torch.full((4, 1, 2, 2), -1.0)).item() == 0.0


# --------------------------------------------------------------------------------------------------- Eq. 15
def test_feature_matching_value_and_detached_real_branch():
    real_leaf = torch.randn(2, 4, 8, 8, requires_grad=True)
    fake_leaf = torch.randn(2, 4, 8, 8, requires_grad=True)
    real_feats = [real_leaf * 1.0, real_leaf[:, :2] * 2.0]
    fake_feats = [fake_leaf * 1.0, fake_leaf[:, :2] * 2.0]
    loss = feature_matching_loss(real_feats, fake_feats)
    expected = sum((r - f).abs().mean() for r, f in zip(real_feats, fake_feats, strict=True))
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert real_leaf.grad is None  # no gradient reaches D through its real features
    assert fake_leaf.grad is not None and fake_leaf.grad.abs().sum() > 0
    with pytest.raises(TrustMAEError, match="feature maps"):
        feature_matching_loss(real_feats, fake_feats[:1])


# --------------------------------------------------------------------------------------------------- Eq. 12
def test_perceptual_loss_applies_layer_weights():
    feats_x = [torch.zeros(2, c, s, s) for c, s in zip((4, 8, 8, 16, 16), (16, 8, 4, 2, 1), strict=True)]
    feats_y = [f + 1.0 for f in feats_x]  # |difference| = 1 everywhere, every layer
    assert perceptual_loss(feats_x, feats_y).item() == pytest.approx(sum(LAYER_WEIGHTS))
    feats_y[4] = feats_x[4] + 3.0  # only the deepest layer (weight 1) changes
    assert perceptual_loss(feats_x, feats_y).item() == pytest.approx(sum(LAYER_WEIGHTS[:4]) + 3.0)
    assert perceptual_loss(feats_x, feats_y, weights=(0, 0, 0, 0, 2.0)).item() == pytest.approx(6.0)
    with pytest.raises(TrustMAEError, match="one weight per layer"):
        perceptual_loss(feats_x, feats_y, weights=(1.0, 1.0))


# ---------------------------------------------------------------------------------------------------- Eq. 9
def test_loss_weights_are_the_supplements():
    w = LossWeights()
    assert (w.rec, w.sm, w.vgg, w.gan, w.feat) == (10.0, 10.0, 10.0, 1.0, 10.0)
    assert tuple(w.as_dict()) == LOSS_TERMS
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.rec = 1.0


def test_generator_loss_weighted_sum_and_log():
    p = torch.tensor(2.0, requires_grad=True)
    terms = {"rec": p * 0.5, "sm": p * 0.25, "gan": -p, "trust": torch.tensor(3.0)}
    weights = LossWeights(rec=10, sm=4, gan=2, trust=0.5)
    total, log = generator_loss(terms, weights, step=7)
    assert total.item() == pytest.approx(10 * 1.0 + 4 * 0.5 + 2 * -2.0 + 0.5 * 3.0)
    assert log == pytest.approx({"rec": 1.0, "sm": 0.5, "gan": -2.0, "trust": 3.0, "total": total.item()})
    assert all(isinstance(v, float) for v in log.values())
    total.backward()
    assert p.grad.item() == pytest.approx(10 * 0.5 + 4 * 0.25 - 2)
    default_total, _ = generator_loss({"rec": torch.tensor(1.0), "feat": torch.tensor(1.0)})
    assert default_total.item() == pytest.approx(20.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_generator_loss_names_non_finite_term(bad):
    terms = {"rec": torch.tensor(1.0), "vgg": torch.tensor(bad)}
    with pytest.raises(TrustMAEError, match=r"'vgg' is (nan|inf) at step 12 -- lower the learning rate"):
        generator_loss(terms, LossWeights(), step=12)


def test_generator_loss_rejects_unknown_and_non_scalar_terms():
    with pytest.raises(TrustMAEError, match="l1"):
        generator_loss({"l1": torch.tensor(1.0)})
    with pytest.raises(TrustMAEError, match="scalar"):
        generator_loss({"rec": torch.ones(3)})
