"""TrustMAE's training objective: supplement Eq. 9-15.

Eq. 9 is a weighted sum ``L_total = l_rec L_rec + l_sm L_sm + l_vgg L_vgg + l_GAN L_GAN + l_feat L_feat
+ l_margin L_margin + l_trust L_trust`` with the supplement's weights ``l_rec = l_sm = l_vgg = l_feat = 10``
and ``l_GAN = 1`` (:class:`LossWeights`). The terms:

* Eq. 10 :func:`reconstruction_loss` -- mean absolute error.
* Eq. 11 :func:`ssim`, :func:`ssim_loss` -- SSIM with an 11x11 Gaussian window (sigma 1.5), ``c1 = 0.01^2``,
  ``c2 = 0.03^2`` on images in ``[0, 1]``; the loss is ``1 - SSIM``.
* Eq. 12 :func:`perceptual_loss` -- weighted L1 between frozen-backbone features (see :mod:`.perceptual`).
* Eq. 13 / 14 :func:`hinge_d_loss`, :func:`hinge_g_loss` -- hinge GAN losses.
* Eq. 15 :func:`feature_matching_loss` -- L1 between discriminator features of ``x`` and ``G(x)``.

Readings:

* ``||.||_1`` in Eq. 12 and 15 is read as the *mean* absolute difference per layer (the normalisation Eq. 10
  states for ``L_rec``), so a layer's weight does not depend on its size.
* Eq. 11 writes SSIM for one pair of patches; we average the SSIM map over all valid window positions and
  channels, exactly as ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`` does, and ``L_sm = 1 - mean SSIM``.
* ``l_margin`` and ``l_trust`` are not in the supplement; their defaults (0, 1) are ours. ``l_margin`` is 0 by
  default because the triplet margin term collapsed the encoder at our scale (see :class:`LossWeights`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from trustmae_lib.config import LossWeights
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.perceptual import LAYER_WEIGHTS

__all__ = [
    "LOSS_TERMS",
    "reconstruction_loss",
    "gaussian_window",
    "ssim",
    "ssim_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "feature_matching_loss",
    "perceptual_loss",
    "generator_loss",
]

#: Eq. 9's terms, in the supplement's order.
LOSS_TERMS: tuple[str, ...] = ("rec", "sm", "vgg", "gan", "feat", "margin", "trust")


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise TrustMAEError(
            f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)} -- pass an image and "
            "its reconstruction of the same size"
        )


# ---------------------------------------------------------------------------------------------------- Eq. 10
def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Eq. 10: ``L_rec = 1/(HWC) sum |x - x_hat|`` (also averaged over the batch).

    Args:
        x: ``(B, C, H, W)`` input.
        x_hat: ``(B, C, H, W)`` reconstruction.

    Returns:
        Scalar tensor.
    """
    _check_same_shape(x, x_hat, "reconstruction_loss")
    return (x - x_hat).abs().mean()


