"""benchmarks/run_accuracy.py: finished parts are read back, and the headline figures and
targets come from their results (the runs themselves take hours; see benchmarks/README.md)."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import run_accuracy  # noqa: E402


def _write_part(out: Path, name: str, run: dict, results: dict) -> None:
    folder = out / name
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"seconds": 600.0, "versions": {"torch": "x"}, **run}))
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "results.md").write_text(f"# {name}\n\n| table of {name} |\n")


def test_accuracy_report_reads_finished_parts_and_judges_the_targets(tmp_path, capsys):
    acdc = run_accuracy.part_settings("acdc-10", "cpu", 3)
    chaos = run_accuracy.part_settings("chaos-begal", "cpu", 3)
    _write_part(tmp_path, "acdc-10", {k: v for k, v in acdc.items() if k != "kind"} | {"split": {"rule": "test.list patients"},
                                                                                      "threads": 2, "cpu_capability": "AVX2"},
                {"supervised": {"dice_mean": 0.60}, "vqseg": {"dice_mean": 0.78}, "supervised-full": {"dice_mean": 0.80}})
    _write_part(tmp_path, "chaos-begal", {k: v for k, v in chaos.items() if k != "kind"} | {"description": "slabs"},
                {"begal": {"labeled_fraction": [0.2, 0.3, 0.4], "dice_mean": [0.80, 0.85, 0.905]},
                 "random": {"labeled_fraction": [0.2, 0.3, 0.4], "dice_mean": [0.80, 0.86, 0.89]}})

    assert run_accuracy.main(["--out", str(tmp_path), "--only", "acdc-10,chaos-begal"]) == 0

    summary = json.loads((tmp_path / "accuracy.json").read_text(encoding="utf-8"))
    assert all(part["reused"] for part in summary["parts"].values())
    assert summary["figures"]["acdc_vqseg10_vs_full_ratio"] == pytest.approx(0.975)
    assert summary["figures"]["chaos_begal_minus_random_at_40"] == pytest.approx(1.5)
    assert summary["figures"]["chaos_budget_at_last_round"] == pytest.approx(0.4)
    assert summary["targets"]["acdc_vqseg10_vs_full_ratio"]["met"] is True
    assert summary["targets"]["chaos_begal_minus_random_at_40"]["met"] is False
    assert summary["parts"]["acdc-10"]["split"] == {"rule": "test.list patients"}
    report = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert "| table of chaos-begal |" in report and "**no**" in report
    # each part's time with the threads its run recorded (not the reporting process's)
    assert summary["parts"]["acdc-10"]["threads"] == 2 and summary["parts"]["chaos-begal"]["threads"] is None
    # and the instruction set its kernels used, where the run recorded it
    assert summary["parts"]["acdc-10"]["cpu_capability"] == "AVX2" and summary["parts"]["chaos-begal"]["cpu_capability"] is None
    assert "## acdc-10 (10 min, 2 threads, AVX2)" in report and "## chaos-begal (10 min, threads not recorded)" in report


def test_a_single_seed_difference_is_shown_without_a_spread(tmp_path):
    _report_on(tmp_path, {"acdc-10": {"supervised": [0.60], "vqseg": [0.55], "supervised-full": [0.75]}}, seeds=1)
    report = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert "| acdc-10/vqseg | acdc-10/supervised | -5.00 | -5.00 | 0 of 1 |" in report


def test_a_part_run_with_other_settings_is_not_reused():
    settings = run_accuracy.part_settings("chaos-begal", "cpu", 3)
    recorded = {**{k: v for k, v in settings.items() if k != "kind"}, "seeds": [0]}
    assert run_accuracy.recorded_settings(recorded, settings) != settings
    recorded["seeds"] = [0, 1, 2]
    assert run_accuracy.recorded_settings(recorded, settings) == settings


def test_the_chaos_budgets_are_shares_of_the_pool_and_a_run_that_recorded_counts_is_read_back():
    """20% initial and rounds of 10% (to 40%, or 50% on a GPU) mean the same on the one CT
    patient's 40 pool slices and on a pool of the CHAOS training set's 20 patients."""
    settings = run_accuracy.part_settings("chaos-begal", "cpu", 3)
    assert (settings["initial"], settings["rounds"], settings["per_round"]) == ("20%", 2, "10%")
    gpu = run_accuracy.part_settings("chaos-begal", "gpu", 3)
    assert (gpu["initial"], gpu["rounds"], gpu["per_round"]) == ("20%", 3, "10%")
    # a run from before the budgets were shares recorded its counts: 8 and 4 of a 40-slice pool
    run = {**{k: v for k, v in settings.items() if k != "kind"}, "initial": 8, "per_round": 4, "pool_slices": 40}
    assert run_accuracy.recorded_settings(run, settings) == settings
    run["pool_slices"] = 1350  # the same counts of a larger pool are another budget
    assert run_accuracy.recorded_settings(run, settings) != settings
    run.pop("pool_slices")
    assert run_accuracy.recorded_settings(run, settings) != settings


def test_a_part_run_with_other_preset_values_is_not_reused():
    settings = run_accuracy.part_settings("acdc-10", "cpu", 3)
    run = {k: v for k, v in settings.items() if k != "kind"}
    # the experiment records the seed and the number of structures of its own run
    run["config"] = {**settings["config"], "seed": 2, "num_classes": 4}
    assert run_accuracy.recorded_settings(run, settings) == settings
    # a key the run predates reads as the default, as the code of that run behaved
    run["config"] = {k: v for k, v in run["config"].items() if k != "augment"}
    assert run_accuracy.recorded_settings(run, settings) == settings
    # a preset whose values changed since the run is rerun
    run["config"] = {**settings["config"], "iterations": settings["config"]["iterations"] + 100}
    assert run_accuracy.recorded_settings(run, settings) != settings
    run["config"] = {**settings["config"], "a_key_no_longer_known": 1}
    assert run_accuracy.recorded_settings(run, settings) != settings


def _ssl_results(**rows):
    return {m: {"dice_mean": sum(d) / len(d), "per_seed": [{"seed": k, "dice_mean": v} for k, v in enumerate(d)]}
            for m, d in rows.items()}


def _with_post_processing(gain: float):
    """Results whose every row also records a clean-up chosen on validation, ``gain`` above its Dice."""

    def results_of(name, rows):
        results = _ssl_results(**rows)
        for m in results:
            results[m]["post_processing"] = {"dice_mean": results[m]["dice_mean"] + gain}
        return results

    return results_of


def _report_on(out: Path, parts: dict, results_of=lambda name, rows: _ssl_results(**rows), seeds: int = 3) -> dict:
    """Writes each part's rows (method -> Dice per seed) as a finished part with the part's
    own settings, runs the report over them and returns ``accuracy.json``."""
    for name, rows in parts.items():
        settings = run_accuracy.part_settings(name, "cpu", seeds)
        _write_part(out, name, {k: v for k, v in settings.items() if k != "kind"}, results_of(name, rows))
    assert run_accuracy.main(["--out", str(out), "--only", ",".join(parts), "--seeds", str(seeds)]) == 0
    return json.loads((out / "accuracy.json").read_text(encoding="utf-8"))


def test_seed_paired_differences_pair_rows_of_the_same_labelled_slices(tmp_path):
    summary = _report_on(tmp_path, {"acdc-10": {"supervised": [0.60, 0.57, 0.66], "vqseg": [0.51, 0.56, 0.54],
                                                "supervised-full": [0.75, 0.70, 0.75]},
                                    "acdc-10-vq": {"vqseg-labelled": [0.48, 0.53, 0.50], "vqseg-nodb": [0.60, 0.57, 0.59]}})
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    d = paired[("acdc-10/vqseg", "acdc-10/supervised")]
    assert d["per_seed"] == pytest.approx([-9.0, -1.0, -12.0]) and d["mean"] == pytest.approx(-22 / 3) and d["a_higher"] == 0
    d = paired[("acdc-10/vqseg", "acdc-10-vq/vqseg-labelled")]
    assert d["per_seed"] == pytest.approx([3.0, 3.0, 4.0]) and d["a_higher"] == 3
    assert ("acdc-10/vqseg", "acdc-10-vq/vqseg-nodb") in paired
    # rows of parts on other seeds or another labelled fraction are never paired
    for change in ({"seeds": [5, 6, 7]}, {"labeled_fraction": 0.05}):
        parts = {**summary["parts"], "acdc-10-vq": {**summary["parts"]["acdc-10-vq"]}}
        parts["acdc-10-vq"]["settings"] = {**parts["acdc-10-vq"]["settings"], **change}
        assert {(d["a"], d["b"]) for d in run_accuracy.paired_differences(parts)} == {("acdc-10/vqseg", "acdc-10/supervised")}
    report = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert "| acdc-10/vqseg | acdc-10-vq/vqseg-labelled | +3.00 / +3.00 / +4.00 | +3.33 ± 0.47 | 3 of 3 |" in report


def test_the_long_schedule_part_is_acdc_10_with_three_times_the_iterations():
    short = run_accuracy.part_settings("acdc-10", "cpu", 3)
    long = run_accuracy.part_settings("acdc-10-long", "cpu", 3)
    assert long["config"]["iterations"] == 3 * short["config"]["iterations"] == 1800
    # everything else is acdc-10's: the same split, labelled slices, rows, warm-up and ramp
    assert {**long, "config": {**long["config"], "iterations": 600}} == short
    # the two CLI commands of benchmarks/README.md record the settings the part reruns from
    run = {k: v for k, v in long.items() if k != "kind"}
    assert run_accuracy.recorded_settings(run, long) == long
    run["config"] = {**long["config"], "iterations": 600}
    assert run_accuracy.recorded_settings(run, long) != long
    # and the part trains with exactly the configuration it records
    from VQMedSegLib.config import vqseg_config_from_preset

    config = run_accuracy.part_config(long)
    assert config.iterations == 1800 and config.warmup_supervised == 100 and config.rampup == 300
    assert config == vqseg_config_from_preset("quick", iterations=1800)
    assert run_accuracy.part_config(short) == vqseg_config_from_preset("quick")
    from VQMedSegLib.config import begal_config_from_preset

    assert run_accuracy.part_config(run_accuracy.part_settings("chaos-begal", "cpu", 3)) == begal_config_from_preset("cpu")


# acdc-10-val's rows (method -> Dice per seed), for the report tests of the parts beside it
VAL_ROWS = {"supervised": [0.64, 0.62, 0.66], "vqseg": [0.68, 0.66, 0.67], "supervised-full": [0.78, 0.80, 0.79]}
# acdc-10-val-nopfa's rows, for its test and the fading alignment's
NOPFA_ROWS = {"supervised": [0.63, 0.62, 0.65], "vqseg": [0.67, 0.66, 0.68], "vqseg-nopfa": [0.72, 0.71, 0.69],
              "supervised-full": [0.76, 0.75, 0.77]}

# acdc-10-long's rows and its ablation's (method -> Dice per seed), for the two tests below
LONG_ABLATION_ROWS = {
    "acdc-10-long": {"supervised": [0.65, 0.64, 0.69], "vqseg": [0.68, 0.68, 0.71], "supervised-full": [0.80, 0.79, 0.78]},
    "acdc-10-long-ablation": {"vqseg-labelled": [0.62, 0.66, 0.65], "vqseg-nopfa": [0.67, 0.69, 0.70],
                              "vqseg-noqpm": [0.68, 0.67, 0.72]}}


def test_the_long_ablation_part_is_acdc_10_long_without_one_component_and_is_paired_with_it(tmp_path):
    """Where VQ-Seg's margin over the U-Net at 1,800 iterations comes from: acdc-10-long's
    schedule and labelled slices, VQ-Seg's network on the labelled slices alone and VQ-Seg
    without PFA or QPM, each paired with acdc-10-long's VQ-Seg and U-Net rows."""
    long = run_accuracy.part_settings("acdc-10-long", "cpu", 3)
    ablation = run_accuracy.part_settings("acdc-10-long-ablation", "cpu", 3)
    assert ablation == {**long, "methods": ["vqseg-labelled", "vqseg-nopfa", "vqseg-noqpm"]}
    assert "acdc-10-long-ablation" not in run_accuracy.parts_of("gpu")
    summary = _report_on(tmp_path, LONG_ABLATION_ROWS)
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    assert paired[("acdc-10-long/vqseg", "acdc-10-long-ablation/vqseg-labelled")]["per_seed"] == pytest.approx([6.0, 2.0, 6.0])
    assert paired[("acdc-10-long/vqseg", "acdc-10-long-ablation/vqseg-nopfa")]["a_higher"] == 2
    assert paired[("acdc-10-long/vqseg", "acdc-10-long-ablation/vqseg-noqpm")]["mean"] == pytest.approx(0.0)
    assert paired[("acdc-10-long-ablation/vqseg-labelled", "acdc-10-long/supervised")]["per_seed"] == pytest.approx([-3.0, 2.0, -4.0])
    # never paired with the 600-iteration rows of acdc-10, which train on the same slices for a third as long
    assert not any(d["b"].startswith("acdc-10/") or d["a"].startswith("acdc-10/") for d in summary["paired"])


