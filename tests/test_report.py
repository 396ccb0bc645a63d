"""Noise-study tables and claim checks on hand-made result dicts with known answers."""

from __future__ import annotations

import pytest

from trustmae_lib.config import is_trustmae
from trustmae_lib.study import report
from trustmae_lib.study.paper import paper_mean


def _result(method, noise, seed, auc, variant=None, category="widget"):
    variant = variant or {"trustmae": "perceptual", "trustmae_no_tr": "perceptual", "patchcore": "patch_knn"}.get(
        method, "residual"
    )
    metrics = {variant: {"image_auroc": auc, "pixel_auroc": None, "f1": 0.5}}
    if is_trustmae(method):
        metrics["pixel"] = {"image_auroc": auc - 0.1, "pixel_auroc": 0.9}
        metrics["global"] = {"image_auroc": auc - 0.2, "pixel_auroc": None}
    return {"dataset": "synthetic", "category": category, "noise_ratio": noise, "method": method, "seed": seed,
            "metrics": metrics, "config_hash": f"{method}{noise}{seed}",
            "file": f"{method}-{noise}-{seed}.json"}  # fmt: skip


def _raw(aucs: dict, seeds=(0, 1, 2), jitter=0.01, offset=0.0) -> list[dict]:
    """``aucs[method][noise] = AUROC`` (+ ``offset``) as result dicts; seeds add ``+- jitter``."""
    return [_result(method, noise, s, auc + offset + jitter * (s - 1))
            for method, by_noise in aucs.items() for noise, auc in by_noise.items() for s in seeds]  # fmt: skip


def _frame(aucs: dict, seeds=(0, 1, 2), jitter=0.01):
    """``aucs[method][noise] = AUROC``; seeds add ``+- jitter``."""
    return report.results_frame(_raw(aucs, seeds, jitter))


GOOD = {
    "trustmae": {0.0: 0.95, 0.4: 0.93},
    "trustmae_no_tr": {0.0: 0.95, 0.4: 0.85},
    "memae": {0.0: 0.80, 0.4: 0.70},
    "ae_ssim": {0.0: 0.75, 0.4: 0.70},
    "ae_l2": {0.0: 0.78, 0.4: 0.72},
}


def test_frame_has_one_row_per_result_and_variant():
    frame = _frame(GOOD)
    assert len(frame) == 3 * 2 * (3 + 3 + 1 + 1 + 1)  # TrustMAE methods have three variants
    assert set(frame["variant"]) == {"perceptual", "pixel", "global", "residual"}


def test_results_table_means_and_spread():
    table = report.results_table(_frame(GOOD), report.TABLE4_ROWS)
    row = table[(table["method"] == "TrustMAE") & (table["noise %"] == 40)].iloc[0]
    assert row["mean"] == "93.0 ± 1.0" and row["synthetic/widget"] == "93.0 ± 1.0"
    assert row["paper mean (MVTec AD)"] == f"{paper_mean('Ours', 0.4):.1f}"
    clean = table[(table["method"] == "TrustMAE") & (table["noise %"] == 0)].iloc[0]
    assert clean["paper mean (MVTec AD)"] == "--"  # the paper has no 0 % column


def test_ablation_rows_use_the_scoring_variants():
    table = report.results_table(_frame(GOOD), report.TABLE3_ROWS, with_paper=False)
    wo_pd = table[(table["method"] == "w/o PD") & (table["noise %"] == 0)].iloc[0]
    wo_sp = table[(table["method"] == "w/o SP") & (table["noise %"] == 0)].iloc[0]
    assert wo_pd["mean"].startswith("85.0") and wo_sp["mean"].startswith("75.0")


def test_drop_table():
    drops = report.drop_table(_frame(GOOD), report.TABLE4_ROWS).set_index("method")
    assert drops.loc["TrustMAE", "drop"] == pytest.approx(2.0)
    assert drops.loc["MemAE", "drop"] == pytest.approx(10.0)
    paper_drop = paper_mean("MemAE", 0.05) - paper_mean("MemAE", 0.4)
    assert drops.loc["MemAE", "paper drop 5→40 %"] == pytest.approx(paper_drop, abs=0.01)
    assert (drops["seeds"] == 3).all()


def test_claims_hold_on_data_built_to_satisfy_them():
    verdicts = [c["verdict"] for c in report.claims(_frame(GOOD))]
    assert verdicts == ["holds", "holds", "holds"]


