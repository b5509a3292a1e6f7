"""What ``vqmedseg ssl`` shows beside its summary table: the methods compared test case by
test case (a table in ``results.md``, with each row tested against the first by the
two-sided Wilcoxon signed-rank test over the patients, and ``dice_by_case.png``), and, when
the rows' weights were chosen on validation patients, the validation curves that chose
them (``validation.png``).

A case's Dice is the mean over its structures, as in the summary table, averaged over
the seeds. Rows whose ``results.json`` predates per-case scores (``cases``) are left out.
Figures are drawn and written with :mod:`VQMedSegLib.export.figures`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..export.figures import agg_figure, save_png


def case_dice(row: dict, seeds: list[int] | None = None, view: str | None = None) -> dict[str, float] | None:
    """``{case: Dice}`` of one method's row over ``seeds`` (default: all of its seeds), as
    predicted or, with ``view="largest_component"``, with each structure's largest piece
    kept; ``None`` when one of them kept no per-case scores."""
    runs = {r["seed"]: (r if view is None else r.get(view, {})).get("cases") for r in row.get("per_seed", [])}
    seeds = list(runs) if seeds is None else seeds
    if not seeds or any(runs.get(k) is None for k in seeds):
        return None
    return {c: float(np.mean([np.mean(list(runs[k][c].values())) for k in seeds])) for c in runs[seeds[0]]}


def per_case_dice(results: dict) -> dict[str, dict[str, float]]:
    """``{case: {method: Dice}}`` for the methods whose every seed kept per-case scores;
    cases in the order of the first such method, methods in the order of ``results``."""
    rows = {m: d for m, d in ((m, case_dice(r)) for m, r in results.items()) if d is not None}
    if not rows:
        return {}
    return {c: {m: d[c] for m, d in rows.items()} for c in next(iter(rows.values()))}


def patient_of(case_id: str) -> str:
    """ACDC frames of one patient share a patient: ``patient001_frame01`` -> ``patient001``."""
    return case_id.split("_frame")[0]


def case_paired(row_a: dict, row_b: dict, seeds: list[int] | None = None, view: str | None = None) -> dict | None:
    """Row A minus row B test case by test case (Dice points, each case over ``seeds``; for
    ``view``, see :func:`case_dice`), with the two-sided Wilcoxon signed-rank test over the
    patients: the cases of one patient (ACDC's two frames, whose differences move together)
    are one observation, the mean of their differences. ``None`` unless both rows kept
    per-case scores for the same cases."""
    from scipy.stats import wilcoxon

    a, b = case_dice(row_a, seeds, view), case_dice(row_b, seeds, view)
    if not a or not b or set(a) != set(b):
        return None
    diff = {c: 100 * (a[c] - b[c]) for c in a}
    values = np.array(list(diff.values()))
    frames: dict[str, list[float]] = {}
    for case, d in diff.items():
        frames.setdefault(patient_of(case), []).append(d)
    per_patient = {patient: float(np.mean(d)) for patient, d in frames.items()}
    by_patient = np.array(list(per_patient.values()))
    nonzero = by_patient[by_patient != 0]  # ties at zero dropped (Wilcoxon's own rule); the exact test up to 50
    # patients, the normal approximation beyond, named rather than left to SciPy's "auto", which
    # chose the approximation for tied differences before SciPy 1.15 (p = 0.046 against 0.125)
    p = 1.0 if not len(nonzero) else float(wilcoxon(nonzero, alternative="two-sided",
                                                    method="exact" if len(nonzero) <= 50 else "approx").pvalue)
    return {"n": len(diff), "per_case": diff, "mean": float(values.mean()), "median": float(np.median(values)),
            "a_higher": int((values > 0).sum()), "n_patients": len(per_patient), "per_patient": per_patient,
            "patients_higher": int((by_patient > 0).sum()), "wilcoxon_p": p}


def paired_words(d: dict) -> str:
    """How many cases (and patients, where a patient has several) row A is higher in, and
    the test's p-value with what it ran over."""
    patients = f" ({d['patients_higher']} of {d['n_patients']} patients)" if d["n_patients"] != d["n"] else ""
    unit = "patients" if d["n_patients"] != d["n"] else "cases"
    return (f"higher in {d['a_higher']} of {d['n']} cases{patients}; two-sided Wilcoxon signed-rank test over the "
            f"{d['n_patients']} {unit} p = {format_p(d['wilcoxon_p'])}")


def format_p(p: float) -> str:
    """A p-value for a report: three decimals, or two significant digits below 0.001 (a
    p of 7e-08 shown as 0.000 would read as impossible)."""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def per_case_table(results: dict) -> str:
    """A Markdown section: each test case's Dice (%) per method, and in how many cases each
    method scored highest (ties count for each). Empty when no row has per-case scores."""
    table = per_case_dice(results)
    if not table:
        return ""
    methods = list(next(iter(table.values())))
    best = {m: sum(scores[m] == max(scores.values()) for scores in table.values()) for m in methods}
    lines = ["", "## Dice per test case (%)", "",
             "Each case's Dice is the mean over its structures, averaged over the seeds (figure: `dice_by_case.png`).", "",
             "| case | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    lines += [f"| {case} | " + " | ".join(f"{100 * scores[m]:.2f}" for m in methods) + " |" for case, scores in table.items()]
    lines.append("| cases best | " + " | ".join(f"{best[m]} of {len(table)}" for m in methods) + " |")
    first = methods[0]
    for m in methods[1:]:
        d = case_paired(results[m], results[first])
        if d is None:  # rows scored on other cases (folders merged by hand)
            continue
        lines.append(f"\n`{m}` − `{first}`, case by case: mean {d['mean']:+.2f} points, median {d['median']:+.2f}, "
                     f"{paired_words(d)}.")
    return "\n".join(lines) + "\n"


def figure_dice_by_case(results: dict, title: str):
    """The methods side by side on the x axis; each test case a grey line joining its Dice
    under every method (so a case that one method gains on rises), the mean over cases in
    black. ``None`` when no row has per-case scores."""
    table = per_case_dice(results)
    if not table:
        return None
    methods = list(next(iter(table.values())))
    x = np.arange(len(methods))
    fig = agg_figure(1.6 * len(methods) + 2.4, 4.2)
    ax = fig.add_subplot()
    for case, scores in table.items():
        ax.plot(x, [100 * scores[m] for m in methods], color="0.6", marker="o", markersize=3, linewidth=0.8, alpha=0.7,
                label=case)
    means = [100 * float(np.mean([scores[m] for scores in table.values()])) for m in methods]
    ax.plot(x, means, color="black", marker="D", linewidth=2.0, label="mean over cases")
    ax.set_xticks(x, methods)
    ax.set_xlim(-0.4, len(methods) - 0.6)
    ax.set_ylabel("test Dice (%), mean of structures and seeds")
    ax.set_title(f"{title}: {len(table)} test cases")
    ax.grid(axis="y", alpha=0.3)
    return fig


def figure_validation(results: dict, title: str):
    """Validation Dice against the iteration for every row and seed, one colour per row,
    with the weights each run kept (its best validation Dice) marked. ``None`` when no row
    was validated."""
    runs = [(m, s) for m, r in results.items() for s in r.get("per_seed", []) if "validation" in s]
    if not runs:
        return None
    fig = agg_figure(7.0, 4.2)
    ax = fig.add_subplot()
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(m for m, _ in runs))}
    chosen = []
    for method, seed in runs:
        v = seed["validation"]
        ax.plot(v["iterations"], [100 * d for d in v["dice"]], color=colours[method], linewidth=1.2,
                linestyle=("-", "--", ":", "-.")[seed["seed"] % 4], label=f"{method}, seed {seed['seed']}")
        chosen.append((v["best_iteration"], 100 * v["best_dice"]))
    ax.plot(*zip(*chosen), linestyle="none", marker="*", markersize=10, color="black", label="chosen weights")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation Dice (%)")
    ax.set_title(f"{title}: validation during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


FIGURES = ("dice_by_case.png", "validation.png")  # every figure write_figures may draw


def write_figures(results: dict, out: Path, title: str, stage: Callable[[Path], Path] | None = None) -> list[Path]:
    """``dice_by_case.png`` and ``validation.png`` in ``out``, for what ``results`` holds;
    with ``stage`` (:func:`~VQMedSegLib.files.atomic_files`), each to the path it gives."""
    figures = zip(FIGURES, (figure_dice_by_case(results, title), figure_validation(results, title)))
    written = []
    for name, fig in figures:
        if fig is not None:
            save_png(fig, stage(out / name) if stage else out / name)
            written.append(out / name)
    return written
