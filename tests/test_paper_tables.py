"""Tests for the transcribed paper tables (results/paper/*.csv) and trustmae_lib.study.paper."""

from __future__ import annotations

import doctest
from fractions import Fraction

import numpy as np
import pytest

from trustmae_lib.config import PAPER_NOISE_RATIOS
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.study import paper
from trustmae_lib.study.paper import (
    MEAN_TOLERANCE,
    PAPER_CATEGORIES,
    check_means,
    load_paper_table,
    paper_mean,
    paper_wide,
)

METHODS = {
    "table3": ["ours w/o PD w/o TR", "ours w/o SP", "ours w/o PD", "ours w/o TR", "ours"],
    "table4": ["Ours", "MemAE", "AE-SSIM", "AE-MSE"],
}


@pytest.mark.parametrize("which, n_rows", [("table3", 30), ("table4", 24)])
def test_shape_methods_noise_categories(which, n_rows):
    table = load_paper_table(which)
    assert list(table.columns[:5]) == ["table", "method", "noise", "category", "auc"]
    assert set(table["table"]) == {which}
    assert len(table) == n_rows * 16
    assert not table.duplicated(["method", "noise", "category"]).any()
    assert list(dict.fromkeys(table["method"])) == METHODS[which]
    assert sorted(set(table["noise"])) == pytest.approx(list(PAPER_NOISE_RATIOS))
    per_row = table.groupby(["method", "noise"])["category"].apply(list)
    assert len(per_row) == n_rows
    assert all(cats == ["mean", *PAPER_CATEGORIES] for cats in per_row)
    assert table["auc"].between(0, 100).all()
    wide = paper_wide(which)
    assert wide.shape == (n_rows, 16) and list(wide.columns) == ["mean", *PAPER_CATEGORIES]


def test_categories_are_mvtec_in_alphabetical_order():
    assert list(PAPER_CATEGORIES) == sorted(PAPER_CATEGORIES) and len(PAPER_CATEGORIES) == 15
    data = pytest.importorskip("trustmae_lib.data.mvtec")
    assert set(PAPER_CATEGORIES) == set(data.MVTEC_CATEGORIES)


@pytest.mark.parametrize("which", ["table3", "table4"])
def test_row_means_match_the_paper(which):
    check = check_means(load_paper_table(which))
    assert check["ok"].all(), check[~check["ok"]]
    assert (check["n_categories"] == 15).all()
    # Observed: every one of the 54 rows agrees within 0.005, half the allowed MEAN_TOLERANCE.
    assert check["diff"].abs().max() <= 0.005
    assert MEAN_TOLERANCE == pytest.approx(0.011)


@pytest.mark.parametrize("which", ["table3", "table4"])
def test_a_perturbed_copy_fails_the_check(which):
    table = load_paper_table(which)
    bad = table.copy()
    hit = bad.index[(bad["category"] == "pill") & np.isclose(bad["noise"], 0.2)][0]
    bad.loc[hit, "auc"] += 0.3  # one category off by 0.3 moves the mean by 0.02 > tolerance + observed 0.005
    check = check_means(bad)
    assert (~check["ok"]).sum() == 1
    assert not check_means(table.drop(index=hit))["ok"].all()  # a missing category fails too
    assert check_means(table)["ok"].all()  # the original is untouched


def test_spot_values_against_the_supplement():
    t3, t4 = load_paper_table("table3"), load_paper_table("table4")

    def auc(table, method, noise, category):
        row = table[(table.method == method) & np.isclose(table.noise, noise) & (table.category == category)]
        assert len(row) == 1
        return float(row.auc.iloc[0])

    assert auc(t3, "ours w/o PD w/o TR", 0.05, "bottle") == 88.28
    assert auc(t3, "ours w/o PD", 0.30, "grid") == 70.32
    assert auc(t3, "ours w/o TR", 0.15, "carpet") == 92.10
    assert auc(t3, "ours", 0.40, "zipper") == 93.95
    assert auc(t4, "MemAE", 0.15, "leather") == 97.74
    assert auc(t4, "AE-SSIM", 0.40, "zipper") == 72.66
    assert auc(t4, "AE-MSE", 0.05, "metal_nut") == 60.51
    assert auc(t4, "Ours", 0.05, "wood") == 100


def test_table3_ours_equals_table4_ours():
    a = paper_wide("table3").loc["ours"]
    b = paper_wide("table4").loc["Ours"]
    assert a.equals(b)


def test_our_method_mapping():
    t4 = load_paper_table("table4")
    mapping = dict(zip(t4["method"], t4["our_method"], strict=True))
    assert mapping == {"Ours": "trustmae", "MemAE": "memae", "AE-SSIM": "ae_ssim", "AE-MSE": "ae_l2"}


def test_toothbrush_aucs_use_the_full_test_set():
    """Every toothbrush AUC is k/360 (12 good x 30 defective), k/1080 for three MemAE entries."""
    both = [load_paper_table(w) for w in ("table3", "table4")]
    tooth = [r for t in both for r in t[t.category == "toothbrush"].itertuples()]
    off_360 = []
    for r in tooth:
        pairs = Fraction(r.auc).limit_denominator(10**6) * 360 / 100
        if abs(float(pairs) - round(pairs)) * 100 / 360 > 0.005:
            off_360.append((r.method, r.noise))
            assert abs(r.auc * 10.8 - round(r.auc * 10.8)) * 100 / 1080 <= 0.005
    assert off_360 == [("MemAE", 0.05), ("MemAE", 0.30), ("MemAE", 0.40)]


def test_paper_mean_and_errors():
    assert paper_mean("ours", 0.40) == 89.87
    assert paper_mean("Ours", 0.1) == paper_mean("trustmae", 0.1) == 91.9
    assert paper_mean("AE-MSE", 0.2) == paper_mean("ae_l2", 0.2) == 78.37
    assert paper_mean("ours w/o PD w/o TR", 0.15) == 79.83
    with pytest.raises(TrustMAEError, match="unknown paper method"):
        paper_mean("ours w/o everything", 0.1)
    with pytest.raises(TrustMAEError, match="no paper mean"):
        paper_mean("ours", 0.25)
    with pytest.raises(TrustMAEError, match="unknown paper table"):
        load_paper_table("table5")
    assert doctest.testmod(paper).failed == 0


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(TrustMAEError, match="not found"):
        load_paper_table("table3", tmp_path)