def test_claims_sign_convention_is_first_minus_second():
    """Every signed number of a claim is "first minus second" in AUROC points, so ``+`` always means higher."""
    one, two, three = (c["ours"] for c in report.claims(_frame(GOOD, jitter=0.0)))
    assert "TrustMAE − MemAE at 0 %: +15.0 ± 0.0" in one  # TrustMAE ahead: positive
    # Both lose AUROC from 0 % to 40 %: the change (noisiest minus cleanest) is negative.
    assert two.startswith("AUROC at 40 % − at 0 %:") and "TrustMAE -2.0 ± 0.0" in two and "MemAE -10.0 ± 0.0" in two
    assert "+8.0 ± 0.0 at 40 %" in three  # TrustMAE above w/o TR: positive
    paper = report.claims(_frame(GOOD))[1]["paper"]
    assert f"({paper_mean('Ours', 0.4) - paper_mean('Ours', 0.05):+.2f})" in paper and "(-" in paper


def test_claims_fail_on_data_built_to_break_them():
    bad = {
        "trustmae": {0.0: 0.80, 0.4: 0.60},  # below AE-L2 at 40 %, drops more than MemAE
        "trustmae_no_tr": {0.0: 0.80, 0.4: 0.65},  # the trust region hurts at high noise
        "memae": {0.0: 0.75, 0.4: 0.72},
        "ae_ssim": {0.0: 0.70, 0.4: 0.60},
        "ae_l2": {0.0: 0.70, 0.4: 0.65},
    }
    verdicts = [c["verdict"] for c in report.claims(_frame(bad))]
    assert verdicts == ["fails", "fails", "fails"]


def test_a_difference_inside_the_seed_spread_is_not_a_win():
    # TrustMAE 0.5 points above MemAE on average, but the per-seed differences are -1.5, +0.5, +2.5 (std 2).
    rows = [_result(m, n, s, a) for m, by_noise in GOOD.items() if m != "memae" for n, a in by_noise.items()
            for s in (0, 1, 2)]  # fmt: skip
    rows += [_result("memae", n, s, GOOD["trustmae"][n] - 0.005 - 0.02 * (s - 1))
             for n in (0.0, 0.4) for s in (0, 1, 2)]  # fmt: skip
    first = report.claims(report.results_frame(rows))[0]
    assert first["verdict"] == "inconclusive" and "+0.5 ± 2.0" in first["ours"]


@pytest.mark.parametrize("seeds", [(0,), (0, 1)])
def test_claims_need_three_seeds(seeds):
    # Gaps of 5 to 25 points that would hold on three seeds: one seed has no spread at all (any gain would "hold"),
    # two give a spread from a single difference. Both are too few to judge by.
    assert report.MIN_SEEDS == 3
    verdicts = [c["verdict"] for c in report.claims(_frame(GOOD, seeds=seeds))]
    assert verdicts == ["too few seeds"] * 3


def test_claims_judge_three_seeds_with_a_clear_gap():
    verdicts = [c["verdict"] for c in report.claims(_frame(GOOD, seeds=(0, 1, 2), jitter=0.0))]
    assert verdicts == ["holds", "holds", "holds"]
    # Three seeds whose gap is clearly the wrong way round are judged too.
    flipped = {**GOOD, "trustmae_no_tr": {0.0: 0.95, 0.4: 0.99}}
    assert report.claims(_frame(flipped, seeds=(0, 1, 2)))[2]["verdict"] == "fails"


def test_paired_gap_is_per_noise_and_seed_in_points():
    gap = report.paired_gap(_frame(GOOD), report.TABLE4_ROWS[3], report.TABLE4_ROWS[2])
    assert list(gap.index) == [0.0, 0.4] and list(gap.columns) == [0, 1, 2]
    assert gap.to_numpy().ravel() == pytest.approx([15.0] * 3 + [23.0] * 3)


def test_paper_reference_uses_the_paper_noise_levels():
    from trustmae_lib.config import PAPER_NOISE_RATIOS

    ref = report.paper_reference(report.TABLE4_ROWS)
    assert tuple(ref[ref["method"] == "TrustMAE"]["noise"]) == PAPER_NOISE_RATIOS
    assert ref.iloc[-1]["auc"] == pytest.approx(paper_mean("Ours", 0.4))


def test_missing_rows_are_not_tested():
    only = report.results_frame([_result("ae_l2", 0.0, 0, 0.7)])
    assert [c["verdict"] for c in report.claims(only)] == ["not tested"] * 3


