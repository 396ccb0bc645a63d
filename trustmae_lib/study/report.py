"""Noise-study tables, figures and claim checks from sweep result files (chapters 11-13).

Every number here comes from the JSON result files a sweep wrote (:func:`trustmae_lib.study.sweep.collect`); each
table keeps the names of the files it was computed from, so a chapter can say where its numbers came from.

Rows follow the supplement: Table 3 (ablations -- TrustMAE with and without the trust region, scored with and
without the perceptual distance and its spatial map) and Table 4 (baselines). The scoring ablations come from the
same trained networks (:mod:`trustmae_lib.engine.evaluate` variants), not from retraining.

Example:
    >>> [r.label for r in TABLE4_ROWS][:2]
    ['AE-L2', 'AE-SSIM']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from trustmae_lib.config import PAPER_NOISE_RATIOS
from trustmae_lib.errors import TrustMAEError

__all__ = [
    "Row",
    "TABLE3_ROWS",
    "TABLE4_ROWS",
    "CONTEXT_ROWS",
    "STUDY_READINGS",
    "MEMAE_TWIN_ROW",
    "MIN_SEEDS",
    "with_readings",
    "results_frame",
    "select_rows",
    "results_table",
    "drop_table",
    "paper_reference",
    "noise_change",
    "paired_gap",
    "claims",
    "readings_table",
    "mean_ci",
    "ci_verdict",
    "diagnostics_frame",
    "memory_study_table",
]

#: Fewest seeds behind a comparison for a verdict: with fewer, the spread over seeds is no yardstick (one seed has
#: none, two give a standard deviation from a single difference), and the verdict is ``"too few seeds"``.
MIN_SEEDS = 3


@dataclass(frozen=True)
class Row:
    """One table row: a trained method scored with one variant; ``paper`` names the paper's row (or ``None``)."""

    label: str
    method: str
    variant: str
    paper: str | None
    paper_table: str | None = None
    reading: str = ""  # "" = the library's reading (config.READINGS names the alternatives)


TABLE3_ROWS = (
    Row("TrustMAE", "trustmae", "perceptual", "ours", "table3"),
    Row("w/o TR", "trustmae_no_tr", "perceptual", "ours w/o TR", "table3"),
    Row("w/o PD", "trustmae", "pixel", "ours w/o PD", "table3"),
    Row("w/o SP", "trustmae", "global", "ours w/o SP", "table3"),
    Row("w/o PD w/o TR", "trustmae_no_tr", "pixel", "ours w/o PD w/o TR", "table3"),
)
TABLE4_ROWS = (
    Row("AE-L2", "ae_l2", "residual", "AE-MSE", "table4"),
    Row("AE-SSIM", "ae_ssim", "residual", "AE-SSIM", "table4"),
    Row("MemAE", "memae", "residual", "MemAE", "table4"),
    Row("TrustMAE", "trustmae", "perceptual", "Ours", "table4"),
)
#: Not in the paper: the PatchCore-style context baseline (:mod:`trustmae_lib.model.patchcore`).
CONTEXT_ROWS = (Row("PatchCore-style (context)", "patchcore", "patch_knn", None),)

#: The readings (``config.READINGS``) the core noise study trains each method with (``configs/sweep_cpu_core*.yaml``):
#: TrustMAE and w/o TR with the learned memory of chapter 4, MemAE with the shrinkage threshold 2/M at Adam lr 2e-3
#: (chapter 13: it converges within the study's 300 steps).
STUDY_READINGS = {"trustmae": "ema", "trustmae_no_tr": "ema", "memae": "shrink2m_lr2e3"}
#: Not in the paper: MemAE's encoder and decoder without the memory, trained as the core study's MemAE -- the twin
#: that says what MemAE's memory adds.
MEMAE_TWIN_ROW = Row("MemAE w/o memory", "memae", "residual", None, reading="nomem_lr2e3")


def with_readings(rows: Sequence[Row], readings: dict | None = None) -> tuple[Row, ...]:
    """``rows`` with each method's reading from ``readings`` (method -> reading; default :data:`STUDY_READINGS`).

    The table functions select a row's cells by method, variant *and* reading, so the same row labels read the core
    study's files: ``results_table(frame, with_readings(TABLE4_ROWS))``. Methods not in ``readings`` keep theirs.
    """
    readings = STUDY_READINGS if readings is None else readings
    return tuple(dataclasses.replace(r, reading=readings.get(r.method, r.reading)) for r in rows)


