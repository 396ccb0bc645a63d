"""A PatchCore-style context baseline: nearest-neighbour distance to a bank of pretrained patch features.

Not a method of the paper. It is what a practitioner would try first today (Roth et al., *Towards Total Recall in
Industrial Anomaly Detection*, CVPR 2022), run here under the same data and noise protocol as TrustMAE so that the
book can say where a 2021 reconstruction model stands. No training: the frozen backbone
(:func:`trustmae_lib.model.perceptual.build_backbone`, the run profile's backbone) embeds every training image, and the
bank holds every patch feature of the -- possibly contaminated -- training set.

Patch feature (following PatchCore's recipe on our backbone): the backbone's third and fourth taps (strides 8 and
16 on EfficientNet-Lite0, 4 and 8 on VGG-19), each averaged over its 3x3 neighbourhood, the coarser one
upsampled bilinearly to the finer grid, concatenated over channels. Anomaly map: each test patch's Euclidean
distance to its nearest bank patch, upsampled to the image and smoothed like TrustMAE's maps; image score: the
map's maximum.

Departures from PatchCore, all for a small bank on a CPU: no greedy coreset subsampling (the whole bank is kept: at
the ``cpu`` profile it is about 20 000 patches, so exact search is cheap; at the ``paper`` size with VGG-19 the
bank grows to ~4 000 patches per image and a coreset would be needed), no re-weighting of the image score by
the neighbourhood density. Training-set scores (for the decision threshold) leave the image's own patches out of
the bank, otherwise every training image would score 0.

Example:
    >>> import torch
    >>> bank = PatchBank(torch.randn(2, 4, 3, 3))
    >>> bank.distances(torch.randn(1, 4, 3, 3)).shape
    torch.Size([1, 3, 3])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from trustmae_lib.errors import TrustMAEError
from trustmae_lib.model.distance import smooth, smoothing_sigma

#: Backbone taps (indices into its five feature maps) used for patch features: strides 8 and 16.
TAPS = (2, 3)
#: Queries per distance chunk (bounds the ``queries x bank`` distance matrix).
CHUNK = 4096


def patch_features(backbone, images: Tensor, taps: Sequence[int] = TAPS, batch_size: int = 16) -> Tensor:
    """Locally aware patch features ``(N, D, h, w)`` of ``images: (N, 3, H, W)`` in [-1, 1].

    Each tap is 3x3 average-pooled (stride 1), the later taps are resized to the first tap's grid, and the maps
    are concatenated over channels.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise TrustMAEError(f"patch_features expects images (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    out = []
    with torch.inference_mode():
        for chunk in images.split(batch_size):
            feats = backbone(chunk.float())
            picked = [F.avg_pool2d(feats[t].float(), 3, stride=1, padding=1, count_include_pad=False) for t in taps]
            grid = picked[0].shape[-2:]
            coarse = [F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in picked[1:]]
            picked = [picked[0], *coarse]
            out.append(torch.cat(picked, dim=1))
    return torch.cat(out)


class PatchBank:
    """The memory bank: every patch feature of the training images.

    Args:
        features: ``(N, D, h, w)`` patch features of the ``N`` training images.
    """

    def __init__(self, features: Tensor):
        if features.ndim != 4 or features.shape[0] == 0:
            raise TrustMAEError(f"PatchBank needs features (N, D, h, w) with N >= 1, got {tuple(features.shape)}")
        n, d, h, w = features.shape
        self.bank = features.permute(0, 2, 3, 1).reshape(n * h * w, d).contiguous()  # (N*h*w, D)
        self.owner = torch.arange(n).repeat_interleave(h * w)  # (N*h*w,) image index of each bank row
        self.grid = (h, w)

    def __len__(self) -> int:
        return self.bank.shape[0]

    def distances(self, features: Tensor, exclude: Tensor | None = None) -> Tensor:
        """Distance of each patch of ``features: (B, D, h, w)`` to its nearest bank patch -> ``(B, h, w)``.

        Args:
            exclude: optional ``(B,)`` bank image index per query image whose patches are left out (training
                images scored against the others).
        """
        b, d, h, w = features.shape
        if d != self.bank.shape[1]:
            raise TrustMAEError(f"patch features have {d} channels, the bank {self.bank.shape[1]}; use one backbone")
        queries = features.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
        query_image = torch.arange(b).repeat_interleave(h * w)
        out = torch.empty(queries.shape[0])
        for start in range(0, queries.shape[0], CHUNK):
            q = queries[start : start + CHUNK]
            dist = torch.cdist(q, self.bank)  # (chunk, bank)
            if exclude is not None:
                own = exclude[query_image[start : start + CHUNK]]  # (chunk,)
                dist = dist.masked_fill(own[:, None] == self.owner[None, :], float("inf"))
            out[start : start + CHUNK] = dist.min(dim=1).values
        return out.reshape(b, h, w)


def anomaly_maps(distances: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``(B, h, w)`` patch distances -> smoothed ``(B, 1, size, size)`` maps and ``(B,)`` image scores (max)."""

    maps = F.interpolate(distances[:, None], size=(size, size), mode="bilinear", align_corners=False)
    maps = smooth(maps, smoothing_sigma(size))
    return maps, maps.amax((1, 2, 3))
