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


def anomaly_rows(images, masks, recons, anomaly_maps, titles: Sequence[str] | None = None, size: float = 1.8) -> Figure:
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


def noise_curves(frame, rows, metric: str = "image_auroc", paper: bool = True, size: float = 3.6) -> Figure:
    """Mean AUROC against noise ratio per row, with the spread over seeds (the band: min to max of the per-seed
    means over categories); with ``paper`` a second panel draws the paper's MVTec AD mean for the same rows."""
    from trustmae_lib.study.report import paper_reference, select_rows

    sel = select_rows(frame, rows).dropna(subset=[metric])
    ncols = 2 if paper else 1
    fig, axes = plt.subplots(1, ncols, figsize=(size * 1.3 * ncols, size), squeeze=False)
    ax = axes[0, 0]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(rows):
        part = sel[sel["row"] == row.label]
        if part.empty:
            continue
        per_seed = part.groupby(["noise", "seed"])[metric].mean().unstack("seed") * 100
        x = per_seed.index.to_numpy() * 100
        colour = colours[i % len(colours)]
        ax.plot(x, per_seed.mean(axis=1), marker="o", color=colour, label=row.label)
        ax.fill_between(x, per_seed.min(axis=1), per_seed.max(axis=1), color=colour, alpha=0.15)
    ax.set(xlabel="noise ratio (%)", ylabel=f"{metric.replace('_', ' ')} (%)", title="ours (embedded data)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if paper:
        ref = paper_reference(rows)
        ax2 = axes[0, 1]
        for i, row in enumerate(rows):
            part = ref[ref["method"] == row.label] if not ref.empty else ref
            if part.empty:
                continue
            ax2.plot(part["noise"] * 100, part["auc"], marker="s", ls="--", color=colours[i % len(colours)],
                     label=row.label)  # fmt: skip
        ax2.set(xlabel="noise ratio (%)", ylabel="mean image AUC (%)", title="paper (MVTec AD, 15 categories)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def drop_bars(drops, size: float = 3.6) -> Figure:
    """Bars of the AUROC drop from the cleanest to the noisiest setting per method (ours, with the seed std), beside
    the paper's drop from 5 % to 40 % where it has one (:func:`trustmae_lib.study.report.drop_table`)."""
    fig, ax = plt.subplots(figsize=(size * 1.6, size))
    x = np.arange(len(drops))
    ax.bar(x - 0.2, drops["drop"], 0.4, yerr=drops["drop std"], capsize=3, label="ours (points of AUROC)")
    paper = drops["paper drop 5→40 %"].astype(float)
    ax.bar(x + 0.2, paper.fillna(0.0), 0.4, label="paper, 5 → 40 % (MVTec AD mean)", alpha=0.7)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, drops["method"], rotation=20, ha="right", fontsize=8)
    lo, hi = int(drops["clean %"].min()), int(drops["noisy %"].max())
    ax.set(ylabel="AUROC drop (points)", title=f"drop from {lo} % to {hi} % noise (higher = less robust)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def auroc_heatmap(frame, rows, metric: str = "image_auroc", size: float = 0.9) -> Figure:
    """Rows x (category, noise) heat map of the mean AUROC over seeds, values written in the cells."""
    from trustmae_lib.study.report import select_rows

    sel = select_rows(frame, rows).dropna(subset=[metric])
    sel["column"] = sel["category"] + " " + (sel["noise"] * 100).round().astype(int).astype(str) + "%"
    order = sel.sort_values(["category", "noise"])["column"].unique()
    table = sel.groupby(["row", "column"], observed=True)[metric].mean().unstack("column").reindex(columns=order) * 100
    fig, ax = plt.subplots(figsize=(max(4.0, size * len(order) + 2), max(2.0, 0.45 * len(table) + 1)))
    im = ax.imshow(table.to_numpy(), cmap="viridis", vmin=max(0, np.nanmin(table.to_numpy()) - 5), vmax=100)
    for (i, j), v in np.ndenumerate(table.to_numpy()):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 80 else "black")
    ax.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(table)), table.index, fontsize=8)
    fig.colorbar(im, ax=ax, label=f"{metric.replace('_', ' ')} (%)", shrink=0.8)
    fig.tight_layout()
    return fig


def reading_gaps(table, size: float = 3.6) -> Figure:
    """TrustMAE minus w/o TR per alternative reading: one dot per seed, a bar for the mean
    (:func:`trustmae_lib.study.report.readings_table`); above zero the trust region helps."""
    fig, ax = plt.subplots(figsize=(size * 1.6, size))
    several = table["noise %"].nunique() > 1
    labels = [f"{r} ({n} %)" if several else r for r, n in zip(table["reading"], table["noise %"], strict=True)]
    x = np.arange(len(table))
    ax.bar(x, table["gap"], 0.6, alpha=0.35, label="mean over seeds")
    for i, seeds in enumerate(table["per seed"]):
        ax.plot([i] * len(seeds), seeds, "o", color="C0", ms=4, label="one seed" if i == 0 else None)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="TrustMAE − w/o TR (AUROC points)", title="does the trust region help? (above 0: yes)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