def test_figures_draw_what_the_tables_say():
    import matplotlib

    matplotlib.use("Agg")
    from trustmae_lib.study import viz

    frame = _frame(GOOD)
    fig = viz.noise_curves(frame, report.TABLE4_ROWS)
    ours, paper = fig.axes
    lines = {line.get_label(): line for line in ours.get_lines()}
    assert set(lines) == {"AE-L2", "AE-SSIM", "MemAE", "TrustMAE"}
    assert list(lines["TrustMAE"].get_ydata()) == pytest.approx([95.0, 93.0])  # mean over seeds, percent
    assert len(paper.get_lines()) == 4 and list(paper.get_lines()[3].get_xdata())[-1] == pytest.approx(40)
    drops = report.drop_table(frame, report.TABLE4_ROWS)
    bars = viz.drop_bars(drops).axes[0].patches
    assert [round(b.get_height(), 1) for b in bars[:4]] == [6.0, 5.0, 10.0, 2.0]  # ours, in row order
    heat = viz.auroc_heatmap(frame, report.TABLE4_ROWS).axes[0].images[0].get_array()
    assert heat.shape == (4, 2) and heat[3, 0] == pytest.approx(95.0)


def test_readings_table_pairs_each_reading_with_its_own_or_the_literal_no_tr():
    rows = []
    for s in (0, 1, 2):
        rows += [
            {**_result("trustmae", 0.4, s, 0.82 + 0.01 * s), "reading": ""},  # +3 ± 1 points
            {**_result("trustmae", 0.4, s, 0.90), "reading": "inner60"},  # +10 points, no spread
            {**_result("trustmae", 0.4, s, 0.70 + 0.05 * s), "reading": "m512"},  # vs its own w/o TR: -5 ± 5
            {**_result("trustmae_no_tr", 0.4, s, 0.80), "reading": ""},
            {**_result("trustmae_no_tr", 0.4, s, 0.70 + 0.10 * s), "reading": "m512"},
        ]
    table = report.readings_table(report.results_frame(rows)).set_index("reading")
    assert table.loc["inner60", "gap"] == pytest.approx(10.0) and table.loc["inner60", "verdict"] == "holds"
    assert table.loc["inner60", "w/o TR"].endswith("(literal)")
    assert table.loc["literal", "gap"] == pytest.approx(3.0) and table.loc["literal", "verdict"] == "holds"
    assert table.loc["m512", "w/o TR"].endswith("(m512)")
    assert table.loc["m512", "gap"] == pytest.approx(-5.0) and table.loc["m512", "verdict"] == "inconclusive"
    assert table.loc["m512", "per seed"] == pytest.approx((0.0, -5.0, -10.0))
    one = report.readings_table(report.results_frame([r for r in rows if r["seed"] == 0])).set_index("reading")
    assert (one["verdict"] == "too few seeds").all()  # a single seed has no spread to judge by
    two = report.readings_table(report.results_frame([r for r in rows if r["seed"] < 2])).set_index("reading")
    assert (two["verdict"] == "too few seeds").all()  # ... and two seeds fewer than report.MIN_SEEDS
    import matplotlib

    matplotlib.use("Agg")
    from trustmae_lib.study import viz

    ax = viz.reading_gaps(table.reset_index()).axes[0]
    assert [round(b.get_height(), 1) for b in ax.patches] == list(table["gap"])
    assert sorted(ax.get_lines()[2].get_ydata()) == pytest.approx([-10.0, -5.0, 0.0])  # m512's seeds (3rd row)
    # The Table 3 / 4 rows see only the default reading.
    assert len(report.select_rows(report.results_frame(rows), [report.TABLE3_ROWS[0]])) == 3


def test_mean_ci_is_the_student_t_interval():
    from scipy import stats

    values = [1.0, 2.0, 4.0, 7.0]
    mean, low, high, n = report.mean_ci(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=3.5, scale=stats.sem(values))
    assert (mean, n) == (3.5, 4) and low == pytest.approx(ref[0]) and high == pytest.approx(ref[1])
    assert report.mean_ci([2.0])[0] == 2.0 and report.mean_ci([])[3] == 0
    assert report.ci_verdict(0.1, 2.0, 3) == "holds" and report.ci_verdict(-2.0, -0.1, 5) == "fails"
    assert report.ci_verdict(-1.0, 1.0, 5) == "inconclusive" and report.ci_verdict(1.0, 2.0, 2) == "too few seeds"


def _diag_result(method, noise, seed, auc, protocol="overlap", category="widget", reading="ema"):
    return {"dataset": "synthetic", "category": category, "protocol": protocol, "method": method, "reading": reading,
            "noise_ratio": noise, "seed": seed, "image_auroc": auc,
            "diagnostics": {"memory": {"slot_movement": 0.5, "captured_fraction": 0.01, "defect_locations": 5,
                                       "locations": 100},
                            "reconstruction": {"diversity": 0.2}}}  # fmt: skip