def results_frame(results: Iterable[dict]) -> pd.DataFrame:
    """One row per (result file, scoring variant) with the metrics and the provenance needed for tables.

    Columns: ``dataset, category, noise, protocol, method, reading, variant, seed, image_auroc, pixel_auroc, f1,
    precision, recall, train_wall_s, eval_wall_s, steps, backbone, profile, config_hash, file``.
    """
    rows = []
    for res in results:
        for variant, m in res.get("metrics", {}).items():
            rows.append(
                {
                    "dataset": str(res.get("dataset")).rstrip("/").split("/")[-1],
                    "category": res.get("category"),
                    "noise": float(res.get("noise_ratio", 0.0)),
                    "protocol": res.get("protocol", "overlap"),
                    "method": res.get("method"),
                    "reading": res.get("reading") or "",
                    "variant": variant,
                    "seed": int(res.get("seed", 0)),
                    "image_auroc": m.get("image_auroc"),
                    "pixel_auroc": m.get("pixel_auroc"),
                    "f1": m.get("f1"),
                    "precision": m.get("precision"),
                    "recall": m.get("recall"),
                    "train_wall_s": res.get("train_wall_s"),
                    "eval_wall_s": res.get("eval_wall_s"),
                    "steps": res.get("steps"),
                    "backbone": res.get("backbone"),
                    "profile": res.get("profile"),
                    "config_hash": res.get("config_hash"),
                    "file": res.get("file", ""),
                }
            )
    columns = ["dataset", "category", "noise", "protocol", "method", "reading", "variant", "seed", "image_auroc",
               "pixel_auroc", "f1", "precision", "recall", "train_wall_s", "eval_wall_s", "steps", "backbone",
               "profile", "config_hash", "file"]  # fmt: skip
    frame = pd.DataFrame(rows, columns=columns)
    for col in ("image_auroc", "pixel_auroc", "f1", "precision", "recall"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def select_rows(frame: pd.DataFrame, rows: Sequence[Row]) -> pd.DataFrame:
    """The entries of ``frame`` that belong to ``rows``, with the row label in column ``row`` (in row order)."""
    parts = []
    for row in rows:
        keep = (frame["method"] == row.method) & (frame["variant"] == row.variant) & (frame["reading"] == row.reading)
        part = frame[keep].copy()
        part["row"] = row.label
        parts.append(part)
    if not parts:
        raise TrustMAEError("select_rows needs at least one row")
    out = pd.concat(parts, ignore_index=True)
    out["row"] = pd.Categorical(out["row"], categories=[r.label for r in rows], ordered=True)
    return out


def _seed_std(values) -> float:
    """Sample standard deviation (``ddof=1``) of per-seed values; 0.0 for fewer than two (no spread to measure)."""
    values = pd.Series(values, dtype=float).dropna()
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _fmt_seeds(values) -> str:
    """``mean ± std`` over per-seed values, in percent (the mean alone for one value)."""
    values = pd.Series(values, dtype=float).dropna()
    return _fmt(values.mean(), _seed_std(values), len(values))


def _fmt(mean: float, std: float, n: int) -> str:
    if np.isnan(mean):
        return "--"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def results_table(
    frame: pd.DataFrame, rows: Sequence[Row], metric: str = "image_auroc", with_paper: bool = True
) -> pd.DataFrame:
    """Our results in the shape of Tables 3 / 4: one row per (method row, noise %), columns ``mean`` and one per
    ``dataset/category``.

    Cells are ``mean ± std`` over seeds in percent; ``mean`` is the mean over categories of the per-seed values
    averaged over categories (its ± is the spread of that average over seeds). With ``with_paper`` a column
    ``paper mean (MVTec AD)`` gives the paper's mean over its 15 categories for the same method and noise -- the
    reference *trend*, not a like-for-like number (different data, backbone, size and training).
    """
    from trustmae_lib.study.paper import paper_mean

    sel = select_rows(frame, rows).dropna(subset=[metric])
    sel["column"] = sel["dataset"] + "/" + sel["category"]
    columns = sorted(sel["column"].unique())
    out = []
    for row in rows:
        part = sel[sel["row"] == row.label]
        for noise in sorted(part["noise"].unique()):
            cell = part[part["noise"] == noise]
            entry = {"method": row.label, "noise %": int(round(100 * noise))}
            per_seed = cell.groupby("seed")[metric].mean()
            entry["mean"] = _fmt_seeds(per_seed)
            for col in columns:
                entry[col] = _fmt_seeds(cell[cell["column"] == col][metric])
            if with_paper:
                ref = None
                if row.paper is not None:
                    try:
                        ref = paper_mean(row.paper, noise)
                    except TrustMAEError:
                        ref = None
                entry["paper mean (MVTec AD)"] = "--" if ref is None else f"{ref:.1f}"
            out.append(entry)
    return pd.DataFrame(out)


def drop_table(frame: pd.DataFrame, rows: Sequence[Row], metric: str = "image_auroc") -> pd.DataFrame:
    """Per row: mean AUROC (percent) at the cleanest and the noisiest ratio, their difference ``drop`` (clean -
    noisy, over seeds and categories; ``drop std`` = std over seeds), the number of ``seeds`` present at both ratios
    and the paper's drop from 5 % to 40 % for the same row."""
    from trustmae_lib.study.paper import paper_mean

    sel = select_rows(frame, rows).dropna(subset=[metric])
    out = []
    for row in rows:
        part = sel[sel["row"] == row.label]
        if part.empty:
            continue
        lo, hi = part["noise"].min(), part["noise"].max()
        clean = part[part["noise"] == lo].groupby("seed")[metric].mean()
        noisy = part[part["noise"] == hi].groupby("seed")[metric].mean()
        both = clean.index.intersection(noisy.index)
        diff = (clean[both] - noisy[both]) * 100
        paper = None
        if row.paper is not None:
            try:
                paper = paper_mean(row.paper, 0.05) - paper_mean(row.paper, 0.40)
            except TrustMAEError:
                paper = None
        out.append(
            {
                "method": row.label,
                "clean %": int(round(100 * lo)),
                "noisy %": int(round(100 * hi)),
                "AUROC clean": round(100 * clean.mean(), 1),
                "AUROC noisy": round(100 * noisy.mean(), 1),
                "drop": round(diff.mean(), 1),
                "drop std": round(_seed_std(diff), 1),
                "seeds": len(diff),
                "paper drop 5→40 %": None if paper is None else round(paper, 2),
            }
        )
    columns = ["method", "clean %", "noisy %", "AUROC clean", "AUROC noisy", "drop", "drop std", "seeds",
               "paper drop 5→40 %"]  # fmt: skip
    return pd.DataFrame(out, columns=columns)


def paper_reference(rows: Sequence[Row], noises: Sequence[float] = PAPER_NOISE_RATIOS) -> pd.DataFrame:
    """The paper's mean AUC (percent) for ``rows`` at ``noises`` (default: the paper's noise levels,
    :data:`trustmae_lib.config.PAPER_NOISE_RATIOS`): columns ``method, noise, auc``."""
    from trustmae_lib.study.paper import paper_mean

    out = []
    for row in rows:
        if row.paper is None:
            continue
        for noise in noises:
            out.append({"method": row.label, "noise": noise, "auc": paper_mean(row.paper, noise)})
    return pd.DataFrame(out)


def _means(frame: pd.DataFrame, row: Row, metric: str) -> pd.DataFrame:
    """``(noise, seed) -> mean over categories`` of one row."""
    part = select_rows(frame, [row]).dropna(subset=[metric])
    return part.groupby(["noise", "seed"])[metric].mean().unstack("seed")


def paired_gap(frame: pd.DataFrame, a: Row, b: Row, metric: str = "image_auroc") -> pd.DataFrame:
    """Row ``a`` minus row ``b`` in points, paired by seed: ``(noise, seed)``, each the mean over categories.

    Only the noise ratios and seeds both rows have are kept (same seed = same noisy split). Example: the margins of
    claim 1 are ``paired_gap(frame, TABLE4_ROWS[3], base)`` for each baseline row ``base``.
    """
    ma, mb = _means(frame, a, metric), _means(frame, b, metric)
    common_noise = ma.index.intersection(mb.index)
    common_seed = ma.columns.intersection(mb.columns)
    return (ma.loc[common_noise, common_seed] - mb.loc[common_noise, common_seed]) * 100


def _verdict(effect: float, spread: float, n_seeds: int) -> str:
    """``too few seeds`` below :data:`MIN_SEEDS` seeds; else ``holds`` when ``effect`` exceeds the seed spread,
    ``fails`` when it is below minus it, and ``inconclusive`` in between."""
    if n_seeds < MIN_SEEDS:
        return "too few seeds"
    if effect > spread:
        return "holds"
    return "fails" if effect < -spread else "inconclusive"


def _overall(verdicts: Sequence[str]) -> str:
    """One verdict for a claim made of several comparisons: ``fails`` if any fails, ``holds`` if all hold,
    ``inconclusive`` if any judged comparison is inside its spread, else ``too few seeds``."""
    if not verdicts:
        return "not tested"
    if "fails" in verdicts:
        return "fails"
    if all(v == "holds" for v in verdicts):
        return "holds"
    return "inconclusive" if "inconclusive" in verdicts else "too few seeds"


def claims(frame: pd.DataFrame, metric: str = "image_auroc", readings: dict | None = None) -> list[dict]:
    """Check the supplement's three claims on ``frame``; each entry has ``claim, paper, ours, verdict``.

    Every signed number in ``ours`` is a difference of AUROC points, first term minus second, so ``+`` always means
    the first is higher: TrustMAE − baseline (claim 1), AUROC at the noisiest − at the cleanest setting (claim 2: a
    loss is negative) and TrustMAE − w/o TR (claim 3). ``±`` is the standard deviation over seeds of that difference.

    A difference counts only when it exceeds the seed spread: ``|mean difference| > std over seeds of the
    per-seed difference`` (so one lucky seed does not make a verdict), and only when at least :data:`MIN_SEEDS`
    seeds back it. Verdicts: ``holds`` (the effect is there, beyond the spread), ``fails`` (the opposite effect,
    beyond the spread), ``inconclusive`` (inside the spread), ``too few seeds`` (fewer than :data:`MIN_SEEDS`), or
    ``not tested`` when the rows are missing.

    ``readings`` (method -> reading, e.g. :data:`STUDY_READINGS`) picks the cells of each method; by default the
    library's reading of every method.
    """
    from trustmae_lib.study.paper import paper_mean

    table3, table4 = with_readings(TABLE3_ROWS, readings or {}), with_readings(TABLE4_ROWS, readings or {})
    full, no_tr = table3[0], table3[1]
    memae, ae_ssim, ae_l2 = table4[2], table4[1], table4[0]
    out = []

    # 1. TrustMAE beats every baseline at every noise level.
    verdicts, notes = [], []
    for base in (memae, ae_ssim, ae_l2):
        d = paired_gap(frame, full, base, metric)
        if d.empty:
            continue
        for noise, seeds in d.iterrows():
            m, s = seeds.mean(), _seed_std(seeds)
            verdicts.append(_verdict(m, s, seeds.count()))
            notes.append(f"TrustMAE − {base.label} at {round(100 * noise)} %: {m:+.1f} ± {s:.1f}")
    out.append(
        {
            "claim": "TrustMAE beats MemAE, AE-SSIM and AE-L2 at every noise level",
            "paper": "Table 4: higher mean AUC than all three at every noise level, 5-40 %",
            "ours": "; ".join(notes) if notes else "rows missing",
            "verdict": _overall(verdicts),
        }
    )

    # 2. TrustMAE loses less than MemAE from the cleanest to the noisiest setting.
    drops = drop_table(frame, [full, memae], metric).set_index("method")
    if {full.label, memae.label} <= set(drops.index):
        a, b = drops.loc[full.label], drops.loc[memae.label]
        ours = (  # a change: noisiest minus cleanest, so a loss is negative (drop_table's ``drop`` is its opposite)
            f"AUROC at {int(a['noisy %'])} % − at {int(a['clean %'])} %: TrustMAE {-a['drop']:+.1f} ± "
            f"{a['drop std']:.1f}, MemAE {-b['drop']:+.1f} ± {b['drop std']:.1f}"
        )
        n_seeds = min(int(a["seeds"]), int(b["seeds"]))
        verdict = _verdict(b["drop"] - a["drop"], max(a["drop std"], b["drop std"]), n_seeds)
    else:
        ours, verdict = "rows missing", "not tested"
    out.append(
        {
            "claim": "TrustMAE loses about 2.5 points of mean AUC from 5 % to 40 % noise, MemAE about 5",
            "paper": (
                f"Table 4 mean AUC, 5 → 40 %: TrustMAE {paper_mean('Ours', 0.05)} → {paper_mean('Ours', 0.4)} "
                f"({paper_mean('Ours', 0.4) - paper_mean('Ours', 0.05):+.2f}), MemAE {paper_mean('MemAE', 0.05)} → "
                f"{paper_mean('MemAE', 0.4)} ({paper_mean('MemAE', 0.4) - paper_mean('MemAE', 0.05):+.2f})"
            ),
            "ours": ours,
            "verdict": verdict,
        }
    )

    # 3. The trust region matters most at high noise.
    d = paired_gap(frame, full, no_tr, metric)
    if len(d.index) >= 2:
        lo, hi = d.index.min(), d.index.max()
        m_lo, m_hi = d.loc[lo].mean(), d.loc[hi].mean()
        s_hi = _seed_std(d.loc[hi])
        ours = f"TrustMAE − w/o TR: {m_lo:+.1f} at {round(100 * lo)} %, {m_hi:+.1f} ± {s_hi:.1f} at {round(100 * hi)} %"
        verdict = _verdict(m_hi, s_hi, d.loc[hi].count())
        if verdict == "holds" and m_hi <= m_lo:  # a gap, but not one that opens with noise
            verdict = "inconclusive"
    else:
        ours, verdict = "rows missing", "not tested"
    out.append(
        {
            "claim": "The trust region matters most at high noise",
            "paper": (
                f"Table 3 mean AUC: w/o TR {paper_mean('ours w/o TR', 0.05)} vs TrustMAE {paper_mean('ours', 0.05)} "
                f"at 5 %, {paper_mean('ours w/o TR', 0.4)} vs {paper_mean('ours', 0.4)} at 40 %"
            ),
            "ours": ours,
            "verdict": verdict,
        }
    )
    return out


def readings_table(frame: pd.DataFrame, metric: str = "image_auroc") -> pd.DataFrame:
    """The trust region under each alternative reading (chapter 12): TrustMAE vs w/o TR, paired by seed.

    One row per (noise ratio, TrustMAE reading) in ``frame``: TrustMAE's AUROC (percent, mean ± std over seeds),
    the w/o TR network it is compared with -- the same reading when ``frame`` has it (readings that change the
    memory, e.g. ``m512``), else the default one (readings of the trust region itself change nothing without
    one) -- the paired difference ``gap`` (mean and std over seeds, in points; ``per seed`` lists it) and its verdict
    (:func:`claims`' rule: ``holds`` = the trust region helps beyond the seed spread; ``too few seeds`` below
    :data:`MIN_SEEDS` paired seeds, where the spread is no yardstick).
    """
    from trustmae_lib.config import READINGS

    scored = frame[frame["variant"] == "perceptual"].dropna(subset=[metric])
    full = scored[scored["method"] == "trustmae"]
    no_tr = scored[scored["method"] == "trustmae_no_tr"]
    out = []
    for (noise, reading), part in full.groupby(["noise", "reading"], sort=True):
        mine = no_tr[(no_tr["noise"] == noise) & (no_tr["reading"] == reading)]
        against = reading if len(mine) else ""
        if not len(mine):
            mine = no_tr[(no_tr["noise"] == noise) & (no_tr["reading"] == "")]
        a = part.groupby("seed")[metric].mean()
        b = mine.groupby("seed")[metric].mean()
        seeds = a.index.intersection(b.index)
        gap = (a[seeds] - b[seeds]) * 100
        spread = _seed_std(gap)
        out.append(
            {
                "noise %": int(round(100 * noise)),
                "reading": reading or "literal",
                "what it changes": READINGS[reading]["why"] if reading else "the supplement-literal memory (chapter 3)",
                "TrustMAE": _fmt_seeds(a),
                "w/o TR": f"{_fmt_seeds(b)} ({against or 'literal'})" if len(b) else "--",
                "gap": round(gap.mean(), 1) if len(gap) else np.nan,
                "gap std": round(spread, 1) if len(gap) else np.nan,
                "per seed": tuple(round(float(v), 1) for v in gap),
                "verdict": _verdict(gap.mean(), spread, len(gap)),
            }
        )
    return pd.DataFrame(out)


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float, int]:
    """Mean of per-seed values (e.g. paired differences) and its Student-t confidence interval.

    Returns:
        ``(mean, low, high, n)``; with fewer than two values the interval is ``(nan, nan)``.
    """
    from scipy import stats

    values = pd.Series(values, dtype=float).dropna()
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(values.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), n
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1) / np.sqrt(n))
    return mean, mean - half, mean + half, n


