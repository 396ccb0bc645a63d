"""The spatial perceptual distance between an image and its reconstruction, and the ablations' distances.

*Reading* (chapter 10, "Deviations and readings"): the main paper defines the distance; the supplement names it
and its ablations (Table 3). Per backbone layer ``l``, features of the image and of the reconstruction are
normalised to unit length over the channels at every location, their squared difference is summed over the
channels, upsampled to the image and weighted by Eq. 12's ``lambda_l`` (:func:`perceptual_distance_map`); the
anomaly map is that sum, lightly smoothed (:func:`smooth`), and the image score its maximum.

* *w/o PD*: the per-pixel squared distance instead (:func:`pixel_distance_map`);
* *w/o SP*: features pooled over the image before the distance, no map (:func:`global_perceptual_distance`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from trustmae_lib.errors import TrustMAEError


def smoothing_sigma(size: int) -> float:
    """Gaussian sigma of the map smoothing: 4 px at 256 px, proportional to the image side."""
    return 4.0 * size / 256.0


def smooth(maps: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``(B, 1, H, W)`` maps (reflect padding); ``sigma <= 0`` returns them unchanged."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, min(maps.shape[-2:]) - 1)  # reflect padding needs pad < side
    if radius < 1:
        return maps
    k = 2 * radius + 1
    return TF.gaussian_blur(maps, [k, k], [sigma, sigma])


def _normalise_channels(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit L2 norm over the channels at every location: ``(B, C, h, w)`` -> same."""
    return f / f.norm(dim=1, keepdim=True).clamp_min(eps)


def perceptual_distance_map(
    feats_x: Sequence[Tensor], feats_y: Sequence[Tensor], size: tuple[int, int], weights: Sequence[float]
) -> Tensor:
    """Spatial perceptual distance (unsmoothed).

    Args:
        feats_x: backbone features of the images, one ``(B, C_l, h_l, w_l)`` per layer.
        feats_y: the same layers for the reconstructions.
        size: ``(H, W)`` of the output map.
        weights: one weight per layer (Eq. 12's ``lambda_l``).

    Returns:
        ``(B, 1, H, W)``, zero where the features agree.
    """
    if not (len(feats_x) == len(feats_y) == len(weights)):
        raise TrustMAEError(
            f"perceptual_distance_map: {len(feats_x)}, {len(feats_y)} feature maps and {len(weights)} "
            "weights -- pass one weight per layer"
        )
    return weighted_sum(perceptual_distance_layers(feats_x, feats_y, size), weights)


def weighted_sum(maps: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_l weights[l] * maps[l]``, added shallow to deep -- the one order every scoring of Eq. 12 uses, so that
    re-weighting the per-layer maps with Eq. 12's weights gives :func:`perceptual_distance_map` to the bit."""
    if len(maps) != len(weights):
        raise TrustMAEError(f"weighted_sum: {len(maps)} maps and {len(weights)} weights -- pass one weight per map")
    total = None
    for d, w in zip(maps, weights, strict=True):
        total = w * d if total is None else total + w * d
    return total


def perceptual_distance_layers(
    feats_x: Sequence[Tensor], feats_y: Sequence[Tensor], size: tuple[int, int]
) -> list[Tensor]:
    """The unweighted terms of :func:`perceptual_distance_map`, one ``(B, 1, H, W)`` map per layer, shallow to deep:
    channel-normalised squared feature difference, upsampled (bilinear) to ``size``."""
    if len(feats_x) != len(feats_y):
        raise TrustMAEError(f"perceptual_distance_layers: {len(feats_x)} and {len(feats_y)} feature maps -- pass "
                            "the same backbone layers of both images")  # fmt: skip
    maps = []
    for fx, fy in zip(feats_x, feats_y, strict=True):
        d = (_normalise_channels(fx.float()) - _normalise_channels(fy.float())).pow(2).sum(1, keepdim=True)
        maps.append(F.interpolate(d, size=size, mode="bilinear", align_corners=False))  # (B, 1, H, W)
    return maps


def pixel_distance_map(x: Tensor, recon: Tensor) -> Tensor:
    """*w/o PD*: per-pixel squared distance summed over the colour channels, ``(B, 3, H, W) -> (B, 1, H, W)``."""
    return (x.float() - recon.float()).pow(2).sum(1, keepdim=True)


def global_perceptual_distance(
    feats_x: Sequence[Tensor], feats_y: Sequence[Tensor], weights: Sequence[float]
) -> Tensor:
    """*w/o SP*: per layer, features averaged over locations, channel-normalised, squared distance; weighted sum.

    Returns:
        ``(B,)``.
    """
    total = None
    for fx, fy, w in zip(feats_x, feats_y, weights, strict=True):
        gx = _normalise_channels(fx.float().mean((2, 3), keepdim=True))  # (B, C, 1, 1)
        gy = _normalise_channels(fy.float().mean((2, 3), keepdim=True))
        d = (gx - gy).pow(2).sum((1, 2, 3))
        total = w * d if total is None else total + w * d
    return total