def test_memory_study_table_pairs_by_seed_with_intervals():
    results = []
    for seed in range(5):
        for protocol in ("overlap", "disjoint"):
            gap = 0.05 if protocol == "disjoint" else 0.0  # the trust region helps only under disjoint
            results += [
                _diag_result("trustmae", 0.0, seed, 0.95 + 0.01 * seed, protocol),
                _diag_result("trustmae", 0.4, seed, 0.90 + 0.01 * seed + gap, protocol),
                _diag_result(
                    "trustmae_no_tr", 0.4, seed, 0.90 + 0.01 * seed + (0.002 if seed % 2 else -0.002), protocol
                ),  # fmt: skip
            ]
    results.append(_diag_result("trustmae", 0.0, 0, 0.5, reading=""))  # another reading: left out
    unmasked = _diag_result("trustmae", 0.4, 0, 0.8, category="mono", reading="other")
    unmasked["diagnostics"]["memory"].update(defect_locations=0, captured_fraction=0.0)  # image labels, no masks
    frame = report.diagnostics_frame(results + [unmasked])
    assert frame["defect_share"].iloc[0] == pytest.approx(0.05) and frame["slot_movement"].iloc[0] == 0.5
    assert frame.iloc[-1][["captured_fraction", "defect_share"]].isna().all()  # unknown, not 0
    assert frame.iloc[-1]["slot_movement"] == 0.5
    table = report.memory_study_table(frame, "ema").set_index(["protocol", "category"])
    dis, over = table.loc[("disjoint", "synthetic/widget")], table.loc[("overlap", "synthetic/widget")]
    # per seed the clean -> 40 % change is exactly -5 points (disjoint: 0), so its interval has no width
    assert over["change"] == pytest.approx(-5.0) and over["change CI"] == "[-5.0, -5.0]"
    assert dis["gap"] == pytest.approx(5.0, abs=0.1) and dis["claim 3"] == "holds" and dis["seeds"] == 5
    assert over["claim 3"] == "inconclusive" and over["TrustMAE clean"] == pytest.approx(97.0)
    assert ("overlap", "mean") in table.index
    with pytest.raises(Exception, match="no results"):
        report.memory_study_table(frame, "ema8")


def test_noise_change_pairs_seeds_over_complete_categories():
    slope = {"widget": 0.1, "mono": 0.3}  # AUROC lost per unit of noise, plus 0.01 per seed
    results = [_diag_result("memae", n, seed, 0.9 - n * (slope[cat] + 0.01 * seed), category=cat)
               for seed in range(3) for n in (0.0, 0.2, 0.4) for cat in slope]  # fmt: skip
    results.append(_diag_result("memae", 0.0, 3, 0.99))  # seed 3: widget clean only -> no pair, left out
    results.append(_diag_result("memae", 0.4, 4, 0.10, category="mono"))  # seed 4: mono noisy only
    results.append(_diag_result("memae", 0.0, 4, 0.90, category="mono"))  # ... and clean, but no widget
    frame = report.diagnostics_frame(results)
    change = report.noise_change(frame)
    assert list(change.index) == [0, 1, 2]
    # 40 % minus clean in points per seed, the mean of widget (-4 - 0.4 seed) and mono (-12 - 0.4 seed)
    assert change.tolist() == pytest.approx([-8.0, -8.4, -8.8])
    assert report.noise_change(frame, high=0.2).tolist() == pytest.approx([-4.0, -4.2, -4.4])
    with pytest.raises(Exception, match="noise 0.0 and 0.3"):
        report.noise_change(frame, high=0.3)


def test_study_readings_pick_the_core_studys_cells():
    """The core study trains TrustMAE and w/o TR under `ema` and MemAE under `shrink2m_lr2e3`: its rows must read those
    cells, not the library-reading cells that share a folder with them."""
    good = [{**r, "reading": report.STUDY_READINGS.get(r["method"], "")} for r in _raw(GOOD)]
    decoy = [{**r, "reading": "", "file": "decoy-" + r["file"]} for r in _raw(GOOD, offset=-0.3)
             if r["method"] in report.STUDY_READINGS]  # fmt: skip
    frame = report.results_frame(good + decoy)
    rows = report.with_readings(report.TABLE4_ROWS)
    assert [r.reading for r in rows] == ["", "", "shrink2m_lr2e3", "ema"]
    assert [r.label for r in rows] == [r.label for r in report.TABLE4_ROWS]
    table = report.results_table(frame, rows, with_paper=False)
    assert table[(table["method"] == "TrustMAE") & (table["noise %"] == 40)].iloc[0]["mean"] == "93.0 ± 1.0"
    assert [c["verdict"] for c in report.claims(frame, readings=report.STUDY_READINGS)] == ["holds"] * 3
    # The library-reading cells (the decoys, 30 points lower) fail claim 1 against the same baselines.
    assert report.claims(frame)[0]["verdict"] == "fails"