def noise_change(frame: pd.DataFrame, low: float = 0.0, high: float = 0.4, metric: str = "image_auroc") -> pd.Series:
    """Claim 2's change per seed: ``metric`` at noise ``high`` minus at ``low``, in points, on the mean over the
    frame's categories (``dataset/category``; filter the frame to one method and reading first).

    Paired by seed (same seed = same noisy split); a seed that lacks a category at either level is left out, so that
    every value averages the same categories. Feed the result (or a difference of two) to :func:`mean_ci`.
    """
    part = frame.dropna(subset=[metric])
    part = part[part["noise"].isin([low, high])]
    if part.empty or set(part["noise"]) != {low, high}:
        raise TrustMAEError(f"noise_change needs results at noise {low} and {high}: found {sorted(set(part['noise']))}")
    column = part["dataset"] + "/" + part["category"] if "dataset" in part else part["category"]
    wide = part.assign(column=column).pivot_table(index="seed", columns=["noise", "column"], values=metric)
    wide = wide.reindex(columns=pd.MultiIndex.from_product([[low, high], sorted(set(column))])).dropna()
    return (wide[high].mean(axis=1) - wide[low].mean(axis=1)) * 100


def ci_verdict(low: float, high: float, n: int) -> str:
    """``too few seeds`` below :data:`MIN_SEEDS`; else ``holds`` when the whole interval is above 0, ``fails`` when it
    is below 0, ``inconclusive`` when it contains 0."""
    if n < MIN_SEEDS:
        return "too few seeds"
    if low > 0:
        return "holds"
    return "fails" if high < 0 else "inconclusive"


