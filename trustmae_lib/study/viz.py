"""Figures. Every function returns a :class:`matplotlib.figure.Figure`; notebooks display or glue it."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.cm import ScalarMappable
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
    """A grid of images; where a mask is given its outline is drawn in red over the image. A ``None`` image leaves
    its cell empty (to line rows of different lengths up)."""
    n = len(images)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * nrows + 0.3 * (titles is not None)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        if image is None:
            continue
        ax = axes.flat[i]
        ax.imshow(to_display(image), cmap="gray", vmin=0, vmax=1)
        if masks is not None and masks[i] is not None and _mask_array(masks[i]).any():
            ax.contour(_mask_array(masks[i]), levels=[0.5], colors="red", linewidths=0.8)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


#: Font size (points) of the figures laid out for a phone's width (stacked panels, about 4.7 inches wide): a
#: 390-pixel screen shows them at about two thirds of their size.
PHONE_FONT = 12

#: Colour map of every anomaly map in the book (low = blue, high = red); each figure carries its colour bar.
MAP_CMAP = "jet"


def _metric_label(metric: str) -> str:
    """``image_auroc`` -> ``image AUROC``."""
    return metric.replace("_auroc", " AUROC").replace("_", " ")


def _map_axes_off(axes) -> None:
    for ax in np.ravel(axes):
        ax.set_xticks([])
        ax.set_yticks([])


def anomaly_rows(images, masks, recons, anomaly_maps, titles: Sequence[str] | None = None, size: float = 1.8) -> Figure:
    """The standard anomaly figure: per row input, ground-truth mask, reconstruction, anomaly map overlay, and a
    colour bar that gives the anomaly map's scale.

    Args:
        images, recons: (N, 3, H, W) in [-1, 1].
        masks: (N, 1, H, W) in {0, 1} or ``None`` (image-level datasets).
        anomaly_maps: (N, 1, H, W), any scale; one colour scale shared by all rows (the colour bar's).
    """
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(4 * size + 0.9, n * size + 0.3), squeeze=False, layout="constrained")
    maps = torch.as_tensor(anomaly_maps).detach().float().cpu()
    vmin, vmax = float(maps.min()), float(maps.max())
    shown = None
    for i in range(n):
        row = axes[i]
        row[0].imshow(to_display(images[i]))
        if masks is not None:
            row[1].imshow(_mask_array(masks[i]), cmap="gray", vmin=0, vmax=1)
        else:
            row[1].text(0.5, 0.5, "no mask", ha="center", va="center", transform=row[1].transAxes)
        row[2].imshow(to_display(recons[i]))
        row[3].imshow(to_display(images[i]))
        shown = row[3].imshow(_mask_array(maps[i]), cmap=MAP_CMAP, alpha=0.5, vmin=vmin, vmax=vmax)
        if titles is not None:
            row[0].set_ylabel(titles[i], fontsize=8)
    _map_axes_off(axes)
    for ax, name in zip(axes[0], ("input", "ground truth", "reconstruction", "anomaly map"), strict=True):
        ax.set_title(name, fontsize=9)
    if shown is not None:
        # The bar shows the map's colours at full strength (the overlay draws them at half opacity).
        bar = fig.colorbar(ScalarMappable(shown.norm, shown.get_cmap()), ax=axes[:, 3], shrink=min(1.0, 0.5 + 0.1 * n))
        bar.set_label("anomaly map value", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig


def variant_maps(images, masks, maps_by_variant: dict, idx: Sequence[int], size: float = 1.9) -> Figure:
    """Anomaly maps of the same images under several scorings: one column per variant, each on its own colour
    scale (its min to max over the shown images) with its own colour bar below it; the first column is the input
    with the defect outlined in red where a mask is given.

    Args:
        images: (N, 3, H, W) in [-1, 1].
        masks: (N, 1, H, W) in {0, 1} or ``None``.
        maps_by_variant: variant name -> (N, 1, H, W) anomaly maps.
        idx: the images to show (one row each).
    """
    names = list(maps_by_variant)
    idx = list(idx)
    fig, axes = plt.subplots(len(idx), 1 + len(names), figsize=(size * (1 + len(names)), size * len(idx) + 0.6),
                             squeeze=False, layout="constrained")  # fmt: skip
    for r, i in enumerate(idx):
        axes[r, 0].imshow(to_display(images[i]))
        if masks is not None and _mask_array(masks[i]).any():
            axes[r, 0].contour(_mask_array(masks[i]), levels=[0.5], colors="red", linewidths=0.8)
    for c, name in enumerate(names, start=1):
        m = torch.as_tensor(maps_by_variant[name]).detach().float().cpu()[idx]
        vmin, vmax = float(m.min()), float(m.max())
        for r in range(len(idx)):
            im = axes[r, c].imshow(_mask_array(m[r]), cmap=MAP_CMAP, vmin=vmin, vmax=vmax)
        bar = fig.colorbar(im, ax=axes[:, c], location="bottom", shrink=0.9)
        bar.ax.tick_params(labelsize=7)
        bar.set_label(f"{name} map value", fontsize=8)
    _map_axes_off(axes)
    for ax, name in zip(axes[0], ["input (defect outlined)", *names], strict=True):
        ax.set_title(name, fontsize=9)
    return fig


def noise_curves(
    frame, rows, metric: str = "image_auroc", paper: bool = True, size: float = 3.6, ncols: int = 1
) -> Figure:
    """Mean AUROC against noise ratio per row, with the spread over seeds (the band: min to max of the per-seed
    means over categories); with ``paper`` a second panel draws the paper's MVTec AD mean for the same rows.

    The panels are stacked (``ncols=1``, the default) and lettered at a size that stays readable when the figure is
    shrunk to a phone's width; one legend below them serves both (the colours are the same rows).
    """
    from trustmae_lib.study.report import paper_reference, select_rows

    sel = select_rows(frame, rows).dropna(subset=[metric])
    n_panels = 2 if paper else 1
    ncols = max(1, min(ncols, n_panels))
    nrows = int(np.ceil(n_panels / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * 1.3 * ncols, size * 0.85 * nrows + 0.9), squeeze=False,
                             layout="constrained")  # fmt: skip
    panels = list(axes.flat)
    ax = panels[0]
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
    ax.set(xlabel="noise ratio (%)", ylabel=f"{_metric_label(metric)} (%)", title="ours (embedded data)")
    if paper:
        ref = paper_reference(rows)
        ax2 = panels[1]
        for i, row in enumerate(rows):
            part = ref[ref["method"] == row.label] if not ref.empty else ref
            if part.empty:
                continue
            ax2.plot(part["noise"] * 100, part["auc"], marker="s", ls="--", color=colours[i % len(colours)],
                     label=row.label)  # fmt: skip
        ax2.set(xlabel="noise ratio (%)", ylabel="mean image AUC (%)", title="paper (MVTec AD, 15 categories)")
    for a in panels[:n_panels]:
        a.grid(alpha=0.3)
        a.set_xlim(-2, 42)
        a.tick_params(labelsize=PHONE_FONT - 1)
        a.xaxis.label.set_size(PHONE_FONT)
        a.yaxis.label.set_size(PHONE_FONT)
        a.title.set_size(PHONE_FONT)
    for a in panels[n_panels:]:
        a.set_visible(False)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(2, len(labels)), fontsize=PHONE_FONT - 1,
                   frameon=False)  # fmt: skip
    return fig


def protocol_bars(frame, rows, metric: str = "image_auroc", size: float = 3.4) -> Figure:
    """One panel per protocol (``overlap`` first): per row, a bar per noise ratio (mean over seeds of the mean over
    categories) with one dot per seed -- how each method fares clean and noisy when the injected defects are
    (``overlap``) or are never (``disjoint``) the test images."""
    from trustmae_lib.study.report import select_rows

    sel = select_rows(frame, rows).dropna(subset=[metric])
    protocols = sorted(sel["protocol"].unique(), key=lambda p: (p != "overlap", p))  # the paper's protocol first
    noises = sorted(sel["noise"].unique())
    labels = [r.label for r in rows if (sel["row"] == r.label).any()]
    fig, axes = plt.subplots(len(protocols), 1, figsize=(size * 1.7, size * 0.9 * len(protocols) + 0.6),
                             squeeze=False, sharey=True, layout="constrained")  # fmt: skip
    width = 0.8 / max(1, len(noises))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, protocol in zip(axes[:, 0], protocols, strict=True):
        part = sel[sel["protocol"] == protocol]
        for j, noise in enumerate(noises):
            for i, label in enumerate(labels):
                cell = part[(part["row"] == label) & (part["noise"] == noise)]
                if cell.empty:
                    continue
                per_seed = cell.groupby("seed")[metric].mean() * 100
                x = i + (j - (len(noises) - 1) / 2) * width
                ax.bar(x, per_seed.mean(), width * 0.9, color=colours[j % len(colours)], alpha=0.75,
                       label=f"{round(100 * noise)} % noise" if i == 0 else None)  # fmt: skip
                ax.plot([x] * len(per_seed), per_seed, "o", ms=3, color="black", alpha=0.6,
                        label="one seed" if i == 0 and j == 0 else None)  # fmt: skip
        ax.axhline(50, color="grey", lw=0.6, ls=":")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=PHONE_FONT - 2)
        ax.set_ylim(0, 101)  # a memorising detector can fall far below chance
        ax.set_ylabel(f"{_metric_label(metric)} (%)", fontsize=PHONE_FONT - 1)
        ax.set_title(f"{protocol} protocol", fontsize=PHONE_FONT)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=len(names), fontsize=PHONE_FONT - 2,
                   frameon=False)  # fmt: skip
    return fig


def budget_panels(frame, methods: dict, metric: str = "image_auroc", size: float = 3.2) -> Figure:
    """One panel per training budget (``steps``, shortest first) and, where the frame holds several categories, one
    row per category: each method's AUROC against the noise ratio, a thin line per seed (same seed = same noisy split)
    and a thick one through the means over seeds -- how a comparison such as TrustMAE against *w/o TR* changes when
    the same cells are trained longer.

    Args:
        frame: one row per result (e.g. :func:`trustmae_lib.study.report.diagnostics_frame`) with ``method, noise,
            seed, steps`` and ``metric`` (and ``category`` for one row of panels per category).
        methods: method name -> label, in drawing order.
    """
    sel = frame[frame["method"].isin(list(methods))].dropna(subset=[metric])
    budgets = sorted(sel["steps"].unique())
    categories = sorted(sel["category"].unique()) if "category" in sel else [None]
    n_rows, n_cols = max(1, len(categories)), max(1, len(budgets))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols, size * 1.05 * n_rows), squeeze=False,
                             sharey="row", layout="constrained")  # fmt: skip
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, category in zip(axes, categories, strict=False):
        of_category = sel if category is None else sel[sel["category"] == category]
        for ax, steps in zip(row, budgets, strict=False):
            part = of_category[of_category["steps"] == steps]
            noises = sorted(part["noise"].unique())
            for k, (method, label) in enumerate(methods.items()):
                table = part[part["method"] == method].pivot_table(index="seed", columns="noise", values=metric) * 100
                if table.empty:
                    continue
                table = table.reindex(columns=noises)
                x = np.arange(len(noises)) + (k - (len(methods) - 1) / 2) * 0.06  # side by side, not on top
                for _, seed_row in table.iterrows():
                    ax.plot(x, seed_row.to_numpy(), color=colours[k % len(colours)], lw=0.8, alpha=0.35, marker="o",
                            ms=2.5)  # fmt: skip
                ax.plot(x, table.mean().to_numpy(), color=colours[k % len(colours)], lw=2.2, marker="o", ms=5,
                        label=f"{label} (mean of {len(table)} seeds)")  # fmt: skip
            ax.set_xticks(range(len(noises)), [f"{round(100 * n)} %" for n in noises], fontsize=PHONE_FONT - 2)
            ax.set_xlim(-0.4, len(noises) - 0.6)
            ax.set_xlabel("noise ratio", fontsize=PHONE_FONT - 1)
            title = f"{int(steps)} steps"
            ax.set_title(title if len(categories) < 2 else f"{category}, {title}", fontsize=PHONE_FONT)
            ax.grid(axis="y", alpha=0.3)
        row[0].set_ylabel(f"{_metric_label(metric)} (%)", fontsize=PHONE_FONT - 1)
    handles, names = axes[0, -1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside lower center", ncols=len(names), fontsize=PHONE_FONT - 2,
                   frameon=False)  # fmt: skip
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


def paper_comparison(frame, metric: str = "image_auroc", size: float = 3.6, readings: dict | None = None) -> Figure:
    """Chapter 13's comparison with the paper in one figure, panels stacked (readable at a phone's width).

    Top (claims 1 and 2): for each method of Table 4, the AUROC with the cleanest and with the noisiest training
    set -- ours per category (mean over seeds, error bar: std over seeds), the paper's MVTec AD mean at 5 % and 40 %
    in grey -- joined by a line, so the ranking and the loss under noise read off together. Bottom (claim 3):
    TrustMAE minus TrustMAE w/o TR at each noise level, ours per category (paired by seed, error bar: std over
    seeds) beside the paper's gap; above zero the trust region helps. ``readings`` (method -> reading, e.g.
    :data:`trustmae_lib.study.report.STUDY_READINGS`) picks each method's cells; by default the library's.
    """
    from trustmae_lib.config import PAPER_NOISE_RATIOS
    from trustmae_lib.study import report
    from trustmae_lib.study.paper import paper_mean
    from trustmae_lib.study.report import paired_gap, select_rows

    TABLE3_ROWS = report.with_readings(report.TABLE3_ROWS, readings or {})  # noqa: N806 (the module's names)
    TABLE4_ROWS = report.with_readings(report.TABLE4_ROWS, readings or {})  # noqa: N806

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(size * 1.3, size * 2.1 + 0.6), layout="constrained")
    groups = [(f"{d}/{c}", part) for (d, c), part in frame.groupby(["dataset", "category"])]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    n_series = len(groups) + 1
    width = 0.7 / n_series
    sel = select_rows(frame, TABLE4_ROWS).dropna(subset=[metric])
    lo, hi = (sel["noise"].min(), sel["noise"].max()) if len(sel) else (0.0, 0.0)
    for m, row in enumerate(TABLE4_ROWS):
        for g, (name, _) in enumerate(groups):
            part = sel[(sel["row"] == row.label) & (sel["dataset"] + "/" + sel["category"] == name)]
            ends = [part[part["noise"] == n].groupby("seed")[metric].mean() * 100 for n in (lo, hi)]
            if any(e.empty for e in ends):
                continue
            x = m - 0.35 + width * (g + 0.5)
            top.plot([x, x + width * 0.6], [e.mean() for e in ends], color=colours[g % len(colours)], lw=1.2)
            for e, dx, face in ((ends[0], 0.0, "white"), (ends[1], width * 0.6, colours[g % len(colours)])):
                top.errorbar(x + dx, e.mean(), yerr=e.std(ddof=1) if len(e) > 1 else None, fmt="o", ms=5,
                             mfc=face, color=colours[g % len(colours)], capsize=2, lw=0.8)  # fmt: skip
        x = m - 0.35 + width * (len(groups) + 0.5)
        ref = [paper_mean(row.paper, n) for n in (0.05, 0.40)]
        top.plot([x, x + width * 0.6], ref, color="0.45", lw=1.2)
        top.plot([x], [ref[0]], "s", ms=5, mfc="white", color="0.45")
        top.plot([x + width * 0.6], [ref[1]], "s", ms=5, color="0.45")
    top.set_xticks(range(len(TABLE4_ROWS)), [r.label for r in TABLE4_ROWS], fontsize=PHONE_FONT - 1)
    top.set_ylabel("image AUROC (%)", fontsize=PHONE_FONT)
    top.set_title(f"Table 4: open {round(100 * lo)} % noise (paper 5 %),\nfilled {round(100 * hi)} %",
                  fontsize=PHONE_FONT)  # fmt: skip
    handles = [plt.Line2D([], [], color=colours[g % len(colours)], marker="o", label=f"ours, {name}")
               for g, (name, _) in enumerate(groups)]  # fmt: skip
    handles.append(plt.Line2D([], [], color="0.45", marker="s", label="paper, MVTec AD mean"))
    top.legend(handles=handles, fontsize=PHONE_FONT - 2, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2,
               frameon=False)  # fmt: skip
    top.grid(axis="y", alpha=0.3)

    full, no_tr = TABLE3_ROWS[0], TABLE3_ROWS[1]
    for g, (name, part) in enumerate(groups):
        gap = paired_gap(part, full, no_tr, metric)
        if gap.empty:
            continue
        x = gap.index.to_numpy() * 100 + (g - (len(groups) - 1) / 2) * 0.8
        spread = gap.std(axis=1, ddof=1) if gap.shape[1] > 1 else None
        bottom.errorbar(x, gap.mean(axis=1), yerr=spread, marker="o", ms=5, capsize=2, lw=1.2,
                        color=colours[g % len(colours)], label=f"ours, {name}")  # fmt: skip
    paper_gap = [paper_mean(full.paper, n) - paper_mean(no_tr.paper, n) for n in PAPER_NOISE_RATIOS]
    bottom.plot(np.array(PAPER_NOISE_RATIOS) * 100, paper_gap, "s--", ms=5, color="0.45", label="paper, MVTec AD")
    bottom.axhline(0, color="black", lw=0.6)
    bottom.set_xlabel("noise ratio (%)", fontsize=PHONE_FONT)
    bottom.set_ylabel("TrustMAE − w/o TR (points)", fontsize=PHONE_FONT)
    bottom.set_title("Table 3: the trust region's gain\n(above 0: it helps)", fontsize=PHONE_FONT)
    bottom.legend(fontsize=PHONE_FONT - 2)
    bottom.grid(alpha=0.3)
    for ax in (top, bottom):
        ax.tick_params(labelsize=PHONE_FONT - 1)
    return fig