def test_protocol_bars_draw_one_panel_per_protocol():
    import matplotlib

    matplotlib.use("Agg")
    from trustmae_lib.study import viz

    rows = [{**r, "protocol": p} for p in ("overlap", "disjoint") for r in _raw(GOOD, offset=0.0 if p == "overlap"
                                                                                 else -0.1)]  # fmt: skip
    fig = viz.protocol_bars(report.results_frame(rows), report.TABLE4_ROWS)
    overlap, disjoint = fig.axes  # the paper's protocol first
    assert disjoint.get_title() == "disjoint protocol" and overlap.get_title() == "overlap protocol"
    heights = [round(b.get_height(), 1) for b in overlap.patches]
    assert heights == [78.0, 75.0, 80.0, 95.0, 72.0, 70.0, 70.0, 93.0]  # clean bars, then 40 % bars, in row order
    assert round(disjoint.patches[3].get_height(), 1) == 85.0


def test_paper_comparison_reads_the_cells_of_the_given_readings():
    import matplotlib

    matplotlib.use("Agg")
    from trustmae_lib.study import viz

    frame = report.results_frame([{**r, "reading": report.STUDY_READINGS.get(r["method"], "")} for r in _raw(GOOD)])
    top, bottom = viz.paper_comparison(frame, readings=report.STUDY_READINGS).axes
    library = viz.paper_comparison(frame).axes
    # Without the readings, the TrustMAE and MemAE cells are not found: as if they were not there at all.
    without = viz.paper_comparison(frame[~frame["method"].isin(["trustmae", "trustmae_no_tr", "memae"])]).axes
    assert len(library[0].get_lines()) == len(without[0].get_lines()) < len(top.get_lines())
    assert len(library[1].get_lines()) == len(without[1].get_lines()) < len(bottom.get_lines())


def test_budget_panels_draw_one_panel_per_budget_with_seed_lines_and_means():
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    from trustmae_lib.study import viz

    rows = [{"method": m, "noise": n, "seed": s, "steps": steps,
             "image_auroc": base + (0.05 if steps == 1200 else 0.0) - (0.1 * n if m == "trustmae_no_tr" else 0.0)
             + 0.01 * s}
            for steps in (1200, 300) for m, base in (("trustmae", 0.8), ("trustmae_no_tr", 0.8))
            for n in (0.0, 0.4) for s in (0, 1, 2)]  # fmt: skip
    rows.append({"method": "ae_l2", "noise": 0.0, "seed": 0, "steps": 300, "image_auroc": 0.5})  # not asked for
    fig = viz.budget_panels(pd.DataFrame(rows), {"trustmae": "TrustMAE", "trustmae_no_tr": "w/o TR"})
    short, long = fig.axes  # the shorter budget first
    assert short.get_title() == "300 steps" and long.get_title() == "1200 steps"
    assert len(short.get_lines()) == 2 * (3 + 1)  # per method: a line per seed and one through the means
    means = {line.get_label(): line.get_ydata() for line in long.get_lines() if "mean" in line.get_label()}
    assert means["TrustMAE (mean of 3 seeds)"] == pytest.approx([86.0, 86.0])
    assert means["w/o TR (mean of 3 seeds)"] == pytest.approx([86.0, 82.0])


def test_budget_panels_draw_one_row_per_category():
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    from trustmae_lib.study import viz

    rows = [{"category": c, "method": "trustmae", "noise": n, "seed": s, "steps": steps,
             "image_auroc": base + (0.05 if steps == 1200 else 0.0) + 0.01 * s}
            for c, base in (("synthetic/widget", 0.9), ("elpv/mono", 0.8)) for steps in (300, 1200)
            for n in (0.0, 0.4) for s in (0, 1)]  # fmt: skip
    fig = viz.budget_panels(pd.DataFrame(rows), {"trustmae": "TrustMAE"})
    assert [ax.get_title() for ax in fig.axes] == [
        "elpv/mono, 300 steps",
        "elpv/mono, 1200 steps",
        "synthetic/widget, 300 steps",
        "synthetic/widget, 1200 steps",
    ]
    means = [next(line.get_ydata() for line in ax.get_lines() if "mean" in line.get_label()) for ax in fig.axes]
    assert means[1] == pytest.approx([85.5, 85.5]) and means[2] == pytest.approx([90.5, 90.5])