def diagnostics_frame(results: Iterable[dict]) -> pd.DataFrame:
    """One row per result file with the mechanism diagnostics (:mod:`trustmae_lib.engine.diagnostics`) beside the
    primary variant's image AUROC: ``dataset, category, protocol, method, reading, noise, seed, steps, image_auroc,
    slot_movement, perplexity, used_slots, captured_fraction, defect_share, untrusted_fraction,
    untrusted_precision, untrusted_recall, l1_good, diversity, platform, file`` (``NaN`` where a file has no such
    diagnostic). A noisy training set without a single defect location has no defect masks (``elpv`` labels whole
    images): its ``captured_fraction``, ``defect_share`` and ``untrusted_*`` are unknown, so ``NaN``, not 0."""
    rows = []
    for res in results:
        d = res.get("diagnostics") or {}
        mem, trust, rec = d.get("memory") or {}, d.get("trust") or {}, d.get("reconstruction") or {}
        rows.append(
            {
                "dataset": str(res.get("dataset")).rstrip("/").split("/")[-1],
                "category": res.get("category"),
                "protocol": res.get("protocol", "overlap"),
                "method": res.get("method"),
                "reading": res.get("reading") or "",
                "noise": float(res.get("noise_ratio", 0.0)),
                "seed": int(res.get("seed", 0)),
                "steps": int(res.get("steps", 0)),
                "image_auroc": res.get("image_auroc"),
                "slot_movement": mem.get("slot_movement"),
                "perplexity": mem.get("perplexity"),
                "used_slots": mem.get("used_slots"),
                "captured_fraction": mem.get("captured_fraction"),
                "defect_share": mem["defect_locations"] / mem["locations"] if mem.get("locations") else None,
                "untrusted_fraction": trust.get("untrusted_fraction"),
                "untrusted_precision": trust.get("untrusted_precision"),
                "untrusted_recall": trust.get("untrusted_recall"),
                "l1_good": rec.get("l1_good"),
                "diversity": rec.get("diversity"),
                "platform": (res.get("platform") or {}).get("cpu"),
                "file": res.get("file", ""),
            }
        )
    frame = pd.DataFrame(rows)
    if len(frame):
        unmasked = (frame["noise"] > 0) & (frame["defect_share"].fillna(0) == 0)
        frame.loc[unmasked, ["captured_fraction", "defect_share", "untrusted_precision", "untrusted_recall"]] = None
    numeric = ["image_auroc", "slot_movement", "perplexity", "used_slots", "captured_fraction", "defect_share",
               "untrusted_fraction", "untrusted_precision", "untrusted_recall", "l1_good", "diversity"]  # fmt: skip
    for col in numeric:
        if col in frame:
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def memory_study_table(frame: pd.DataFrame, reading: str, level: float = 0.95) -> pd.DataFrame:
    """Claims 2 and 3 per category and protocol for TrustMAE and w/o TR under one ``reading`` (chapter 4, 13).

    ``frame`` is :func:`diagnostics_frame` (or any frame with ``dataset, category, protocol, method, reading, noise,
    seed, image_auroc``). One row per (``dataset/category``, protocol) plus a ``mean`` row per protocol (per seed,
    the mean over categories): TrustMAE's image AUROC clean and at the noisiest ratio and w/o TR's at the noisiest
    (percent, mean over seeds), then two paired differences in points with their ``level`` t-intervals and
    :func:`ci_verdict` -- ``change`` = TrustMAE noisy − clean, paired by seed (claim 2: a small loss), and ``gap`` =
    TrustMAE − w/o TR at the noisiest ratio, paired by seed (claim 3: positive).
    """
    part = frame[frame["reading"] == reading].dropna(subset=["image_auroc"]).copy()
    if part.empty:
        raise TrustMAEError(f"no results with reading '{reading}' to tabulate")
    part["column"] = part["dataset"] + "/" + part["category"]
    lo, hi = part["noise"].min(), part["noise"].max()

    def per_seed(p, method, noise):
        return p[(p["method"] == method) & (p["noise"] == noise)].groupby("seed")["image_auroc"].mean()

    def row(p, name, protocol):
        clean, noisy = per_seed(p, "trustmae", lo), per_seed(p, "trustmae", hi)
        other = per_seed(p, "trustmae_no_tr", hi)
        both = clean.index.intersection(noisy.index)
        paired = noisy.index.intersection(other.index)
        change = mean_ci((noisy[both] - clean[both]) * 100, level)
        gap = mean_ci((noisy[paired] - other[paired]) * 100, level)
        return {
            "category": name,
            "protocol": protocol,
            "TrustMAE clean": round(100 * clean.mean(), 1) if len(clean) else np.nan,
            f"TrustMAE {round(100 * hi)} %": round(100 * noisy.mean(), 1) if len(noisy) else np.nan,
            f"w/o TR {round(100 * hi)} %": round(100 * other.mean(), 1) if len(other) else np.nan,
            "change": round(change[0], 1) + 0.0,  # + 0.0: no "-0.0"
            "change CI": f"[{change[1]:+.1f}, {change[2]:+.1f}]",
            "gap": round(gap[0], 1) + 0.0,
            "gap CI": f"[{gap[1]:+.1f}, {gap[2]:+.1f}]",
            "seeds": gap[3],
            "claim 3": ci_verdict(gap[1], gap[2], gap[3]),
        }

    out = []
    for protocol, p in part.groupby("protocol", sort=True):
        for column, q in p.groupby("column", sort=True):
            out.append(row(q, column, protocol))
        means = p.groupby(["method", "noise", "seed"], as_index=False)["image_auroc"].mean()
        out.append(row(means, "mean", protocol))
    return pd.DataFrame(out)