def test_a_pair_of_rows_run_in_installs_with_other_package_versions_is_marked(tmp_path):
    summary = _report_on(tmp_path, LONG_ABLATION_ROWS)
    assert all(d["versions_differ"] == [] for d in summary["paired"])
    assert "†" not in (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    run_file = tmp_path / "acdc-10-long-ablation" / "run.json"
    run = json.loads(run_file.read_text(encoding="utf-8"))
    run_file.write_text(json.dumps({**run, "versions": {"torch": "x", "numpy": "2.4.6"}}), encoding="utf-8")
    long_file = tmp_path / "acdc-10-long" / "run.json"
    long_run = json.loads(long_file.read_text(encoding="utf-8"))
    long_file.write_text(json.dumps({**long_run, "versions": {"torch": "x", "numpy": "2.3.5"}}), encoding="utf-8")
    assert run_accuracy.main(["--out", str(tmp_path), "--only", "acdc-10-long,acdc-10-long-ablation"]) == 0
    summary = json.loads((tmp_path / "accuracy.json").read_text(encoding="utf-8"))
    paired = {(d["a"], d["b"]): d["versions_differ"] for d in summary["paired"]}
    assert paired[("acdc-10-long/vqseg", "acdc-10-long-ablation/vqseg-nopfa")] == ["numpy"]
    assert paired[("acdc-10-long/vqseg", "acdc-10-long/supervised")] == []  # one part, one install
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert "| acdc-10-long/vqseg † | acdc-10-long-ablation/vqseg-nopfa |" in md
    assert "| acdc-10-long/vqseg | acdc-10-long/supervised |" in md
    assert "† The two rows ran with other versions of numpy" in md


def test_the_chaos_mr_long_part_is_chaos_mr_10_with_three_times_the_iterations():
    short = run_accuracy.part_settings("chaos-mr-10", "cpu", 3)
    long = run_accuracy.part_settings("chaos-mr-10-long", "cpu", 3)
    assert {**long, "config": {**long["config"], "iterations": 600}} == short
    assert run_accuracy.part_config(long).iterations == 1800
    assert "chaos-mr-10-long" not in run_accuracy.parts_of("gpu")
    val = run_accuracy.part_settings("chaos-mr-10-val", "cpu", 3)
    assert {**val, "validation_patients": 0, "validate_every": 0} == long
    assert (val["validation_patients"], val["validate_every"]) == (3, 100)


def test_a_part_of_one_preset_only_is_left_out_of_the_others(tmp_path, capsys):
    assert "acdc-10-long" in run_accuracy.parts_of("cpu")
    assert "acdc-10-long" not in run_accuracy.parts_of("gpu") and "acdc-10" in run_accuracy.parts_of("gpu")
    with pytest.raises(SystemExit):
        run_accuracy.main(["--out", str(tmp_path), "--preset", "gpu", "--only", "acdc-10-long"])
    err = capsys.readouterr().err
    assert "acdc-10-long" in err and "cpu" in err


def test_the_long_schedule_figures_are_reported_beside_the_preset_ones(tmp_path):
    summary = _report_on(tmp_path, {"acdc-10": {"supervised": [0.60, 0.57, 0.66], "vqseg": [0.51, 0.56, 0.54],
                                                "supervised-full": [0.75, 0.70, 0.75]},
                                    "acdc-10-long": {"supervised": [0.63, 0.63, 0.66], "vqseg": [0.65, 0.64, 0.66],
                                                     "supervised-full": [0.79, 0.78, 0.79]}})
    assert summary["figures"]["acdc_vqseg10_vs_full_ratio"] == pytest.approx(1.61 / 2.2)
    assert summary["figures"]["acdc_vqseg10_vs_full_ratio_long"] == pytest.approx(1.95 / 2.36)
    assert summary["targets"]["acdc_vqseg10_vs_full_ratio"]["value"] == summary["figures"]["acdc_vqseg10_vs_full_ratio"]
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    assert paired[("acdc-10-long/vqseg", "acdc-10-long/supervised")]["per_seed"] == pytest.approx([2.0, 1.0, 0.0])
    assert paired[("acdc-10-long/vqseg", "acdc-10/vqseg")]["a_higher"] == 3
    assert "training length" in (tmp_path / "accuracy.md").read_text(encoding="utf-8")


def test_the_validation_part_chooses_weights_on_held_out_training_patients():
    short = run_accuracy.part_settings("acdc-10", "cpu", 3)
    val = run_accuracy.part_settings("acdc-10-val", "cpu", 3)
    assert (val["validation_patients"], val["validate_every"], val["config"]["iterations"]) == (2, 100, 3000)
    assert (short["validation_patients"], short["validate_every"]) == (0, 0)
    assert "acdc-10-val" not in run_accuracy.parts_of("gpu")
    longer = run_accuracy.part_settings("acdc-10-val-long", "cpu", 3)
    assert longer == {**val, "config": {**val["config"], "iterations": 5000}}
    # the CLI's run.json records the settings the part reruns from
    run = {k: v for k, v in val.items() if k != "kind"}
    assert run_accuracy.recorded_settings(run, val) == val
    assert run_accuracy.recorded_settings({**run, "validation_patients": 0}, val) != val
    # a run.json written before validation existed ran without it: still read back
    old = {k: v for k, v in short.items() if k not in ("kind", "validation_patients", "validate_every")}
    assert run_accuracy.recorded_settings(old, short) == short


def test_the_validation_part_figures_and_pairs_stay_within_its_own_training_set(tmp_path):
    rows = {"acdc-10": {"supervised": [0.60, 0.57, 0.66], "vqseg": [0.51, 0.56, 0.54], "supervised-full": [0.75, 0.70, 0.75]},
            "acdc-10-val": VAL_ROWS,
            "acdc-10-val-long": {"supervised": [0.63, 0.62, 0.66], "vqseg": [0.70, 0.69, 0.67], "supervised-full": [0.77, 0.80, 0.79]}}

    def with_last_iteration(name, r):  # the validation parts also test their last weights, 0.01 lower here
        results = _ssl_results(**r)
        if name.startswith("acdc-10-val"):
            for m in results:
                results[m]["last_iteration"] = {"dice_mean": results[m]["dice_mean"] - 0.01}
        if name == "acdc-10-val":  # and (runs since it was added) with the clean-up chosen on validation, 0.02 higher
            for m in results:
                results[m]["post_processing"] = {"dice_mean": results[m]["dice_mean"] + 0.02}
        return results

    summary = _report_on(tmp_path, rows, with_last_iteration)
    assert summary["figures"]["acdc_vqseg10_vs_full_ratio_val"] == pytest.approx(2.01 / 2.37)
    assert summary["figures"]["acdc_vqseg10_vs_full_ratio_val_last"] == pytest.approx((0.67 - 0.01) / (0.79 - 0.01))
    assert summary["figures"]["acdc_vqseg10_vs_full_ratio_val_long"] == pytest.approx(2.06 / 2.36)
    assert summary["figures"]["acdc_vqseg10_vs_full_ratio_val_postprocessed"] == pytest.approx(0.69 / 0.81)
    assert "acdc_vqseg10_vs_full_ratio_val_long_postprocessed" not in summary["figures"]
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    pairs = set(paired)
    assert ("acdc-10-val/vqseg", "acdc-10-val/supervised") in pairs
    # the same training patients and labelled slices: the longer schedule's gain, seed by seed
    assert paired[("acdc-10-val-long/vqseg", "acdc-10-val/vqseg")]["per_seed"] == pytest.approx([2.0, 3.0, 0.0])
    assert paired[("acdc-10-val-long/supervised-full", "acdc-10-val/supervised-full")]["a_higher"] == 0
    assert paired[("acdc-10-val-long/supervised", "acdc-10-val/supervised")]["per_seed"] == pytest.approx([-1.0, 0.0, 0.0])
    # other training patients, so other labelled slices: never paired with acdc-10's rows
    assert not any("acdc-10-val" in a and "acdc-10/" in b or "acdc-10/" in a and "acdc-10-val" in b for a, b in pairs)
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert "With 3,000 iterations and each row's weights chosen on two held-out training patients" in md
    assert "With 5,000 iterations and each row's weights chosen on two held-out training patients" in md
    assert "with the largest-piece clean-up chosen per structure on the same patients 0.852" in md


def test_the_twenty_patient_part_tests_on_the_patients_of_its_list_and_pairs_only_within_it(tmp_path, monkeypatch):
    from VQMedSegLib.training.ssl_experiment import read_test_list

    val = run_accuracy.part_settings("acdc-10-val", "cpu", 3)
    wide = run_accuracy.part_settings("acdc-10-val-20train", "cpu", 3)
    assert val["test_list"] is None
    assert wide == {**val, "test_list": "acdc-test-half.list"}
    listed = read_test_list(run_accuracy.SPLITS / wide["test_list"])
    assert len(listed) == 10 and all(i.startswith("patient") for i in listed)
    # acdc-10-val's folder (the published test list) is not read back as this part
    assert run_accuracy.recorded_settings({k: v for k, v in val.items() if k != "kind"}, wide) != wide

    rows = {"acdc-10-val": VAL_ROWS,
            "acdc-10-val-20train": {"supervised": [0.70, 0.72, 0.68], "vqseg": [0.78, 0.77, 0.79], "supervised-full": [0.82, 0.83, 0.81]}}
    # even a pair asked for across the two parts is refused: other training patients, other labelled slices
    monkeypatch.setattr(run_accuracy, "PAIRED", run_accuracy.PAIRED + [(("acdc-10-val-20train", "vqseg"), ("acdc-10-val", "vqseg"))])
    summary = _report_on(tmp_path, rows)
    assert summary["figures"]["acdc_vqseg10_vs_full_ratio_val_20train"] == pytest.approx(2.34 / 2.46)
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    assert paired[("acdc-10-val-20train/vqseg", "acdc-10-val-20train/supervised")]["per_seed"] == pytest.approx([8.0, 5.0, 11.0])
    assert ("acdc-10-val-20train/vqseg", "acdc-10-val/vqseg") not in paired
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert "(`acdc-10-val-20train`, test patients those of `acdc-test-half.list`), VQ-Seg at 10% reaches 0.951" in md


def test_the_chaos_mr_ceiling_part_gives_liver_on_mr_its_ratio_to_full_supervision(tmp_path):
    val = run_accuracy.part_settings("chaos-mr-10-val", "cpu", 3)
    ceiling = run_accuracy.part_settings("chaos-mr-10-val-long", "cpu", 3)
    assert "chaos-mr-10-val-long" not in run_accuracy.parts_of("gpu")
    # chaos-mr-10-val's split and labelled slices, 3,000 iterations, and the fully supervised row
    assert ceiling == {**val, "methods": ["supervised", "vqseg", "supervised-full"],
                       "config": {**val["config"], "iterations": 3000}}
    rows = {"chaos-mr-10-val": {"supervised": [0.85, 0.86, 0.82], "vqseg": [0.80, 0.81, 0.83]},
            "chaos-mr-10-val-long": {"supervised": [0.86, 0.85, 0.83], "vqseg": [0.84, 0.83, 0.85],
                                     "supervised-full": [0.90, 0.91, 0.89]}}
    summary = _report_on(tmp_path, rows)
    assert summary["figures"]["chaos_mr_vqseg10_vs_full_ratio_val_long"] == pytest.approx(2.52 / 2.70)
    assert summary["figures"]["chaos_mr_supervised10_vs_full_ratio_val_long"] == pytest.approx(2.54 / 2.70)
    assert not any(k.startswith("acdc_") for k in summary["figures"])
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    # the same training patients and labelled slices: the longer schedule's gain, seed by seed
    assert paired[("chaos-mr-10-val-long/vqseg", "chaos-mr-10-val/vqseg")]["per_seed"] == pytest.approx([4.0, 2.0, 2.0])
    assert paired[("chaos-mr-10-val-long/vqseg", "chaos-mr-10-val-long/supervised")]["per_seed"] == pytest.approx([-2.0, -2.0, 2.0])
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert ("With 3,000 iterations and each row's weights chosen on three held-out training patients "
            "(`chaos-mr-10-val-long`), VQ-Seg at 10% reaches 0.933 of the fully supervised Dice of the liver on MR") in md


def test_rows_with_per_case_scores_are_also_paired_case_by_case_with_a_wilcoxon_test(tmp_path):
    # six test cases; VQ-Seg above the U-Net on five of them, by 1 to 5 points (mean over the seeds)
    gains = {"c1": 0.01, "c2": 0.02, "c3": 0.03, "c4": 0.04, "c5": 0.05, "c6": -0.005}

    def with_cases(name, rows):
        results = _ssl_results(**rows)
        for method, r in results.items():
            for s in r["per_seed"]:
                lift = gains if method == "vqseg" else dict.fromkeys(gains, 0.0)
                s["cases"] = {c: {"liver": 0.8 + lift[c] + 0.01 * s["seed"]} for c in gains}
                if name == "chaos-mr-10-val-long":  # with the largest piece kept, the U-Net is 2 points above on c1-c4
                    lc = dict.fromkeys(gains, 0.0) if method == "vqseg" else {**dict.fromkeys(gains, 0.0),
                                                                            "c1": .02, "c2": .02, "c3": .02, "c4": .02}
                    s["largest_component"] = {"dice_mean": 0.9, "cases": {c: {"liver": 0.9 + lc[c]} for c in gains}}
        if name == "chaos-mr-10-val":  # written before per-case scores were kept
            for r in results.values():
                for s in r["per_seed"]:
                    del s["cases"]
        return results

    summary = _report_on(tmp_path, {"chaos-mr-10-val": {"supervised": [0.85, 0.86, 0.82], "vqseg": [0.80, 0.81, 0.83]},
                                    "chaos-mr-10-val-long": {"supervised": [0.86, 0.85, 0.83], "vqseg": [0.84, 0.83, 0.85],
                                                             "supervised-full": [0.90, 0.91, 0.89]}}, with_cases)
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    cases = paired[("chaos-mr-10-val-long/vqseg", "chaos-mr-10-val-long/supervised")]["cases"]
    assert cases["n"] == 6 and cases["a_higher"] == 5
    assert cases["per_case"] == pytest.approx({"c1": 1.0, "c2": 2.0, "c3": 3.0, "c4": 4.0, "c5": 5.0, "c6": -0.5})
    assert cases["mean"] == pytest.approx(14.5 / 6) and cases["median"] == pytest.approx(2.5)
    # exact two-sided signed-rank test: the one loss has the smallest rank, so W = 1 of 21 and p = 4/64
    assert cases["wilcoxon_p"] == pytest.approx(4 / 64)
    # and again on the scores with each structure's largest piece kept, where both rows kept them
    lc = paired[("chaos-mr-10-val-long/vqseg", "chaos-mr-10-val-long/supervised")]["cases_largest_component"]
    assert lc["per_case"] == pytest.approx({"c1": -2.0, "c2": -2.0, "c3": -2.0, "c4": -2.0, "c5": 0.0, "c6": 0.0})
    assert lc["a_higher"] == 0 and lc["n"] == 6 and lc["wilcoxon_p"] == pytest.approx(0.125)  # ties dropped: 4 of 4
    # a row without per-case scores is paired by seed only
    assert "cases" not in paired[("chaos-mr-10-val-long/vqseg", "chaos-mr-10-val/vqseg")]
    assert "cases_largest_component" not in paired[("chaos-mr-10-val-long/vqseg", "chaos-mr-10-val/vqseg")]
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert ("| chaos-mr-10-val-long/vqseg | chaos-mr-10-val-long/supervised | as predicted | 6 | +2.42 | +2.50 "
            "| 5 of 6 | 5 of 6 | 0.062 |") in md
    assert ("| chaos-mr-10-val-long/vqseg | chaos-mr-10-val-long/supervised | largest piece | 6 | -1.33 | -2.00 "
            "| 0 of 6 | 0 of 6 | 0.125 |") in md


def test_a_parts_own_sections_sit_under_its_heading_in_the_report(tmp_path):
    settings = run_accuracy.part_settings("chaos-mr-10", "cpu", 3)
    _write_part(tmp_path, "chaos-mr-10", {k: v for k, v in settings.items() if k != "kind"},
                _ssl_results(supervised=[0.85, 0.86, 0.82], vqseg=[0.80, 0.81, 0.83]))
    (tmp_path / "chaos-mr-10" / "results.md").write_text("# title\n\n| summary |\n\n## Dice per test case (%)\n\n| case |\n",
                                                          encoding="utf-8")
    assert run_accuracy.main(["--out", str(tmp_path), "--only", "chaos-mr-10"]) == 0
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert "## chaos-mr-10 (10 min, threads not recorded)\n\n| summary |\n\n### Dice per test case (%)\n" in md


def test_speed_benchmark_writes_its_figures_with_the_machine_they_were_measured_on(tmp_path):
    """run_speed.py end to end on its cheapest section (a few seconds); times are reported, never asserted."""
    import subprocess

    import torch

    script = str(REPO / "benchmarks" / "run_speed.py")
    done = subprocess.run([sys.executable, script, "--out", str(tmp_path), "--only", "training", "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    speed = json.loads((tmp_path / "speed.json").read_text(encoding="utf-8"))
    assert set(speed["sections"]) == {"training"} and speed["sections"]["training"]["vqseg_step_s"] > 0
    env = speed["environment"]
    assert env["threads"] == 1 and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu_model"]
    report = (tmp_path / "speed.md").read_text(encoding="utf-8")
    assert f"1 thread of {env['cpu_count']} CPUs" in report and f"{env['cpu_capability']} kernels" in report
    # sections not run are said to be not measured, not judged
    assert "| not measured |" in report and "None" not in report and "Training step: VQ-Seg" in report

    wrong = subprocess.run([sys.executable, script, "--out", str(tmp_path / "x"), "--only", "training,trainng"],
                           capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 2 and "--only: unknown section 'trainng'" in wrong.stderr
    assert "assignment, qpm, pool, inference, training" in wrong.stderr and not (tmp_path / "x").exists()


def test_the_inference_section_is_measured_in_a_fresh_process_of_its_own():
    """A section run fresh comes back from another process, marked as such; a child that
    fails says which section and why."""
    import os

    import run_speed

    assert run_speed.FRESH_PROCESS_SECTIONS == ("inference",)
    section = run_speed.section_in_fresh_process("training", threads=1)  # the cheapest section
    assert section["process"] == "fresh" and section["pid"] != os.getpid() and section["vqseg_step_s"] > 0
    with pytest.raises(RuntimeError, match="(?s)section 'trainng' in a fresh process failed .*unknown section 'trainng'"):
        run_speed.section_in_fresh_process("trainng", threads=1)


def test_speed_report_gives_each_presets_step_and_what_its_schedule_would_take_at_that_pace():
    import run_speed

    # the CHAOS part of the cpu preset: 300 initial iterations, then 2 rounds of 100 + 100
    cfg, step, iterations, batch = run_speed._begal_stepper("cpu", run_accuracy.PRESETS["cpu"]["rounds"])
    assert iterations == cfg.initial_iterations + 2 * cfg.round_iterations == 700 and batch == "8 labelled + 4 unlabelled"
    row = {"method": "vqseg", "preset": "paper", "accuracy_preset": "gpu", "slice_size": 224, "num_codes": 16384,
           "features": [32, 64, 128, 256, 512], "batch": "8 labelled + 4 unlabelled", "step_s": 9.35,
           "step_peak_extra_mb": None, "schedule_iterations": 100_000, "schedule_hours_here": 9.35 * 100_000 / 3600}
    quick = {**row, "preset": "quick", "accuracy_preset": "cpu", "slice_size": 128, "num_codes": 1024, "step_s": 0.4,
             "step_peak_extra_mb": 42.0, "schedule_iterations": 600, "schedule_hours_here": 0.4 * 600 / 3600}
    result = {"sections": {"presets": {"cpu_vqseg": quick, "gpu_vqseg": row, "wall_seconds": 30.0}},
              "environment": {"vqmedseg": "x", "torch": "x", "python": "3.11", "threads": 2, "cpu_count": 2,
                              "cpu_model": "a CPU", "cpu_capability": "AVX2", "cuda": False}}
    result["targets"] = run_speed.check_targets(result)
    report = run_speed.report(result)
    assert "| vqseg | quick | 128 | 1,024 | 8 labelled + 4 unlabelled | 0.40 | 42 | 600 iterations | 4 min |" in report
    assert "| vqseg | paper | 224 | 16,384 | 8 labelled + 4 unlabelled | 9.35 | n/a | 100,000 iterations | 10.8 days |" in report


def test_the_presets_section_keeps_a_row_per_accuracy_preset_when_two_share_a_library_preset(monkeypatch):
    import types

    import run_speed

    def stepper(preset, *rounds):
        cfg = types.SimpleNamespace(slice_size=64, num_codes=8, features=(4, 8))
        return cfg, lambda: None, 10, "1 labelled + 1 unlabelled"

    shared = {"ssl_preset": "quick", "al_preset": "cpu", "initial": 8, "rounds": 2, "per_round": 4}
    monkeypatch.setattr(run_accuracy, "PRESETS", {"cpu": shared, "cpu-long": {**shared, "rounds": 5}})
    monkeypatch.setattr(run_speed, "_vqseg_stepper", stepper)
    monkeypatch.setattr(run_speed, "_begal_stepper", stepper)
    rows = run_speed.bench_preset_steps()
    assert sorted((r["accuracy_preset"], r["method"], r["preset"]) for r in rows.values()) == [
        ("cpu", "begal", "cpu"), ("cpu", "vqseg", "quick"), ("cpu-long", "begal", "cpu"), ("cpu-long", "vqseg", "quick")]


def test_the_gpu_preset_is_refused_without_a_gpu_unless_the_cpu_is_asked_for(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "acc"
    with pytest.raises(SystemExit) as stop:
        run_accuracy.main(["--out", str(out), "--preset", "gpu", "--only", "acdc-10,chaos-begal"])
    assert stop.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "--preset gpu: no CUDA device found" in err and "acdc-10, chaos-begal" in err and "--device cpu" in err
    assert "run_speed.py --only presets" in err  # where this machine's step times are measured, not quoted
    # asked for explicitly, the CPU runs the part
    started = []

    def run_part(settings, folder, device):
        started.append((settings["preset"], device.type))
        raise KeyboardInterrupt  # stands in for the weeks of training

    monkeypatch.setattr(run_accuracy, "run_part", run_part)
    with pytest.raises(KeyboardInterrupt):
        run_accuracy.main(["--out", str(out), "--preset", "gpu", "--only", "acdc-10", "--device", "cpu"])
    assert started == [("paper", "cpu")]  # the papers' library presets, on the CPU
    # parts already finished (on a GPU machine) are read back on any machine
    for name in ("acdc-10", "chaos-begal"):
        settings = run_accuracy.part_settings(name, "gpu", 3)
        results = ({"supervised": {"dice_mean": 0.80}, "vqseg": {"dice_mean": 0.90}, "supervised-full": {"dice_mean": 0.91}}
                   if name == "acdc-10" else
                   {s: {"labeled_fraction": [0.2, 0.3, 0.4, 0.5], "dice_mean": [0.8, 0.85, 0.87, 0.88]} for s in ("begal", "random")})
        _write_part(out, name, {k: v for k, v in settings.items() if k != "kind"}, results)
    assert run_accuracy.main(["--out", str(out), "--preset", "gpu", "--only", "acdc-10,chaos-begal"]) == 0
    summary = json.loads((out / "accuracy.json").read_text(encoding="utf-8"))
    assert summary["preset"] == "gpu" and all(part["reused"] for part in summary["parts"].values())


def test_the_wide_part_trains_acdc_10_val_on_the_cpu_library_preset_and_is_paired_with_it(tmp_path):
    from VQMedSegLib.config import vqseg_config_from_preset

    val = run_accuracy.part_settings("acdc-10-val", "cpu", 3)
    wide = run_accuracy.part_settings("acdc-10-val-wide", "cpu", 3)
    assert "acdc-10-val-wide" not in run_accuracy.parts_of("gpu")
    # the same split, validation patients, labelled fraction and seeds: the same labelled slices
    same = ("dataset", "labeled_fraction", "methods", "seeds", "validation_patients", "validate_every", "test_list")
    assert {k: wide[k] for k in same} == {k: val[k] for k in same}
    assert (val["preset"], wide["preset"]) == ("quick", "cpu")
    expected = {k: v for k, v in vqseg_config_from_preset("cpu", iterations=2000).to_json().items() if k not in run_accuracy.PER_RUN_KEYS}
    assert wide["config"] == expected
    rows = {"acdc-10-val": {"supervised": [0.61, 0.63, 0.58], "vqseg": [0.70, 0.67, 0.65], "supervised-full": [0.76, 0.79, 0.70]},
            "acdc-10-val-wide": {"supervised": [0.62, 0.64, 0.60], "vqseg": [0.73, 0.72, 0.70], "supervised-full": [0.76, 0.78, 0.71]}}
    summary = _report_on(tmp_path, rows)
    assert summary["figures"]["acdc_vqseg10_vs_full_ratio_val_wide"] == pytest.approx(2.15 / 2.25)
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    assert paired[("acdc-10-val-wide/vqseg", "acdc-10-val/vqseg")]["per_seed"] == pytest.approx([3.0, 5.0, 5.0])
    assert paired[("acdc-10-val-wide/supervised-full", "acdc-10-val/supervised-full")]["mean"] == pytest.approx(0.0)
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert "With 2,000 iterations and each row's weights chosen on two held-out training patients (`acdc-10-val-wide`, " \
           "the `cpu` network), VQ-Seg at 10% reaches 0.956" in md


def test_the_ema_part_sets_vqseg_beside_u_nets_tested_as_its_teacher_is(tmp_path):
    """VQ-Seg is tested with its EMA teacher: `acdc-10-val-ema` trains acdc-10-val's U-Net
    rows again and tests the moving average of their weights, seed-paired with both."""
    val = run_accuracy.part_settings("acdc-10-val", "cpu", 3)
    ema = run_accuracy.part_settings("acdc-10-val-ema", "cpu", 3)
    assert ema == {**val, "methods": ["supervised-ema", "supervised-full-ema"]}
    assert "acdc-10-val-ema" not in run_accuracy.parts_of("gpu")
    rows = {"acdc-10-val": VAL_ROWS,
            "acdc-10-val-ema": {"supervised-ema": [0.65, 0.64, 0.66], "supervised-full-ema": [0.79, 0.80, 0.82]}}
    summary = _report_on(tmp_path, rows)
    assert summary["figures"]["acdc_vqseg10_vs_full_ema_ratio_val"] == pytest.approx(2.01 / 2.41)
    assert summary["figures"]["acdc_vqseg10_vs_full_ratio_val"] == pytest.approx(2.01 / 2.37)
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    assert paired[("acdc-10-val/vqseg", "acdc-10-val-ema/supervised-ema")]["per_seed"] == pytest.approx([3.0, 2.0, 1.0])
    assert paired[("acdc-10-val-ema/supervised-ema", "acdc-10-val/supervised")]["per_seed"] == pytest.approx([1.0, 2.0, 0.0])
    assert paired[("acdc-10-val-ema/supervised-full-ema", "acdc-10-val/supervised-full")]["a_higher"] == 2
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert "against a ceiling tested with the moving average of its weights (`acdc-10-val-ema`), VQ-Seg at 10% reaches 0.834" in md


def test_the_five_percent_validation_part_is_acdc_10_val_at_half_the_labelled_slices(tmp_path):
    """`acdc-5-val` runs acdc-10-val's schedule and validation at 5%: its ratio is taken
    against acdc-10-val's ceiling (the ceiling trains on every slice, whatever the fraction),
    and only when the two ran on the same patients, seeds and configuration."""
    val = run_accuracy.part_settings("acdc-10-val", "cpu", 3)
    five = run_accuracy.part_settings("acdc-5-val", "cpu", 3)
    assert five == {**val, "labeled_fraction": 0.05, "methods": ["supervised", "vqseg"]}
    assert "acdc-5-val" not in run_accuracy.parts_of("gpu")
    rows = {"acdc-10-val": VAL_ROWS,
            "acdc-5-val": {"supervised": [0.55, 0.50, 0.57], "vqseg": [0.60, 0.58, 0.56]}}

    summary = _report_on(tmp_path, rows, _with_post_processing(0.02))
    assert summary["figures"]["acdc_vqseg5_vs_full_ratio_val"] == pytest.approx(1.74 / 2.37)
    assert summary["figures"]["acdc_supervised5_vs_full_ratio_val"] == pytest.approx(1.62 / 2.37)
    assert summary["figures"]["acdc_vqseg5_vs_full_ratio_val_postprocessed"] == pytest.approx(0.60 / 0.81)
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    assert paired[("acdc-5-val/vqseg", "acdc-5-val/supervised")]["per_seed"] == pytest.approx([5.0, 8.0, -1.0])
    # other labelled slices than acdc-10-val's: never paired across the two fractions
    assert not any(a.startswith("acdc-5-val") != b.startswith("acdc-5-val") for a, b in paired)
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert ("With 3,000 iterations and each row's weights chosen on two held-out training patients (`acdc-5-val`), "
            "VQ-Seg at 5% reaches 0.734 of `acdc-10-val`'s fully supervised Dice (the supervised U-Net 0.684; "
            "with the largest-piece clean-up chosen per structure on the same patients 0.741).") in md


def test_the_five_percent_ratio_is_left_out_when_the_ceiling_ran_on_other_settings():
    def part(name, rows, **changed):
        return {"settings": {**run_accuracy.part_settings(name, "cpu", 1), **changed}, "results": _ssl_results(**rows)}

    ceiling = {"supervised": [0.64], "vqseg": [0.68], "supervised-full": [0.78]}
    five = part("acdc-5-val", {"supervised": [0.55], "vqseg": [0.60]})
    figures = run_accuracy.headline({"acdc-10-val": part("acdc-10-val", ceiling), "acdc-5-val": five})
    assert figures["acdc_vqseg5_vs_full_ratio_val"] == pytest.approx(0.60 / 0.78)
    config = run_accuracy.part_settings("acdc-10-val", "cpu", 1)["config"]
    for changed in ({"validation_patients": 3}, {"seeds": [1]}, {"config": {**config, "iterations": 5000}}):
        figures = run_accuracy.headline({"acdc-10-val": part("acdc-10-val", ceiling, **changed), "acdc-5-val": five})
        assert "acdc_vqseg5_vs_full_ratio_val" not in figures, changed


def test_the_codeword_alignment_part_is_acdc_10_val_with_that_row_paired_and_set_against_its_ceiling(tmp_path):
    """`acdc-10-val-pfacodes` trains acdc-10-val's VQ-Seg row again with the alignment on
    the chosen codewords: the same labelled slices and configuration, so it is paired
    with acdc-10-val's rows seed by seed and its ratio is taken against that ceiling."""
    val = run_accuracy.part_settings("acdc-10-val", "cpu", 3)
    codes = run_accuracy.part_settings("acdc-10-val-pfacodes", "cpu", 3)
    assert codes == {**val, "methods": ["vqseg-pfacodes"]}
    assert "acdc-10-val-pfacodes" not in run_accuracy.parts_of("gpu")
    rows = {"acdc-10-val": VAL_ROWS,
            "acdc-10-val-pfacodes": {"vqseg-pfacodes": [0.70, 0.65, 0.71]}}

    summary = _report_on(tmp_path, rows, _with_post_processing(0.01))
    figures = summary["figures"]
    assert figures["acdc_vqseg_pfacodes10_vs_full_ratio_val"] == pytest.approx(2.06 / 2.37)
    assert figures["acdc_vqseg_pfacodes10_vs_full_ratio_val_postprocessed"] == pytest.approx((2.06 / 3 + 0.01) / 0.80)
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    assert paired[("acdc-10-val-pfacodes/vqseg-pfacodes", "acdc-10-val/vqseg")]["per_seed"] == pytest.approx([2.0, -1.0, 4.0])
    assert paired[("acdc-10-val-pfacodes/vqseg-pfacodes", "acdc-10-val/supervised")]["a_higher"] == 3
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert ("With 3,000 iterations and each row's weights chosen on two held-out training patients "
            "(`acdc-10-val-pfacodes`), `vqseg-pfacodes` at 10% reaches 0.869 of `acdc-10-val`'s fully supervised "
            "Dice (with the largest-piece clean-up chosen per structure on the same patients 0.871).") in md
    # the last iteration's weights give their own ratio where both rows recorded them
    parts = json.loads(json.dumps(summary["parts"]))
    parts["acdc-10-val-pfacodes"]["results"]["vqseg-pfacodes"]["last_iteration"] = {"dice_mean": 0.66}
    parts["acdc-10-val"]["results"]["supervised-full"]["last_iteration"] = {"dice_mean": 0.75}
    assert run_accuracy.headline(parts)["acdc_vqseg_pfacodes10_vs_full_ratio_val_last"] == pytest.approx(0.88)
    # a ceiling trained on other settings gives no ratio
    changed = {name: {"settings": {**part["settings"], "seeds": [1, 2, 3]} if name == "acdc-10-val" else part["settings"],
                      "results": part["results"]} for name, part in summary["parts"].items()}
    assert "acdc_vqseg_pfacodes10_vs_full_ratio_val" not in run_accuracy.headline(changed)


def test_the_no_pfa_part_is_acdc_10_val_rerun_with_vqseg_without_pfa_beside_its_own_ceiling(tmp_path):
    """`acdc-10-val-nopfa` trains acdc-10-val's rows again in one install with VQ-Seg
    without PFA beside them: each VQ-Seg row's ratio is taken against the part's own
    ceiling, and the rows are paired within the part, never with acdc-10-val's runs."""
    val = run_accuracy.part_settings("acdc-10-val", "cpu", 3)
    nopfa = run_accuracy.part_settings("acdc-10-val-nopfa", "cpu", 3)
    assert nopfa == {**val, "methods": ["supervised", "vqseg", "vqseg-nopfa", "supervised-full"]}
    assert "acdc-10-val-nopfa" not in run_accuracy.parts_of("gpu")
    rows = {"acdc-10-val": VAL_ROWS,
            "acdc-10-val-nopfa": NOPFA_ROWS}

    summary = _report_on(tmp_path, rows, _with_post_processing(0.01))
    figures = summary["figures"]
    assert figures["acdc_vqseg10_vs_full_ratio_val_nopfa"] == pytest.approx(2.01 / 2.28)
    assert figures["acdc_supervised10_vs_full_ratio_val_nopfa"] == pytest.approx(1.90 / 2.28)
    assert figures["acdc_vqseg_nopfa10_vs_full_ratio_val_nopfa"] == pytest.approx(2.12 / 2.28)
    assert figures["acdc_vqseg10_vs_full_ratio_val"] == pytest.approx(2.01 / 2.37)  # acdc-10-val's own, unchanged
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    assert paired[("acdc-10-val-nopfa/vqseg", "acdc-10-val-nopfa/vqseg-nopfa")]["per_seed"] == pytest.approx([-5.0, -5.0, -1.0])
    assert paired[("acdc-10-val-nopfa/vqseg-nopfa", "acdc-10-val-nopfa/supervised")]["a_higher"] == 3
    assert paired[("acdc-10-val-nopfa/vqseg", "acdc-10-val-nopfa/supervised")]["per_seed"] == pytest.approx([4.0, 4.0, 3.0])
    assert not any({d["a"].split("/")[0], d["b"].split("/")[0]} == {"acdc-10-val", "acdc-10-val-nopfa"} for d in summary["paired"])
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert ("(`acdc-10-val-nopfa`), `vqseg-nopfa` at 10% reaches 0.930 of `acdc-10-val-nopfa`'s fully supervised Dice") in md


def test_the_fading_alignment_part_is_acdc_10_val_with_that_row_paired_with_vqseg_with_and_without_pfa(tmp_path):
    """`acdc-10-val-pfadecay` trains acdc-10-val's VQ-Seg row again with lambda_a fading
    to 0: the same labelled slices and configuration but the schedule, so it is paired
    seed by seed with acdc-10-val's rows and acdc-10-val-nopfa's VQ-Seg without PFA, and
    its ratio is taken against acdc-10-val's ceiling."""
    val = run_accuracy.part_settings("acdc-10-val", "cpu", 3)
    decay = run_accuracy.part_settings("acdc-10-val-pfadecay", "cpu", 3)
    assert decay == {**val, "methods": ["vqseg-pfadecay"]}
    assert "acdc-10-val-pfadecay" not in run_accuracy.parts_of("gpu")
    rows = {"acdc-10-val": VAL_ROWS,
            "acdc-10-val-nopfa": NOPFA_ROWS,
            "acdc-10-val-pfadecay": {"vqseg-pfadecay": [0.71, 0.70, 0.66]}}

    summary = _report_on(tmp_path, rows, _with_post_processing(0.01))
    figures = summary["figures"]
    assert figures["acdc_vqseg_pfadecay10_vs_full_ratio_val"] == pytest.approx(2.07 / 2.37)
    assert figures["acdc_vqseg_pfadecay10_vs_full_ratio_val_postprocessed"] == pytest.approx((2.07 / 3 + 0.01) / 0.80)
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    assert paired[("acdc-10-val-pfadecay/vqseg-pfadecay", "acdc-10-val/vqseg")]["per_seed"] == pytest.approx([3.0, 4.0, -1.0])
    assert paired[("acdc-10-val-pfadecay/vqseg-pfadecay", "acdc-10-val-nopfa/vqseg-nopfa")]["per_seed"] == pytest.approx(
        [-1.0, -1.0, -3.0])
    assert paired[("acdc-10-val-pfadecay/vqseg-pfadecay", "acdc-10-val/supervised")]["a_higher"] == 2  # level on seed 2
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert ("(`acdc-10-val-pfadecay`), `vqseg-pfadecay` at 10% reaches 0.873 of `acdc-10-val`'s fully supervised "
            "Dice") in md


def test_the_warm_up_part_is_acdc_10_val_with_that_row_paired_with_its_rows(tmp_path):
    """`acdc-10-val-warmup` trains acdc-10-val's VQ-Seg row again with the supervised
    warm-up at one sixth of the schedule: the same labelled slices, so it is paired seed by
    seed with acdc-10-val's rows, and its ratio is taken against acdc-10-val's ceiling."""
    val = run_accuracy.part_settings("acdc-10-val", "cpu", 3)
    assert run_accuracy.part_settings("acdc-10-val-warmup", "cpu", 3) == {**val, "methods": ["vqseg-warmup"]}
    assert "acdc-10-val-warmup" not in run_accuracy.parts_of("gpu")
    rows = {"acdc-10-val": VAL_ROWS, "acdc-10-val-warmup": {"vqseg-warmup": [0.70, 0.69, 0.66]}}

    summary = _report_on(tmp_path, rows, _with_post_processing(0.02))
    figures = summary["figures"]
    assert figures["acdc_vqseg_warmup10_vs_full_ratio_val"] == pytest.approx(2.05 / 2.37)
    assert figures["acdc_vqseg_warmup10_vs_full_ratio_val_postprocessed"] == pytest.approx((2.05 / 3 + 0.02) / 0.81)
    assert figures["acdc_vqseg10_vs_full_ratio_val"] == pytest.approx(2.01 / 2.37)  # the headline is the paper's row
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    assert paired[("acdc-10-val-warmup/vqseg-warmup", "acdc-10-val/vqseg")]["per_seed"] == pytest.approx([2.0, 3.0, -1.0])
    assert paired[("acdc-10-val-warmup/vqseg-warmup", "acdc-10-val/supervised")]["a_higher"] == 2  # level on seed 2
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert ("(`acdc-10-val-warmup`), `vqseg-warmup` at 10% reaches 0.865 of `acdc-10-val`'s fully supervised "
            "Dice") in md


def test_the_five_seed_part_is_acdc_10_val_with_its_codeword_row_over_seeds_0_to_4(tmp_path):
    """`acdc-10-val-5seeds` holds acdc-10-val's rows and the codeword alignment's over five
    seeds whatever --seeds says (its first three seeds are those parts' rows, merged with
    seeds 3 and 4): its own ratios, and its pairs within the part only."""
    val = run_accuracy.part_settings("acdc-10-val", "cpu", 3)
    five = run_accuracy.part_settings("acdc-10-val-5seeds", "cpu", 3)
    assert five == {**val, "methods": ["supervised", "vqseg", "vqseg-pfacodes", "supervised-full"], "seeds": [0, 1, 2, 3, 4]}
    assert run_accuracy.part_settings("acdc-10-val-5seeds", "cpu", 7)["seeds"] == [0, 1, 2, 3, 4]
    assert "acdc-10-val-5seeds" not in run_accuracy.parts_of("gpu")
    rows = {"acdc-10-val": {"supervised": [0.64, 0.62, 0.66], "vqseg": [0.70, 0.69, 0.68], "supervised-full": [0.77, 0.76, 0.73]},
            "acdc-10-val-5seeds": {"supervised": [0.64, 0.62, 0.66, 0.60, 0.61], "vqseg": [0.70, 0.69, 0.68, 0.65, 0.62],
                                   "vqseg-pfacodes": [0.72, 0.72, 0.58, 0.67, 0.60],
                                   "supervised-full": [0.77, 0.76, 0.73, 0.75, 0.74]}}

    summary = _report_on(tmp_path, rows, _with_post_processing(0.01))
    figures = summary["figures"]
    assert figures["acdc_vqseg10_vs_full_ratio_val"] == pytest.approx(2.07 / 2.26)
    assert figures["acdc_vqseg10_vs_full_ratio_val_5seeds"] == pytest.approx(3.34 / 3.75)
    assert figures["acdc_supervised10_vs_full_ratio_val_5seeds"] == pytest.approx(3.13 / 3.75)
    assert figures["acdc_vqseg10_vs_full_ratio_val_5seeds_postprocessed"] == pytest.approx((3.34 / 5 + 0.01) / 0.76)
    assert figures["acdc_vqseg_pfacodes10_vs_full_ratio_val_5seeds"] == pytest.approx(3.29 / 3.75)
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    d = paired[("acdc-10-val-5seeds/vqseg-pfacodes", "acdc-10-val-5seeds/vqseg")]
    assert d["per_seed"] == pytest.approx([2.0, 3.0, -10.0, 2.0, -2.0]) and d["seeds"] == [0, 1, 2, 3, 4]
    assert paired[("acdc-10-val-5seeds/vqseg", "acdc-10-val-5seeds/supervised")]["a_higher"] == 5
    # rows of three seeds are not paired with rows of five
    assert not [p for p in paired if {p[0].split("/")[0], p[1].split("/")[0]} == {"acdc-10-val", "acdc-10-val-5seeds"}]
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert ("With 3,000 iterations and each row's weights chosen on two held-out training patients "
            "(`acdc-10-val-5seeds`, five seeds), VQ-Seg at 10% reaches 0.891 of the fully supervised Dice") in md
    assert "(`acdc-10-val-5seeds`, five seeds), `vqseg-pfacodes` at 10% reaches 0.877 of `acdc-10-val-5seeds`'s" in md


def test_the_twenty_patient_five_seed_part_is_acdc_10_val_20train_over_seeds_0_to_4(tmp_path):
    """`acdc-10-val-20train-5seeds` holds acdc-10-val-20train's rows over five seeds whatever
    --seeds says (its first three seeds are that part's rows, merged with seeds 3 and 4):
    its own ratios, and its pairs within the part only."""
    t20 = run_accuracy.part_settings("acdc-10-val-20train", "cpu", 3)
    five = run_accuracy.part_settings("acdc-10-val-20train-5seeds", "cpu", 3)
    assert five == {**t20, "seeds": [0, 1, 2, 3, 4]}
    assert run_accuracy.part_settings("acdc-10-val-20train-5seeds", "cpu", 7)["seeds"] == [0, 1, 2, 3, 4]
    assert "acdc-10-val-20train-5seeds" not in run_accuracy.parts_of("gpu")
    rows = {"acdc-10-val-20train": {"supervised": [0.70, 0.72, 0.68], "vqseg": [0.78, 0.77, 0.79], "supervised-full": [0.82, 0.83, 0.81]},
            "acdc-10-val-20train-5seeds": {"supervised": [0.70, 0.72, 0.68, 0.74, 0.66], "vqseg": [0.78, 0.77, 0.79, 0.72, 0.74],
                                           "supervised-full": [0.82, 0.83, 0.81, 0.84, 0.80]}}

    summary = _report_on(tmp_path, rows, _with_post_processing(0.01))
    figures = summary["figures"]
    assert figures["acdc_vqseg10_vs_full_ratio_val_20train"] == pytest.approx(2.34 / 2.46)
    assert figures["acdc_vqseg10_vs_full_ratio_val_20train_5seeds"] == pytest.approx(3.80 / 4.10)
    assert figures["acdc_supervised10_vs_full_ratio_val_20train_5seeds"] == pytest.approx(3.50 / 4.10)
    assert figures["acdc_vqseg10_vs_full_ratio_val_20train_5seeds_postprocessed"] == pytest.approx((3.80 / 5 + 0.01) / 0.83)
    paired = {(d["a"], d["b"]): d for d in summary["paired"]}
    d = paired[("acdc-10-val-20train-5seeds/vqseg", "acdc-10-val-20train-5seeds/supervised")]
    assert d["per_seed"] == pytest.approx([8.0, 5.0, 11.0, -2.0, 8.0]) and d["seeds"] == [0, 1, 2, 3, 4] and d["a_higher"] == 4
    # rows of three seeds are not paired with rows of five
    assert not [p for p in paired
                if {p[0].split("/")[0], p[1].split("/")[0]} == {"acdc-10-val-20train", "acdc-10-val-20train-5seeds"}]
    md = (tmp_path / "accuracy.md").read_text(encoding="utf-8")
    assert ("(`acdc-10-val-20train-5seeds`, test patients those of `acdc-test-half.list`, five seeds), "
            "VQ-Seg at 10% reaches 0.927 of the fully supervised Dice") in md
