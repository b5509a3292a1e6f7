"""`vqmedseg ssl`'s report: the methods compared test case by test case, and the
validation curves that chose each row's weights."""

import pytest

from VQMedSegLib.training.ssl_report import (figure_dice_by_case, figure_validation, format_p, per_case_dice,
                                             per_case_table)


def _row(*seeds):
    """A method's results with per-seed ``cases`` (case -> structure -> Dice)."""
    return {"per_seed": [{"seed": k, "cases": cases} for k, cases in enumerate(seeds)]}


RESULTS = {
    "supervised": _row({"p1": {"RV": 0.50, "LV": 0.70}, "p2": {"RV": 0.80, "LV": 0.90}},
                       {"p1": {"RV": 0.70, "LV": 0.70}, "p2": {"RV": 0.60, "LV": 0.90}}),
    "vqseg": _row({"p1": {"RV": 0.60, "LV": 0.80}, "p2": {"RV": 0.80, "LV": 0.80}},
                  {"p1": {"RV": 0.80, "LV": 0.80}, "p2": {"RV": 0.70, "LV": 0.70}}),
    "old-row": {"per_seed": [{"seed": 0}]},  # written before per-case scores were kept
}


def test_per_case_dice_is_each_cases_structure_mean_averaged_over_seeds():
    table = per_case_dice(RESULTS)
    assert list(table) == ["p1", "p2"] and list(table["p1"]) == ["supervised", "vqseg"]
    assert table["p1"]["supervised"] == pytest.approx((0.60 + 0.70) / 2)
    assert table["p2"]["vqseg"] == pytest.approx((0.80 + 0.70) / 2)
    assert per_case_dice({"old-row": RESULTS["old-row"]}) == {}


def test_per_case_table_lists_every_case_and_counts_where_each_method_is_best():
    md = per_case_table(RESULTS)
    assert "| case | supervised | vqseg |" in md
    assert "| p1 | 65.00 | 75.00 |" in md and "| p2 | 80.00 | 75.00 |" in md
    assert "| cases best | 1 of 2 | 1 of 2 |" in md
    assert per_case_table({"old-row": RESULTS["old-row"]}) == ""


def test_the_case_figure_joins_each_cases_scores_across_the_methods():
    fig = figure_dice_by_case(RESULTS, "ACDC")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["supervised", "vqseg"]
    cases = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines() if line.get_label() in ("p1", "p2")}
    assert cases["p1"] == pytest.approx([65.0, 75.0]) and cases["p2"] == pytest.approx([80.0, 75.0])
    means = [line for line in ax.get_lines() if line.get_label() == "mean over cases"]
    assert len(means) == 1 and list(means[0].get_ydata()) == pytest.approx([72.5, 75.0])
    assert figure_dice_by_case({"old-row": RESULTS["old-row"]}, "ACDC") is None


def test_the_validation_figure_draws_every_rows_curve_and_marks_the_chosen_weights():
    results = {m: {"per_seed": [{"seed": s, "validation": {"iterations": [100, 200, 300], "dice": d, "best_iteration": b,
                                                             "best_dice": max(d)}}
                                 for s, d, b in runs]}
               for m, runs in {"supervised": [(0, [0.5, 0.6, 0.55], 200)],
                               "vqseg": [(0, [0.4, 0.6, 0.7], 300), (1, [0.45, 0.5, 0.65], 300)]}.items()}
    fig = figure_validation(results, "ACDC")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) >= {"supervised, seed 0", "vqseg, seed 0", "vqseg, seed 1"}
    assert list(lines["vqseg, seed 1"].get_xdata()) == [100, 200, 300]
    assert list(lines["vqseg, seed 1"].get_ydata()) == pytest.approx([45.0, 50.0, 65.0])
    chosen = [line for line in fig.axes[0].get_lines() if line.get_label() == "chosen weights"]
    assert len(chosen) == 1
    assert sorted(zip(chosen[0].get_xdata(), [round(y, 6) for y in chosen[0].get_ydata()])) == [(200, 60.0), (300, 65.0), (300, 70.0)]
    assert figure_validation(RESULTS, "ACDC") is None  # no row was validated


def test_per_case_table_tests_each_row_against_the_first_case_by_case():
    md = per_case_table(RESULTS)
    # p1: +10, p2: -5 points; two cases, so the exact two-sided signed-rank p is 1
    assert "`vqseg` − `supervised`, case by case: mean +2.50 points, median +2.50, higher in 1 of 2 cases; " \
           "two-sided Wilcoxon signed-rank test over the 2 cases p = 1.000." in md


def test_small_p_values_are_shown_with_their_size_not_rounded_to_zero():
    # 40 ACDC test cases give p near 1e-7; "0.000" would read as impossible
    assert format_p(7.284e-08) == "7.3e-08" and format_p(0.00099) == "9.9e-04"
    assert format_p(0.0625) == "0.062" and format_p(0.001) == "0.001" and format_p(1.0) == "1.000"


def test_the_wilcoxon_test_runs_over_patients_not_over_the_frames_of_one_patient():
    """ACDC's test set holds two frames (end-diastole and end-systole) of each patient,
    whose differences move together (Spearman 0.92 on acdc-10); the test once ran over the
    40 volumes as if they were 40 independent patients, and reported p = 7.3e-08 with 20
    patients, below the smallest p their exact test can give (2 / 2^20 = 1.9e-06). The
    frames' differences are now averaged per patient, and the test runs over patients."""
    from scipy.stats import wilcoxon

    from VQMedSegLib.training.ssl_report import case_paired

    gains = [0.01, 0.02, 0.03, 0.04, 0.05, -0.005]  # one per patient, the same in both of its frames
    cases = {f"patient{p:03d}_frame{f:02d}": g for p, g in enumerate(gains, 1) for f in (1, 12)}
    supervised = _row({c: {"LV": 0.8} for c in cases})
    vqseg = _row({c: {"LV": 0.8 + g} for c, g in cases.items()})
    d = case_paired(vqseg, supervised)
    assert d["n"] == 12 and d["a_higher"] == 10 and d["n_patients"] == 6 and d["patients_higher"] == 5
    assert d["per_patient"] == pytest.approx({f"patient{p:03d}": 100 * g for p, g in enumerate(gains, 1)})
    assert d["wilcoxon_p"] == pytest.approx(4 / 64)  # 6 patients, the loss ranked lowest: as over 6 cases
    assert d["wilcoxon_p"] > wilcoxon([100 * g for g in cases.values()]).pvalue  # what the 12 frames claimed
    table = per_case_table({"supervised": supervised, "vqseg": vqseg})
    assert "higher in 10 of 12 cases (5 of 6 patients); two-sided Wilcoxon signed-rank test over the 6 patients p = 0.062" in table
    # one case a patient (CHAOS): the same test as before
    single = case_paired(_row({f"c{i}": {"liver": 0.8 + g} for i, g in enumerate(gains)}),
                         _row({f"c{i}": {"liver": 0.8} for i in range(6)}))
    assert single["n"] == single["n_patients"] == 6 and single["wilcoxon_p"] == pytest.approx(4 / 64)
