"""The paper's reference numbers: supplement Tables 3 (ablations) and 4 (baselines) of arXiv 2012.14629.

The tables are transcribed once into tidy CSVs under ``results/paper/`` (see the README there); this module
reads them so that chapters can put the paper's image-level ROC AUC beside ours. Each CSV has one row per
(method, noise, category) with columns ``table, method, noise, category, auc``: ``noise`` is a fraction (0.05
for the paper's "5%"), ``auc`` is in percent as printed, and the paper's own "mean AUC" column is stored as
category ``mean``. Table 4 adds ``our_method``, the name of the corresponding method in this library.

Example:
    >>> paper_mean("ours", 0.40)
    89.87
    >>> paper_mean("ae_l2", 0.05)  # AE-MSE in the paper
    81.81
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from trustmae_lib.config import PAPER_NOISE_RATIOS, shipped_dir
from trustmae_lib.data.mvtec import MVTEC_CATEGORIES
from trustmae_lib.errors import TrustMAEError

__all__ = [
    "PAPER_DIR",
    "PAPER_TABLES",
    "PAPER_CATEGORIES",
    "MEAN_TOLERANCE",
    "load_paper_table",
    "paper_wide",
    "paper_mean",
    "check_means",
]

#: The paper's tables: the checkout's ``results/paper/``, or the copy inside an installed wheel.
PAPER_DIR = shipped_dir("results/paper", "_paper")
PAPER_TABLES = {"table3": "table3_ablation.csv", "table4": "table4_baselines.csv"}
# MVTec AD's 15 categories in alphabetical order: the columns of Tables 3 and 4 (garbled in the text).
PAPER_CATEGORIES = MVTEC_CATEGORIES
# Both the category AUCs and the mean are rounded to 0.01, so the mean of the rounded values can differ from
# the printed mean by up to 0.005 + 0.005; all 54 rows of the two tables in fact agree to within 0.005.
MEAN_TOLERANCE = 0.011


@lru_cache(maxsize=4)
def _read(path: str) -> pd.DataFrame:
    return pd.read_csv(path)


def load_paper_table(which: str, directory: str | Path | None = None) -> pd.DataFrame:
    """One of the paper's tables in tidy form.

    Args:
        which: ``"table3"`` (ablations: ``ours w/o PD w/o TR``, ``ours w/o SP``, ``ours w/o PD``,
            ``ours w/o TR``, ``ours``) or ``"table4"`` (baselines: ``Ours``, ``MemAE``, ``AE-SSIM``,
            ``AE-MSE``).
        directory: folder holding the CSVs; defaults to the repository's ``results/paper``.

    Returns:
        A copy of the table: columns ``table, method, noise, category, auc`` (+ ``our_method`` for table4),
        one row per (method, noise, category) with category ``mean`` for the paper's mean AUC.
    """
    if which not in PAPER_TABLES:
        raise TrustMAEError(f"unknown paper table {which!r}; use one of {', '.join(PAPER_TABLES)}")
    path = Path(directory or PAPER_DIR) / PAPER_TABLES[which]
    if not path.is_file():
        raise TrustMAEError(f"paper table {path} not found; run from a full checkout of the repository")
    return _read(str(path)).copy()


def paper_wide(which: str, directory: str | Path | None = None) -> pd.DataFrame:
    """The table as printed: rows = (method, noise) in the paper's order, columns = mean + 15 categories."""
    table = load_paper_table(which, directory)
    wide = table.pivot(index=["method", "noise"], columns="category", values="auc")
    order = list(dict.fromkeys(zip(table["method"], table["noise"], strict=True)))
    return wide.loc[order, ["mean", *PAPER_CATEGORIES]].rename_axis(columns=None)


def paper_mean(method: str, noise: float) -> float:
    """The paper's mean image AUC (percent) for a method at a noise ratio.

    Args:
        method: a method name of Table 3 or 4 (``"ours w/o TR"``, ``"MemAE"``, ...) or a library name from
            Table 4's ``our_method`` column (``"trustmae"``, ``"memae"``, ``"ae_ssim"``, ``"ae_l2"``).
        noise: noise ratio as a fraction, one of 0.05, 0.1, 0.15, 0.2, 0.3, 0.4.
    """
    tables = [load_paper_table("table3"), load_paper_table("table4")]
    for table in tables:
        names = table["method"] if method in set(table["method"]) else table.get("our_method")
        if names is None or method not in set(names):
            continue
        row = table[(names == method) & np.isclose(table["noise"], float(noise)) & (table["category"] == "mean")]
        if len(row) != 1:
            raise TrustMAEError(
                f"no paper mean for {method!r} at noise {noise}; use a fraction in {list(PAPER_NOISE_RATIOS)}"
            )
        return float(row["auc"].iloc[0])
    known = sorted({*tables[0]["method"], *tables[1]["method"], *tables[1]["our_method"]})
    raise TrustMAEError(f"unknown paper method {method!r}; use one of {', '.join(known)}")


def check_means(table: pd.DataFrame) -> pd.DataFrame:
    """Recompute each row's 15-category mean and compare it with the paper's mean column.

    Args:
        table: a tidy table from :func:`load_paper_table` (or a modified copy).

    Returns:
        One row per (method, noise): ``n_categories``, ``computed`` (mean of the category AUCs), ``paper``
        (the printed mean), ``diff`` = computed - paper, and ``ok``: ``|diff| <= MEAN_TOLERANCE`` with 15
        categories.
    """
    cats = table[table["category"] != "mean"]
    grouped = cats.groupby(["method", "noise"], sort=False)["auc"]
    out = pd.DataFrame({"n_categories": grouped.size(), "computed": grouped.mean()})
    out["paper"] = table[table["category"] == "mean"].set_index(["method", "noise"])["auc"]
    out["diff"] = out["computed"] - out["paper"]
    out["ok"] = (out["diff"].abs() <= MEAN_TOLERANCE) & (out["n_categories"] == len(PAPER_CATEGORIES))
    return out
