"""Figures. Every function returns a :class:`matplotlib.figure.Figure`; notebooks display or glue it."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure


def to_display(image) -> np.ndarray:
    """(3, H, W) tensor in [-1, 1] or (H, W, 3) uint8 -> (H, W, 3) float in [0, 1] for ``imshow``."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        array = ((image + 1) / 2).clamp(0, 1).numpy()
    else:
        array = np.asarray(image)
        array = array / 255.0 if array.dtype == np.uint8 else array
    return array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array


def _mask_array(mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().float().cpu().numpy()
    mask = np.asarray(mask, dtype=float)
    return mask.reshape(mask.shape[-2:])


def image_grid(
    images: Sequence,
    titles: Sequence[str] | None = None,
    masks: Sequence | None = None,
    ncols: int = 6,
    size: float = 1.6,
) -> Figure:
    """A grid of images; where a mask is given its outline is drawn in red over the image."""
    n = len(images)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * nrows + 0.3 * (titles is not None)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(to_display(image), cmap="gray", vmin=0, vmax=1)
        if masks is not None and masks[i] is not None and _mask_array(masks[i]).any():
            ax.contour(_mask_array(masks[i]), levels=[0.5], colors="red", linewidths=0.8)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def anomaly_rows(
    images, masks, recons, anomaly_maps, titles: Sequence[str] | None = None, size: float = 1.8
) -> Figure:
    """The standard anomaly figure: per row input, ground-truth mask, reconstruction, anomaly map overlay.

    Args:
        images, recons: (N, 3, H, W) in [-1, 1].
        masks: (N, 1, H, W) in {0, 1} or ``None`` (image-level datasets).
        anomaly_maps: (N, 1, H, W), any scale; one colour scale shared by all rows.
    """
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(4 * size, n * size), squeeze=False)
    maps = torch.as_tensor(anomaly_maps).detach().float().cpu()
    vmin, vmax = float(maps.min()), float(maps.max())
    for i in range(n):
        row = axes[i]
        row[0].imshow(to_display(images[i]))
        if masks is not None:
            row[1].imshow(_mask_array(masks[i]), cmap="gray", vmin=0, vmax=1)
        else:
            row[1].text(0.5, 0.5, "no mask", ha="center", va="center", transform=row[1].transAxes)
        row[2].imshow(to_display(recons[i]))
        row[3].imshow(to_display(images[i]))
        row[3].imshow(_mask_array(maps[i]), cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
        if titles is not None:
            row[0].set_ylabel(titles[i], fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, name in zip(axes[0], ("input", "ground truth", "reconstruction", "anomaly map"), strict=True):
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    return fig