# ---------------------------------------------------------------------------------------------------- Eq. 11
def gaussian_window(window_size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> Tensor:
    """Normalised 1-D Gaussian ``(window_size,)``, as scipy's ``gaussian_filter`` (radius ``ws // 2``)."""
    r = torch.arange(window_size, dtype=dtype, device=device) - (window_size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _symmetric_pad(x: Tensor, pad: int) -> Tensor:
    """Pad H and W by ``pad``, repeating the edge sample (scipy ``mode='reflect'``: ``d c b a | a b c d``)."""

    def index(n: int) -> Tensor:
        i = torch.arange(-pad, n + pad, device=x.device)
        i = torch.where(i < 0, -i - 1, i)  # -1 -> 0, -2 -> 1, ...
        return torch.where(i >= n, 2 * n - 1 - i, i)  # n -> n-1, n+1 -> n-2, ...

    h, w = x.shape[-2:]
    return x.index_select(-2, index(h)).index_select(-1, index(w))


def _gaussian_blur(stack: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian filter ``g`` applied to every channel of ``stack`` on its own, "valid" positions only."""
    n = stack.shape[1]
    stack = F.conv2d(stack, g.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)  # along H
    return F.conv2d(stack, g.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)  # along W


def ssim(
    x: Tensor,
    y: Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    c1: float = 0.01**2,
    c2: float = 0.03**2,
    reduction: str = "mean",
    padding: str = "valid",
    input_range: tuple[float, float] = (-1.0, 1.0),
    keep_channels: bool = False,
) -> Tensor:
    """Structural similarity, Eq. 11, with Gaussian-weighted local statistics.

    Images are first mapped from ``input_range`` to ``[0, 1]`` (the supplement's constants
    ``c1 = 0.01^2``, ``c2 = 0.03^2`` are ``(K * L)^2`` for data range ``L = 1``); pass
    ``input_range=(0, 1)`` for images that are already in ``[0, 1]``. Local means, variances and covariance
    come from a separable ``window_size`` Gaussian (sigma 1.5) applied per channel (grouped convolution).

    With ``padding="valid"`` the map covers only window positions fully inside the image, and
    ``reduction="mean"`` equals ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1)`` (skimage filters the whole image
    but crops ``(window_size - 1) // 2`` pixels before averaging -- the same positions). With
    ``padding="same"`` the image is mirror-padded (scipy's ``reflect``: the edge pixel is repeated, as skimage
    does) and the map has the input size -- equal to skimage's ``full=True`` map -- for per-pixel anomaly
    maps (AE-SSIM scoring).

    Args:
        x: ``(B, C, H, W)`` image in ``input_range``.
        y: ``(B, C, H, W)`` image in ``input_range``.
        window_size: odd window side (11 in the supplement).
        sigma: Gaussian standard deviation (1.5).
        c1: luminance constant on the ``[0, 1]`` scale.
        c2: contrast/structure constant on the ``[0, 1]`` scale (``c3 = c2 / 2`` is folded into Eq. 11).
        reduction: ``"mean"`` -> scalar; ``"none"`` -> the SSIM map.
        padding: ``"valid"`` -> map ``(H - ws + 1, W - ws + 1)``; ``"same"`` -> map ``(H, W)``.
        input_range: ``(lo, hi)`` of the inputs, mapped linearly to ``[0, 1]``.
        keep_channels: with ``reduction="none"``, return ``(B, C, H', W')`` instead of the channel mean.

    Returns:
        Scalar (``"mean"``), or the map ``(B, 1, H', W')`` (``(B, C, H', W')`` with ``keep_channels``).

    Example:
        >>> x = torch.rand(2, 3, 32, 32) * 2 - 1
        >>> float(ssim(x, x))
        1.0
    """
    _check_same_shape(x, y, "ssim")
    if x.ndim != 4:
        raise TrustMAEError(
            f"ssim expects (B, C, H, W) images, got shape {tuple(x.shape)} -- add batch and channel dimensions"
        )
    if window_size % 2 != 1 or window_size < 1:
        raise TrustMAEError(f"ssim window_size must be a positive odd number, got {window_size} -- use 11")
    if reduction not in ("mean", "none"):
        raise TrustMAEError(f"ssim reduction must be 'mean' or 'none', got {reduction!r}")
    if padding not in ("valid", "same"):
        raise TrustMAEError(f"ssim padding must be 'valid' or 'same', got {padding!r}")
    b, c, h, w = x.shape
    pad = (window_size - 1) // 2
    if min(h, w) < window_size:
        raise TrustMAEError(
            f"ssim needs images of at least {window_size}x{window_size}, got {h}x{w} -- use "
            "larger images or a smaller window_size"
        )
    lo, hi = input_range
    x = (x - lo) / (hi - lo)  # -> [0, 1]
    y = (y - lo) / (hi - lo)
    if padding == "same":
        x, y = _symmetric_pad(x, pad), _symmetric_pad(y, pad)

    # The five local statistics from a grouped, separable Gaussian convolution, in two stacks: the input's own
    # (B, 2C, H, W) and those that involve y (B, 3C, H, W). Each channel is filtered on its own, so this equals one
    # stack of five (bit for bit where we measured it, benchmarks/bench_changes.py); but when only y needs a gradient
    # -- L_sm in training -- the backward pass filters 3C channels instead of 5C, which pays in channels-last.
    g = gaussian_window(window_size, sigma, dtype=x.dtype, device=x.device)
    mu_x, e_xx = _gaussian_blur(torch.cat([x, x * x], dim=1), g).split(c, dim=1)
    mu_y, e_yy, e_xy = _gaussian_blur(torch.cat([y, y * y, x * y], dim=1), g).split(c, dim=1)

    var_x = e_xx - mu_x**2  # sigma_p^2 (population variance, use_sample_covariance=False)
    var_y = e_yy - mu_y**2
    cov_xy = e_xy - mu_x * mu_y  # sigma_pq
    # Eq. 11: (2 mu_p mu_q + c1)(2 sigma_pq + c2) / ((mu_p^2 + mu_q^2 + c1)(sigma_p^2 + sigma_q^2 + c2))
    num = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    ssim_map = num / den  # (B, C, H', W')

    if reduction == "mean":
        return ssim_map.mean()
    return ssim_map if keep_channels else ssim_map.mean(dim=1, keepdim=True)


def ssim_loss(x: Tensor, y: Tensor, **kwargs) -> Tensor:
    """``L_sm = 1 - SSIM(x, y)`` (Eq. 11's term in Eq. 9); ``kwargs`` go to :func:`ssim`.

    Args:
        x: ``(B, C, H, W)`` in ``[-1, 1]``.
        y: ``(B, C, H, W)`` in ``[-1, 1]``.

    Returns:
        Scalar tensor in ``[0, 2]``.
    """
    return 1.0 - ssim(x, y, reduction="mean", **kwargs)


# ------------------------------------------------------------------------------------------------ Eq. 13 / 14
def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Eq. 13: ``-E[min(0, -1 + D(x))] - E[min(0, -1 - D(G(x)))]``.

    Args:
        real_logits: discriminator output for real images, any shape (e.g. ``(B, 1, h, w)`` patches).
        fake_logits: discriminator output for reconstructions (pass ``G(x).detach()`` through D).

    Returns:
        Scalar tensor, ``>= 0``.
    """
    # -min(0, -1 + d) = relu(1 - d);  -min(0, -1 - d) = relu(1 + d)
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """Eq. 14: ``-E[D(G(x))]``.

    Args:
        fake_logits: discriminator output for reconstructions, any shape.

    Returns:
        Scalar tensor.
    """
    return -fake_logits.mean()


# ---------------------------------------------------------------------------------------------------- Eq. 15
def _check_feature_lists(a: Sequence[Tensor], b: Sequence[Tensor], what: str) -> None:
    if len(a) != len(b) or len(a) == 0:
        raise TrustMAEError(
            f"{what}: got {len(a)} and {len(b)} feature maps -- pass the same, non-empty list of layers for both images"
        )
    for i, (fa, fb) in enumerate(zip(a, b, strict=True)):
        if fa.shape != fb.shape:
            raise TrustMAEError(
                f"{what}: layer {i} shapes differ, {tuple(fa.shape)} vs {tuple(fb.shape)} -- pass "
                "images of the same size"
            )


def feature_matching_loss(real_feats: Sequence[Tensor], fake_feats: Sequence[Tensor]) -> Tensor:
    """Eq. 15: ``L_feat = sum_l mean |D_l(x) - D_l(G(x))|``, real features detached.

    Detaching the real branch means the generator's step never sends gradients into the discriminator through
    ``D_l(x)``.

    Args:
        real_feats: list of ``(B, C_l, H_l, W_l)`` discriminator features of the input images.
        fake_feats: the same layers for the reconstructions.

    Returns:
        Scalar tensor.
    """
    _check_feature_lists(real_feats, fake_feats, "feature_matching_loss")
    return sum((r.detach() - f).abs().mean() for r, f in zip(real_feats, fake_feats, strict=True))


# ---------------------------------------------------------------------------------------------------- Eq. 12
def perceptual_loss(
    feats_x: Sequence[Tensor], feats_y: Sequence[Tensor], weights: Sequence[float] = LAYER_WEIGHTS
) -> Tensor:
    """Eq. 12: ``L_vgg = sum_l lambda_l mean |psi_l(x) - psi_l(G(x))|``.

    A pure function of two feature lists (compute them with a :class:`~.perceptual.PerceptualBackbone`). The
    backbone is frozen, so ``psi(x)`` of a data image carries no gradient; nothing is detached here.

    Args:
        feats_x: list of ``(B, C_l, H_l, W_l)`` features of the inputs ``x``.
        feats_y: the same layers for the reconstructions ``G(x)``.
        weights: ``lambda_l``, one per layer (default 1/32, 1/16, 1/8, 1/4, 1).

    Returns:
        Scalar tensor.
    """
    _check_feature_lists(feats_x, feats_y, "perceptual_loss")
    if len(weights) != len(feats_x):
        raise TrustMAEError(
            f"perceptual_loss: {len(weights)} layer weights for {len(feats_x)} feature maps -- "
            "pass one weight per layer"
        )
    return sum(w * (a - b).abs().mean() for w, a, b in zip(weights, feats_x, feats_y, strict=True))


# ----------------------------------------------------------------------------------------------------- Eq. 9
def generator_loss(
    terms: Mapping[str, Tensor], weights: LossWeights | None = None, step: int | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Eq. 9: weighted sum of whichever terms are present.

    Args:
        terms: scalar tensors keyed by ``rec, sm, vgg, gan, feat, margin, trust`` (any subset).
        weights: the ``lambda`` of each term (default :class:`LossWeights`, the supplement's).
        step: training step, only used in the error message.

    Returns:
        ``(total, log)`` -- the weighted sum (a scalar tensor to backpropagate) and a dict of plain floats:
        each *unweighted* term under its key plus ``"total"``.

    Raises:
        TrustMAEError: an unknown key, a non-scalar term, or a NaN/inf term (named in the message).
    """
    unknown = [k for k in terms if k not in LOSS_TERMS]
    if unknown:
        raise TrustMAEError(f"unknown loss term(s) {unknown} -- use the keys {', '.join(LOSS_TERMS)}")
    if not terms:
        raise TrustMAEError(f"generator_loss got no terms -- pass at least one of {', '.join(LOSS_TERMS)}")
    lam = (weights or LossWeights()).as_dict()
    log: dict[str, float] = {}
    total = None
    where = f"step {step}" if step is not None else "this step"
    for key in LOSS_TERMS:  # Eq. 9's order
        if key not in terms:
            continue
        value = terms[key]
        if value.numel() != 1:
            raise TrustMAEError(f"loss term {key!r} has shape {tuple(value.shape)} -- reduce it to a scalar")
        v = float(value.detach())
        if not math.isfinite(v):
            raise TrustMAEError(f"loss term {key!r} is {v} at {where} -- lower the learning rate or check the input")
        log[key] = v
        contribution = lam[key] * value.reshape(())
        total = contribution if total is None else total + contribution
    log["total"] = float(total.detach())
    return total, log
