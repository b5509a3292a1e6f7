"""`vqmedseg ssl`: patient-wise splits, every structure scored, the fully supervised ceiling,
and result files that record how they were made."""

import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch

from VQMedSegLib.config import vqseg_config_from_preset
from VQMedSegLib.data.io import write_volume
from VQMedSegLib.data.phantoms import make_dataset
from VQMedSegLib.errors import ConfigError, InputError
from VQMedSegLib.training.ssl_experiment import (BestOnValidation, Case, RowProgress, hold_out_patients, merge_ssl,
                                                   method_config, rows_reading, split_by_patient)
from VQMedSegLib.training.vqseg import VQSegTrainer, build_vqseg

from conftest import run_cli, run_main


def _cases(ids):
    return [Case(i, None, None, "MR") for i in ids]


def test_split_keeps_both_frames_of_a_patient_on_one_side():
    ids = [f"patient{p:03d}_frame0{f}" for p in range(1, 9) for f in (1, 2)]
    train, test = split_by_patient(_cases(ids))
    train_patients = {c.case_id.split("_")[0] for c in train}
    test_patients = {c.case_id.split("_")[0] for c in test}
    assert not train_patients & test_patients
    assert test_patients == {"patient007", "patient008"}  # the last quarter, sorted
    assert len(train) + len(test) == len(ids)


def test_split_follows_a_published_test_list():
    ids = [f"patient{p:03d}_frame0{f}" for p in range(1, 9) for f in (1, 2)]
    # listing one frame puts the whole patient in the test set
    train, test = split_by_patient(_cases(ids), test_list={"patient002_frame01", "patient005_frame02", "patient099_frame01"})
    assert sorted(c.case_id for c in test) == ["patient002_frame01", "patient002_frame02", "patient005_frame01", "patient005_frame02"]
    with pytest.raises(InputError, match="test.list names 0 of the 8 patients"):
        split_by_patient(_cases(ids), test_list={"patient099_frame01"})
    with pytest.raises(InputError, match="test.list names 8 of the 8 patients"):
        split_by_patient(_cases(ids), test_list=set(ids))


def test_ct_slices_are_windowed_as_the_datasets_task_windows_them():
    """Every CT was once windowed at the liver's -160..240 HU, the lung phantom's too: its
    lungs (about -850 HU) were all clipped to 0, while the lung-tumour task (and its
    predictions) see -1000..400."""
    from VQMedSegLib.training.ssl_experiment import _slices, load_cases
    from VQMedSegLib.tasks import get_task

    lung, liver = load_cases("phantom-lung"), load_cases("phantom-liver")
    assert lung.ct_window == get_task("lung-tumour").ct_window and liver.ct_window == get_task("liver").ct_window
    case = lung.cases[0]
    x = _slices(case, 64, lung.ct_window)[1]
    lungs = x[(x > 0) & (x < 0.2)]  # -1000 + 0.1 * 1400 = -860 HU: the parenchyma, inside the window
    assert lungs.size > 0.3 * x.size  # 0.67 here; 0.07 in the liver's window


def test_vqseg_network_has_one_output_per_class():
    config = vqseg_config_from_preset("tiny", num_classes=4)
    net = build_vqseg(config, fm_channels=0).eval()
    out = net(torch.zeros(2, 1, 32, 32), reconstruct=False)
    assert out.logits.shape == (2, 4, 32, 32)
    with pytest.raises(ConfigError, match="'num_classes': found 1, expected at least 2"):
        vqseg_config_from_preset("tiny", num_classes=1)


def test_ssl_scores_every_structure_with_the_ceiling_and_records_its_run(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, case in enumerate(make_dataset("phantom-liver", 4, seed=7, ct_shape=(10, 48, 48))):
        write_volume(case.ct, folder / f"image_{i}.nii.gz")
        write_volume(case.ct_label, folder / f"label_{i}.nii.gz")
    (folder / "test.list").write_text("3\n")
    out = tmp_path / "out"
    run_main("ssl", "--dataset", folder, "--labeled-fraction", "0.2", "--methods", "supervised,supervised-full,vqseg",
             "--seeds", "1", "--preset", "tiny", "--foundation", "none", "--out", out)

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    names = ["label 1", "label 2", "label 3", "label 4"]  # the phantom's liver, kidneys and spleen
    assert run["structures"] == {"1": "label 1", "2": "label 2", "3": "label 3", "4": "label 4"}
    assert run["split"] == {"rule": "test.list patients", "train_cases": ["0", "1", "2"], "test_cases": ["3"]}
    assert run["preset"] == "tiny" and run["seeds"] == [0] and run["seconds"] > 0
    assert {"vqmedseg", "torch", "monai", "python"} <= set(run["versions"])
    # with every package the data and the arithmetic pass through: a new install of the same
    # torch and MONAI moved a U-Net seed by 0.6 Dice points (benchmarks/README.md)
    from importlib.metadata import version

    for package in ("numpy", "scipy", "h5py", "SimpleITK", "scikit-image"):
        assert run["versions"][package] == version(package), package
    assert run["config"]["num_classes"] == 5
    # the run's times mean something only with the threads it had
    assert run["device"] == "cpu" and run["threads"] >= 1 and run["cpu_count"] >= 1
    # and its figures are bit-reproducible only on the same kind of CPU with the same threads
    assert run["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and run["cpu_model"]

    n = run["train_slices"]
    assert results["supervised"]["labelled_slices"] == results["vqseg"]["labelled_slices"] == round(0.2 * n)
    assert results["supervised-full"]["labelled_slices"] == n and results["supervised-full"]["labeled_fraction"] == 1.0
    for method, r in results.items():
        assert list(r["structures"]) == names
        # one test case: its Dice is the mean of its structures' Dice
        structure_mean = np.mean([r["structures"][s]["dice_mean"] for s in names])
        assert r["dice_mean"] == pytest.approx(structure_mean), method
        assert r["hd95_units"] == "mm"
        lc = r["largest_component"]
        assert list(lc["structures"]) == names and lc["hd95_units"] == "mm"
        assert lc["dice_mean"] == pytest.approx(r["per_seed"][0]["largest_component"]["dice_mean"])
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| label 4 Dice (%) |" in table and "| supervised-full | " in table
    assert "| Dice (%), largest component | HD95, largest component |" in table
    # the methods compared case by case: the one test case's Dice, in the table and in a figure
    row = "| 3 | " + " | ".join(f"{100 * np.mean(list(results[m]['per_seed'][0]['cases']['3'].values())):.2f}"
                                for m in ("supervised", "supervised-full", "vqseg")) + " |"
    assert "| case | supervised | supervised-full | vqseg |" in table and row in table
    assert (out / "dice_by_case.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "validation.png").exists()  # no row was validated
    # each row keeps its training losses, averaged over each tenth of its iterations
    iterations = run["config"]["iterations"]
    for method, terms in (("supervised", {"total"}), ("vqseg", {"total", "seg_l", "vq", "perplexity", "seg_qpm"})):
        losses = results[method]["per_seed"][0]["training_losses"]
        assert losses["iterations"][-1] == iterations and len(losses["iterations"]) == 10, method
        assert terms <= set(losses["means"]) and all(len(v) == 10 for v in losses["means"].values()), method


def test_vqseg_labelled_row_never_uses_an_unlabelled_slice():
    rng = np.random.default_rng(0)
    x = rng.random((12, 1, 32, 32), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    base = vqseg_config_from_preset("tiny", iterations=8, warmup_supervised=2, foundation="none")
    for method, semi in (("vqseg-labelled", False), ("vqseg", True)):
        cfg = method_config(method, base, seed=0)
        trainer = VQSegTrainer(cfg, x[:4], y[:4], x[4:], None, 0, torch.device("cpu"))
        keys = set()
        trainer.run(on_step=lambda it, total, losses: keys.update(losses))
        assert ("seg_qpm" in keys) is semi, method
        assert trainer.student.pfa is None


def test_each_setting_is_read_by_the_rows_that_use_it_and_no_other():
    """What `ssl` refuses as a setting no row reads (see test_reliability)."""
    qpm = vqseg_config_from_preset("tiny")
    rows = ["supervised", "supervised-full", "vqseg", "vqseg-noqpm", "vqseg-nodb", "vqseg-nopfa", "vqseg-dropout",
            "vqseg-labelled", "vqseg-pfadecay", "vqseg-warmup"]
    assert rows_reading(rows, qpm) == {
        # vqseg-noqpm has none, vqseg-dropout its own
        "perturbation": ["vqseg", "vqseg-nodb", "vqseg-nopfa", "vqseg-pfadecay", "vqseg-warmup"],
        "dropout_rate": ["vqseg-dropout"],
        "strong_augment": ["vqseg", "vqseg-noqpm", "vqseg-nodb", "vqseg-nopfa", "vqseg-dropout", "vqseg-pfadecay",
                           "vqseg-warmup"],
        "foundation": ["vqseg", "vqseg-noqpm", "vqseg-nodb", "vqseg-dropout", "vqseg-pfadecay", "vqseg-warmup"],
    }
    assert method_config("vqseg-pfadecay", qpm, 3) == qpm.replace(seed=3, lambda_a_schedule="cosine")
    dropout = qpm.replace(perturbation="dropout", use_pfa=False)
    assert rows_reading(["vqseg", "vqseg-noqpm"], dropout) == {
        "perturbation": ["vqseg"], "dropout_rate": ["vqseg"], "strong_augment": ["vqseg", "vqseg-noqpm"], "foundation": []}
    assert rows_reading(["supervised"], qpm) == {"perturbation": [], "dropout_rate": [], "strong_augment": [], "foundation": []}


def test_the_warm_up_row_keeps_the_quick_presets_share_of_the_schedule_whatever_its_length():
    """`vqseg-warmup` trains on the labelled slices alone for one sixth of the iterations,
    the share `quick` gives its own 600 (100): 500 of acdc-10-val's 3,000, where `vqseg`
    keeps 100. Nothing else of the row changes, so at quick's own length it is `vqseg`."""
    quick = vqseg_config_from_preset("quick")
    assert method_config("vqseg-warmup", quick, 1) == method_config("vqseg", quick, 1)
    long = quick.replace(iterations=3000)
    assert method_config("vqseg", long, 2).warmup_supervised == 100
    assert method_config("vqseg-warmup", long, 2) == long.replace(seed=2, warmup_supervised=500)
    assert method_config("vqseg-warmup", quick.replace(iterations=5000), 0).warmup_supervised == 833
    # the row sets the warm-up itself, over a --config file's
    assert method_config("vqseg-warmup", long.replace(warmup_supervised=40), 0).warmup_supervised == 500


def test_every_prediction_is_also_scored_with_its_largest_component_only():
    from VQMedSegLib.data.volume import Volume
    from VQMedSegLib.training.ssl_experiment import _evaluate, _prepare

    truth = np.zeros((6, 32, 32), np.uint8)
    truth[1:5, 4:16, 4:16] = 1
    hu = np.where(truth == 1, 200, -100).astype(np.int16)
    hu[2:4, 24:30, 24:30] = 200  # looks like the structure, far from it: a false island
    image = Volume(hu, (1.0, 1.0, 2.0))
    case = Case("c", image, image.with_array(truth), "CT")

    def predict(x):  # foreground wherever the slice is bright
        fg = (x > (x.min() + x.max()) / 2).astype(np.float32)
        return np.concatenate([1 - fg, fg], axis=1)

    raw, largest = _evaluate(predict, _prepare([case], 32, (-160.0, 240.0)), {1: "liver"})
    assert raw[0]["liver"].dice < 0.95 and raw[0]["liver"].hd95 > 10
    assert largest[0]["liver"].dice == pytest.approx(1.0) and largest[0]["liver"].hd95 == pytest.approx(0.0)


def test_validation_patients_are_the_last_training_patients_with_all_their_frames():
    ids = [f"patient{p:03d}_frame0{f}" for p in range(1, 6) for f in (1, 2)]
    train, val = hold_out_patients(_cases(ids), 2)
    assert sorted(c.case_id for c in val) == [f"patient00{p}_frame0{f}" for p in (4, 5) for f in (1, 2)]
    assert len(train) == 6 and not {c.case_id for c in train} & {c.case_id for c in val}
    assert hold_out_patients(_cases(ids), 0) == (_cases(ids), [])
    with pytest.raises(InputError, match="--validation-patients 5: expected 0 to 4 .the training set has 5 patients"):
        hold_out_patients(_cases(ids), 5)


def test_the_model_tested_is_the_one_best_on_validation_not_the_last():
    model = torch.nn.Linear(1, 1, bias=False)
    scores = iter([0.2, 0.7, 0.5, 0.7])  # a tie later does not replace the first best
    modes = []

    def score():
        modes.append(model.training)
        return next(scores)

    selector = BestOnValidation(model, score, every=3, total=10)
    for it in range(1, 11):
        with torch.no_grad():
            model.weight.fill_(float(it))  # training moves the weights every step
        selector(it, 10, {})
    assert modes == [False] * 4 and model.training  # scored in eval mode, left as it was
    record = selector.record()
    assert record == {"iterations": [3, 6, 9, 10], "dice": [0.2, 0.7, 0.5, 0.7], "best_iteration": 6, "best_dice": 0.7}
    assert float(model.weight.detach()) == 10.0
    selector.restore()
    assert float(model.weight.detach()) == 6.0
    with pytest.raises(InputError, match="--validate-every 0: expected at least 1"):
        BestOnValidation(model, score, every=0, total=10)


def _liver_folder(folder, n, seed, shape):
    """A dataset folder of ``n`` phantom CTs with their liver labels; the last case is the test set."""
    folder.mkdir()
    for i, case in enumerate(make_dataset("phantom-liver", n, seed=seed, ct_shape=shape)):
        write_volume(case.ct, folder / f"image_{i}.nii.gz")
        liver = case.ct_label.with_array((case.ct_label.array == 1).astype(np.uint8))
        write_volume(liver, folder / f"label_{i}.nii.gz")
    (folder / "test.list").write_text(f"{n - 1}\n", encoding="utf-8")
    return folder


def test_ssl_chooses_each_rows_weights_on_held_out_training_patients(tmp_path, caplog):
    folder = _liver_folder(tmp_path / "data", 5, seed=7, shape=(10, 48, 48))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="vqmedseg"):
        run_main("ssl", "--dataset", folder, "--labeled-fraction", "0.3", "--methods", "supervised,vqseg",
                 "--seeds", "1", "--preset", "tiny", "--foundation", "none", "--iterations", "6",
                 "--validation-patients", "1", "--validate-every", "4", "--out", out)

    # progress in the log every tenth of a row (here every iteration), with the best validation Dice once there is one
    for method in ("supervised", "vqseg"):
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{method} seed 0: iteration ")]
        assert [int(m.split("iteration ")[1].split(" ")[0]) for m in lines] == [1, 2, 3, 4, 5, 6], lines
        assert "validation" not in lines[2] and re.search(r" of 6 \(\d+ s\); best validation Dice 0\.\d{4} at iteration 4$", lines[3])

    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["split"]["train_cases"] == ["0", "1", "2"] and run["split"]["validation_cases"] == ["3"]
    assert run["split"]["test_cases"] == ["4"]
    assert (run["validation_patients"], run["validate_every"]) == (1, 4)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    for method, r in results.items():
        seed = r["per_seed"][0]
        v = seed["validation"]
        assert v["iterations"] == [4, 6] and len(v["dice"]) == 2, method
        assert v["best_dice"] == max(v["dice"]) and v["best_iteration"] == v["iterations"][v["dice"].index(max(v["dice"]))]
        assert r["validation_best_iteration"] == [v["best_iteration"]]
        assert 0 <= seed["last_iteration"]["dice_mean"] <= 1
        assert r["last_iteration"]["dice_mean"] == pytest.approx(seed["last_iteration"]["dice_mean"])
        # the clean-up (largest piece or not) is chosen per structure on the validation case, then tested
        post = seed["post_processing"]
        assert set(post["largest_piece"]) == {"label 1"} and isinstance(post["largest_piece"]["label 1"], bool)
        kept = seed["largest_component"] if post["largest_piece"]["label 1"] else seed
        assert post["dice_mean"] == pytest.approx(kept["dice_mean"]) and post["cases"] == kept["cases"]
        v_dice = post["validation_dice"]["label 1"]
        assert post["largest_piece"]["label 1"] == (v_dice["largest_piece"] > v_dice["as_predicted"])
        assert r["post_processing"]["dice_mean"] == pytest.approx(post["dice_mean"])
        assert r["post_processing"]["largest_piece_seeds"] == {"label 1": int(post["largest_piece"]["label 1"])}
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "validation: case 3" in table and "| best iteration (validation) |" in table
    assert "| Dice (%), clean-up chosen on validation |" in table
    keeps = results["vqseg"]["post_processing"]["largest_piece_seeds"]["label 1"]
    assert f"{100 * results['vqseg']['post_processing']['dice_mean']:.2f} (largest piece kept: label 1 in {keeps} of 1 seed) |" in table
    # one seed has no spread to show
    assert "±" not in table.split("| method |")[1] and "one seed" in table
    assert (out / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = run_main("ssl", "--dataset", folder, "--methods", "supervised", "--seeds", "1", "--preset", "tiny",
                   "--foundation", "none", "--validation-patients", "4", "--out", tmp_path / "bad", check=False)
    assert bad.returncode != 0
    assert "--validation-patients 4: expected 0 to 3 (the training set has 4 patients)" in bad.stderr
    bad = run_main("ssl", "--dataset", folder, "--methods", "supervised", "--preset", "tiny", "--foundation", "none",
                   "--validate-every", "50", "--out", tmp_path / "bad", check=False)
    assert bad.returncode != 0
    assert "--validate-every 50: expected a positive number of iterations, with --validation-patients above 0 (found 0)" in bad.stderr


def test_the_largest_piece_is_kept_only_for_structures_it_improves_on_validation():
    from types import SimpleNamespace as S

    from VQMedSegLib.training.ssl_experiment import choose_largest_piece, with_choice

    structures = {1: "RV", 2: "Myo", 3: "LV"}
    # two validation cases: the clean-up helps LV, changes nothing for Myo, and hurts RV on average
    raw = [{"RV": S(dice=0.8), "Myo": S(dice=0.6), "LV": S(dice=0.7)}, {"RV": S(dice=0.6), "Myo": S(dice=0.5), "LV": S(dice=0.5)}]
    largest = [{"RV": S(dice=0.9), "Myo": S(dice=0.6), "LV": S(dice=0.8)}, {"RV": S(dice=0.3), "Myo": S(dice=0.5), "LV": S(dice=0.5)}]
    keep, scores = choose_largest_piece(raw, largest, structures)
    assert keep == {"RV": False, "Myo": False, "LV": True}
    assert scores["RV"] == pytest.approx({"as_predicted": 0.7, "largest_piece": 0.6})
    assert scores["LV"] == pytest.approx({"as_predicted": 0.6, "largest_piece": 0.65})
    # on the test cases each structure then takes its own choice
    chosen = with_choice(raw, largest, keep)
    assert [{n: c[n].dice for n in structures.values()} for c in chosen] == [
        {"RV": 0.8, "Myo": 0.6, "LV": 0.8}, {"RV": 0.6, "Myo": 0.5, "LV": 0.5}]


def test_seeds_run_apart_and_merged_match_one_run(tmp_path, caplog):
    folder = _liver_folder(tmp_path / "data", 4, seed=3, shape=(8, 40, 40))
    common = ("ssl", "--dataset", folder, "--labeled-fraction", "0.3", "--preset", "tiny", "--foundation", "none",
              "--iterations", "4", "--validation-patients", "1", "--validate-every", "2")
    run_cli(*common, "--methods", "supervised,vqseg", "--seeds", "2", "--out", tmp_path / "whole")
    # the parts in this process (a subprocess each would mostly time torch's import)
    for seed in (1, 0):
        run_main(*common, "--methods", "supervised,vqseg", "--seed-ids", seed, "--out", tmp_path / f"seed{seed}")
    for method in ("vqseg", "supervised"):  # seed 0 as if its rows had run apart
        part = tmp_path / f"{method}0"
        shutil.copytree(tmp_path / "seed0", part)
        rows = json.loads((part / "results.json").read_text(encoding="utf-8"))
        (part / "results.json").write_text(json.dumps({method: rows[method]}), encoding="utf-8")
    assert json.loads((tmp_path / "seed1" / "run.json").read_text(encoding="utf-8"))["seeds"] == [1]

    merged = tmp_path / "merged"
    run_main("ssl-merge", *(tmp_path / f for f in ("seed1", "vqseg0", "supervised0")), "--out", merged)
    whole = json.loads((tmp_path / "whole" / "results.json").read_text(encoding="utf-8"))
    got = json.loads((merged / "results.json").read_text(encoding="utf-8"))
    assert list(got) == ["supervised", "vqseg"]
    assert list(merge_ssl([tmp_path / "vqseg0", tmp_path / "supervised0"], tmp_path / "m2")) == ["vqseg", "supervised"]
    assert list(merge_ssl([tmp_path / "vqseg0", tmp_path / "supervised0"], tmp_path / "m3", ["supervised", "vqseg"])) == [
        "supervised", "vqseg"]
    with pytest.raises(InputError, match="--methods supervised: the folders hold vqseg,supervised; expected the same methods"):
        merge_ssl([tmp_path / "vqseg0", tmp_path / "supervised0"], tmp_path / "bad", ["supervised"])
    for method in whole:
        assert [r["seed"] for r in got[method]["per_seed"]] == [0, 1]
        for key in ("dice_mean", "dice_std", "hd95_mean"):
            assert got[method][key] == pytest.approx(whole[method][key]), (method, key)
        assert got[method]["last_iteration"]["dice_mean"] == pytest.approx(whole[method]["last_iteration"]["dice_mean"])
        assert got[method]["validation_best_iteration"] == whole[method]["validation_best_iteration"]
        pp, whole_pp = got[method]["post_processing"], whole[method]["post_processing"]
        assert pp["dice_mean"] == pytest.approx(whole_pp["dice_mean"]) and pp["largest_piece_seeds"] == whole_pp["largest_piece_seeds"]
    # the merged report compares the methods case by case over both seeds, as one run's does
    table = (merged / "results.md").read_text(encoding="utf-8")
    assert table.split("## Dice per test case")[1] == (tmp_path / "whole" / "results.md").read_text(
        encoding="utf-8").split("## Dice per test case")[1]
    assert {p.name for p in merged.glob("*.png")} == {"dice_by_case.png", "validation.png"}
    run = json.loads((merged / "run.json").read_text(encoding="utf-8"))
    assert run["seeds"] == [0, 1] and run["methods"] == ["supervised", "vqseg"]
    assert [m["seeds"] for m in run["merged_from"]] == [[1], [0], [0]]
    assert run["threads"] == torch.get_num_threads() and [m["threads"] for m in run["merged_from"]] == [run["threads"]] * 3
    assert run["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert [m["cpu_capability"] for m in run["merged_from"]] == [run["cpu_capability"]] * 3

    # runs of another install are merged, with a warning naming the packages whose versions differ
    other = json.loads((tmp_path / "vqseg0" / "run.json").read_text(encoding="utf-8"))
    other["versions"] = {**other["versions"], "numpy": "0.0"}
    (tmp_path / "vqseg0" / "run.json").write_text(json.dumps(other), encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        merge_ssl([tmp_path / "vqseg0", tmp_path / "supervised0"], tmp_path / "m5")
    assert "software versions differ (numpy)" in caplog.text
    changed = tmp_path / "threads"  # parts run on other thread counts: the merged run names each
    shutil.copytree(tmp_path / "seed1", changed)
    (changed / "run.json").write_text(json.dumps({**json.loads((changed / "run.json").read_text(encoding="utf-8")),
                                                  "threads": 99}), encoding="utf-8")
    merge_ssl([changed, tmp_path / "vqseg0", tmp_path / "supervised0"], tmp_path / "m4")
    assert json.loads((tmp_path / "m4" / "run.json").read_text(encoding="utf-8"))["threads"] == f"99, {torch.get_num_threads()}"
    assert "| vqseg |" in (merged / "results.md").read_text(encoding="utf-8")
    # each row records its labelled slices; rows of one seed trained on others (code that drew them
    # differently in another process) are refused, not paired seed by seed
    for method in ("supervised", "vqseg"):
        assert [r["labelled_rows"] for r in got[method]["per_seed"]] == [r["labelled_rows"] for r in whole[method]["per_seed"]]
    assert got["supervised"]["per_seed"][0]["labelled_rows"] == got["vqseg"]["per_seed"][0]["labelled_rows"]
    drawn = tmp_path / "drawn-otherwise"
    shutil.copytree(tmp_path / "vqseg0", drawn)
    rows = json.loads((drawn / "results.json").read_text(encoding="utf-8"))
    rows["vqseg"]["per_seed"][0]["labelled_rows"] = [r + 1 for r in rows["vqseg"]["per_seed"][0]["labelled_rows"]]
    (drawn / "results.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(InputError, match=r"seed 0: vqseg and supervised trained on different labelled slices"):
        merge_ssl([drawn, tmp_path / "supervised0"], tmp_path / "bad")

    # the same (method, seed) twice, another experiment, a folder without results, seeds that disagree
    with pytest.raises(InputError, match="supervised seed 1 is also in an earlier folder"):
        merge_ssl([tmp_path / "whole", tmp_path / "seed1"], tmp_path / "bad")
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "seed1", other)
    run = json.loads((other / "run.json").read_text(encoding="utf-8"))
    (other / "run.json").write_text(json.dumps({**run, "labeled_fraction": 0.5}), encoding="utf-8")
    with pytest.raises(InputError, match="'labeled_fraction' differs from"):
        merge_ssl([tmp_path / "vqseg0", other], tmp_path / "bad")
    # a run recorded before a configuration key existed ran with that key's default: it
    # merges with a run that records the default, not with one that changed it
    config = {k: v for k, v in run["config"].items() if k != "pfa_source"}
    assert run["config"]["pfa_source"] == "straight-through"
    (other / "run.json").write_text(json.dumps({**run, "config": config}), encoding="utf-8")
    assert list(merge_ssl([other, tmp_path / "vqseg0", tmp_path / "supervised0"], tmp_path / "older")) == [
        "supervised", "vqseg"]
    (other / "run.json").write_text(json.dumps({**run, "config": {**run["config"], "pfa_source": "codewords"}}),
                                    encoding="utf-8")
    with pytest.raises(InputError, match="'config' differs from"):
        merge_ssl([tmp_path / "vqseg0", other], tmp_path / "bad")
    with pytest.raises(InputError, match="run.json: not found; expected the output folder of a finished `vqmedseg ssl` run"):
        merge_ssl([tmp_path / "seed1", folder], tmp_path / "bad")
    with pytest.raises(InputError, match=re.escape("supervised: [1]; vqseg: [0, 1]")):
        merge_ssl([tmp_path / "seed1", tmp_path / "vqseg0"], tmp_path / "bad")
    (other / "run.json").write_text(json.dumps(run), encoding="utf-8")
    (other / "results.json").write_text(json.dumps({"vqseg": {"dice_mean": 0.5}}), encoding="utf-8")
    with pytest.raises(InputError, match="results.json: vqseg has no 'per_seed' rows"):
        merge_ssl([tmp_path / "seed1", other], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    for argv, message in ((("--seed-ids", "1,1"), "--seed-ids '1,1': expected distinct seeds from 0 to 4294967295"),
                          (("--seed-ids", "x"), "--seed-ids 'x': expected distinct seeds from 0 to 4294967295"),
                          (("--seed-ids", "4294967296"), "--seed-ids '4294967296': expected distinct seeds from 0"),
                          (("--seeds", "0"), "--seeds 0: expected at least 1")):
        r = run_main(*common, "--methods", "supervised", *argv, "--out", tmp_path / "bad", check=False)
        assert r.returncode != 0 and message in r.stderr
    # --seeds 2 is the default value, and still refused beside --seed-ids (argparse's usage error)
    r = run_main(*common, "--seeds", "2", "--seed-ids", "1", "--out", tmp_path / "bad", check=False)
    assert r.returncode == 2 and "argument --seed-ids: not allowed with argument --seeds" in r.stderr


def test_a_test_list_file_given_on_the_command_line_chooses_the_test_patients(tmp_path):
    folder = _liver_folder(tmp_path / "data", 5, seed=7, shape=(10, 48, 48))  # its own test.list says case 4
    chosen = tmp_path / "half.list"
    chosen.write_text("# two test patients\n1\n\n3\n", encoding="utf-8")
    common = ("ssl", "--dataset", folder, "--methods", "supervised", "--seeds", "1", "--preset", "tiny",
              "--foundation", "none", "--iterations", "2")
    out = tmp_path / "out"
    run_main(*common, "--test-list", chosen, "--validation-patients", "1", "--validate-every", "1", "--out", out)

    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["test_list"] == "half.list"  # the file's name, not where it was
    assert run["split"]["test_cases"] == ["1", "3"]
    assert run["split"]["train_cases"] == ["0", "2"] and run["split"]["validation_cases"] == ["4"]
    assert run["split"]["rule"] == "the patients listed in half.list"
    assert "the patients listed in half.list" in (out / "results.md").read_text(encoding="utf-8")
    # each test case's Dice per structure is kept, so rows can be compared case by case later
    seed = json.loads((out / "results.json").read_text(encoding="utf-8"))["supervised"]["per_seed"][0]
    assert list(seed["cases"]) == ["1", "3"] and all(list(c) == ["label 1"] for c in seed["cases"].values())
    assert seed["dice_mean"] == pytest.approx(np.mean([c["label 1"] for c in seed["cases"].values()]))
    # and its HD95, as predicted, with the largest piece kept, and at the last iteration, so
    # a change in a mean can be traced to the case that made it
    for summary in (seed, seed["largest_component"], seed["last_iteration"]):
        assert list(summary["cases"]) == list(summary["cases_hd95"]) == ["1", "3"]
        hd = [c["label 1"] for c in summary["cases_hd95"].values()]
        assert all(h is None or h >= 0 for h in hd)
        defined = [h for h in hd if h is not None]
        assert summary["hd95_mean"] == (pytest.approx(np.mean(defined)) if defined else None)
        assert summary["dice_mean"] == pytest.approx(np.mean([c["label 1"] for c in summary["cases"].values()]))

    def refused(path, expected):
        r = run_main(*common, "--test-list", path, "--out", tmp_path / "bad", check=False)
        assert r.returncode != 0 and expected in r.stderr, r.stderr
        assert not (tmp_path / "bad" / "results.json").exists()

    refused(tmp_path / "absent.list", "absent.list: not found")
    (tmp_path / "empty.list").write_text("# nothing\n\n", encoding="utf-8")
    refused(tmp_path / "empty.list", "empty.list: found no case or patient id, expected one per line")
    (tmp_path / "typo.list").write_text("1\n7\nx\n", encoding="utf-8")
    refused(tmp_path / "typo.list", "typo.list names 2 patient(s) not in the dataset (7, x); its patients are 0, 1, 2, 3, 4")
    (tmp_path / "all.list").write_text("0\n1\n2\n3\n4\n", encoding="utf-8")
    refused(tmp_path / "all.list", "all.list names 5 of the 5 patients found; expected some, not all")



def test_a_validation_list_chooses_the_validation_patients(tmp_path):
    # the last training patients in sorted order may share one trait (ACDC's 085 and 087 both
    # have an abnormal right ventricle): a researcher names the validation patients instead
    folder = _liver_folder(tmp_path / "data", 5, seed=7, shape=(10, 48, 48))  # its own test.list says case 4
    chosen = tmp_path / "val.list"
    chosen.write_text("# two validation patients\n0\n2\n", encoding="utf-8")
    common = ("ssl", "--dataset", folder, "--methods", "supervised", "--seeds", "1", "--preset", "tiny",
              "--foundation", "none", "--iterations", "2")
    out = tmp_path / "out"
    run_main(*common, "--validation-list", chosen, "--validate-every", "1", "--out", out)

    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["validation_list"] == "val.list" and run["validation_patients"] == 2
    assert run["split"]["validation_cases"] == ["0", "2"]
    assert run["split"]["train_cases"] == ["1", "3"] and run["split"]["test_cases"] == ["4"]
    assert run["split"]["validation_rule"] == "the patients listed in val.list"
    seed = json.loads((out / "results.json").read_text(encoding="utf-8"))["supervised"]["per_seed"][0]
    assert seed["validation"]["iterations"] == [1, 2]  # scored on them, every iteration

    def refused(text, expected, *argv):
        bad = tmp_path / "bad.list"
        bad.write_text(text, encoding="utf-8")
        r = run_main(*common, "--validation-list", bad, *argv, "--out", tmp_path / "bad", check=False)
        assert r.returncode != 0 and expected in r.stderr, r.stderr
        assert not (tmp_path / "bad" / "results.json").exists()

    refused("0\n4\n", "bad.list names 1 test patient(s) (4); expected training patients only: 0, 1, 2, 3")
    refused("0\n7\n", "bad.list names 1 patient(s) not in the dataset (7); its patients are 0, 1, 2, 3, 4")
    refused("0\n1\n2\n3\n", "bad.list names all 4 training patients; expected some, not all")
    refused("# none\n", "bad.list: found no case or patient id, expected one per line")
    refused("0\n", "not allowed with argument --validation-list", "--validation-patients", "1")


def test_pfa_is_reported_off_only_when_a_row_would_have_used_it(tmp_path, caplog):
    import logging

    folder = _liver_folder(tmp_path / "data", 4, seed=7, shape=(8, 32, 32))
    common = ("ssl", "--dataset", folder, "--seeds", "1", "--preset", "tiny", "--iterations", "2")

    def pfa_warnings(*argv):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vqmedseg"):
            run_main(*common, *argv, "--out", tmp_path / "out", "--overwrite")  # one folder, run again
        return [r.getMessage() for r in caplog.records if "PFA is off" in r.getMessage() or "foundation features" in r.getMessage()]

    # rows that never use PFA: no foundation model built, and nothing to warn about
    assert pfa_warnings("--methods", "supervised,vqseg-labelled") == []
    assert pfa_warnings("--methods", "vqseg-nopfa", "--foundation", "none") == []
    assert pfa_warnings("--methods", "vqseg", "--foundation", "none") == ["PFA is off: no foundation model (--foundation none)"]


def test_chaos_mr_cases_load_as_mr_without_a_guess(caplog):
    from VQMedSegLib.data.paths import shared_data_dir
    from VQMedSegLib.training.ssl_experiment import load_cases

    if shared_data_dir() is None:
        pytest.skip("real scans not found: set VQMEDSEG_DATA or place them in ../shared/data")
    with caplog.at_level(logging.WARNING):
        data = load_cases("chaos-mr")
    assert len(data.cases) == 20 and {c.modality for c in data.cases} == {"MR"}
    assert "modality not given" not in caplog.text


def test_strong_augment_is_switched_on_from_the_command_line_and_recorded(tmp_path):
    folder = _liver_folder(tmp_path / "data", 4, seed=7, shape=(8, 32, 32))
    common = ("ssl", "--dataset", folder, "--seeds", "1", "--preset", "tiny", "--iterations", "2", "--methods", "vqseg",
              "--foundation", "none")
    for argv, expected in (((), False), (("--strong-augment",), True)):
        out = tmp_path / f"out-{expected}"
        run_main(*common, *argv, "--out", out)
        run = json.loads((out / "run.json").read_text(encoding="utf-8"))
        assert run["config"]["strong_augment"] is expected and run["preset"] == "tiny"


def test_a_config_file_is_laid_over_the_preset_and_command_line_options_over_both(tmp_path):
    folder = _liver_folder(tmp_path / "data", 4, seed=7, shape=(8, 32, 32))
    config = tmp_path / "partial.json"
    config.write_text(json.dumps({"num_codes": 32, "iterations": 50}), encoding="utf-8")
    out = tmp_path / "out"
    run_main("ssl", "--dataset", folder, "--seeds", "1", "--preset", "tiny", "--config", config, "--iterations", "2",
             "--strong-augment", "--methods", "vqseg", "--foundation", "none", "--out", out)
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    expected = vqseg_config_from_preset("tiny", num_codes=32, iterations=2, strong_augment=True, foundation="none")
    assert run["config"] == expected.to_json() and run["preset"] == "tiny + partial.json"
    # a whole recorded configuration given again: its keys that keep the preset's values (a dropout
    # rate beside QPM, strong_augment false) change nothing, and are not refused as unread
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps({**run["config"], "strong_augment": False}), encoding="utf-8")
    run_main("ssl", "--dataset", folder, "--seeds", "1", "--preset", "tiny", "--config", recorded, "--methods", "supervised",
             "--out", tmp_path / "again")


def test_an_experiment_never_writes_over_the_results_of_an_earlier_one_unless_asked(tmp_path):
    """`ssl`, `simulate` and `ssl-merge` runs can take hours: an --out that already holds
    results (a typo, a command run again with other settings) is refused before any work,
    and --overwrite replaces them."""
    folder = _liver_folder(tmp_path / "data", 3, seed=4, shape=(8, 40, 40))
    common = ("ssl", "--dataset", folder, "--methods", "supervised", "--seeds", "1", "--preset", "tiny",
              "--foundation", "none", "--iterations", "2", "--out", tmp_path / "run")
    run_main(*common, "--labeled-fraction", "0.3")
    results = (tmp_path / "run" / "results.json").read_bytes()
    again = run_main(*common, "--labeled-fraction", "0.5", check=False)
    assert again.returncode == 2, again.stderr
    assert f"--out {tmp_path / 'run'}: holds the results of an earlier run" in again.stderr
    assert "give another --out, or --overwrite to replace them" in again.stderr
    assert (tmp_path / "run" / "results.json").read_bytes() == results
    run_main(*common, "--labeled-fraction", "0.5", "--overwrite")
    assert json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))["labeled_fraction"] == 0.5
    # the other two commands refuse the same folder before they begin
    simulate = run_main("simulate", "--dataset", "phantom-liver", "--preset", "tiny", "--strategies", "random", "--seeds", "1",
                        "--out", tmp_path / "run", check=False)
    merge = run_main("ssl-merge", tmp_path / "run", "--out", tmp_path / "run", check=False)
    for r in (simulate, merge):
        assert r.returncode == 2 and "holds the results of an earlier run" in r.stderr, r.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text(encoding="utf-8"))["labeled_fraction"] == 0.5


def test_a_refused_experiment_leaves_no_out_folder_behind_and_keeps_one_it_found(tmp_path):
    """The --out folder is made before the work (a folder that cannot be made is found in
    seconds, not hours); an experiment refused after that once left it behind, empty."""
    two = _liver_folder(tmp_path / "data", 2, seed=4, shape=(8, 40, 40))
    ssl = run_main("ssl", "--dataset", two, "--methods", "supervised", "--seeds", "1", "--preset", "tiny",
                   "--out", tmp_path / "new" / "ssl", check=False)
    simulate = run_main("simulate", "--dataset", "phantom-liver", "--preset", "tiny", "--rounds", "100", "--per-round", "50",
                        "--seeds", "1", "--out", tmp_path / "new" / "simulate", check=False)
    assert ssl.returncode == 2 and "found 2 labelled cases, expected at least 3" in ssl.stderr, ssl.stderr
    assert simulate.returncode == 2 and "exceed the pool" in simulate.stderr, simulate.stderr
    assert not (tmp_path / "new").exists()  # nor the parent made for it
    (tmp_path / "mine").mkdir()
    run_main("ssl", "--dataset", two, "--methods", "supervised", "--seeds", "1", "--preset", "tiny",
             "--out", tmp_path / "mine", check=False)
    assert (tmp_path / "mine").is_dir()
    # a path through a folder that is not there yet: the folder the path names is the user's
    (tmp_path / "existing").mkdir()
    run_main("ssl", "--dataset", two, "--methods", "supervised", "--preset", "tiny",
             "--out", tmp_path / "new" / ".." / "existing", check=False)
    assert (tmp_path / "existing").is_dir() and not (tmp_path / "new").exists()
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    blocked = run_main("ssl", "--dataset", two, "--methods", "supervised", "--preset", "tiny",
                       "--out", tmp_path / "a-file" / "run", check=False)
    assert blocked.returncode != 0 and "Traceback" not in blocked.stderr
    assert f"--out {tmp_path / 'a-file' / 'run'}: cannot make the folder (" in blocked.stderr, blocked.stderr


@pytest.mark.parametrize("command", ["ssl", "simulate"])
def test_results_that_fail_part_way_leave_the_earlier_run_whole(tmp_path, monkeypatch, command):
    """An experiment's results.json, results.md, figures and run.json replace the earlier
    run's together or not at all: a run that fails while writing them (here the disk fills
    at the figure) must not leave new results beside the earlier run's run.json, which
    `run_accuracy.py` would then take for the settings they were made with."""
    import errno

    import matplotlib.figure

    out = tmp_path / "run"
    if command == "ssl":
        folder = _liver_folder(tmp_path / "data", 3, seed=4, shape=(8, 40, 40))
        args = ("ssl", "--dataset", folder, "--methods", "supervised", "--seeds", "1", "--preset", "tiny",
                "--foundation", "none", "--iterations", "2", "--labeled-fraction")
        first, second, figure = ("0.3", "--validation-patients", "1", "--validate-every", "1"), ("0.5",), "dice_by_case.png"
    else:
        args = ("simulate", "--dataset", "phantom-liver", "--preset", "tiny", "--strategies", "random", "--seeds", "1",
                "--rounds", "1")
        first, second, figure = ("--per-round", "2"), ("--per-round", "4"), "dice_vs_budget.png"
    run_main(*args, *first, "--out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"results.json", "results.md", "run.json", figure} | ({"validation.png"} if command == "ssl" else set()) <= set(before)

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    failed = run_main(*args, *second, "--out", out, "--overwrite", check=False)
    assert failed.returncode == 3, failed.stderr
    assert f"{out / figure}: could not write (the disk is full)" in failed.stderr, failed.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier run's, whole; no temporaries

    # once it succeeds, nothing of the earlier run is left beside it: a run without
    # validation patients has no validation figure, and the earlier run's goes
    monkeypatch.undo()
    run_main(*args, *second, "--out", out, "--overwrite")
    after = sorted(p.name for p in out.iterdir())
    assert after == sorted(before) if command == "simulate" else after == sorted(set(before) - {"validation.png"})
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["labeled_fraction" if command == "ssl" else "per_round"] \
        == (0.5 if command == "ssl" else 4)


def test_a_missed_structure_is_counted_beside_the_hd95_it_leaves_out():
    """HD95 is undefined where a prediction is empty, and the mean leaves such cases out: a
    row that missed half the structures showed the HD95 of a perfect one, with no word of
    it. The seed's summary counts them, the row sums them over seeds, and the table says so."""
    from VQMedSegLib.metrics.segmentation import score_masks
    from VQMedSegLib.training.ssl_experiment import _seed_summary, _summary_over_seeds, _table

    ref = np.zeros((4, 16, 16), bool)
    ref[1:3, 4:12, 4:12] = True
    structures = {1: "LV", 2: "RV"}
    perfect = [{"LV": score_masks(ref, ref, None), "RV": score_masks(ref, ref, None)} for _ in range(2)]
    missed = [{"LV": score_masks(ref, ref, None), "RV": score_masks(np.zeros_like(ref), ref, None)} for _ in range(2)]
    seeds = {name: [_seed_summary(cases, structures, ["a", "b"]) for _ in range(2)]
             for name, cases in (("perfect", perfect), ("missed", missed))}
    assert seeds["missed"][0]["hd95_undefined"] == 2 and seeds["perfect"][0]["hd95_undefined"] == 0
    assert seeds["missed"][0]["hd95_mean"] == seeds["perfect"][0]["hd95_mean"] == 0.0  # what the mean alone showed
    rows = {name: {**_summary_over_seeds(runs, structures), "per_seed": runs, "labelled_slices": 3,
                   "largest_component": _summary_over_seeds(runs, structures)} for name, runs in seeds.items()}
    assert rows["missed"]["hd95_undefined"] == 4 and rows["perfect"]["hd95_undefined"] == 0
    table = _table(rows, "acdc", structures, 0.1, [0, 1], "quick", 8, 2, "test.list", 60.0)
    assert "| missed | 3 |" in table and "0.00 voxels (undefined in 4 of 8: an empty prediction or reference, left out) |" in table
    assert "| perfect | 3 |" in table and "undefined in 0" not in table


def test_the_supervised_ema_row_tests_the_moving_average_of_the_weights_it_trains():
    """`supervised-ema` trains the U-Net of `supervised` step for step and keeps an EMA of
    its weights with VQ-Seg's teacher rule, so the two are compared on the same footing."""
    from VQMedSegLib.training.ssl_experiment import _supervised_net, _train_supervised

    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 32, 32), dtype=np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    cfg = vqseg_config_from_preset("tiny", iterations=5, foundation="none", num_classes=2)
    device = torch.device("cpu")

    plain = _supervised_net(cfg, device)
    _train_supervised(plain, cfg, x, y, device)
    net = _supervised_net(cfg, device)
    ema = _supervised_net(cfg, device)
    expected = {k: v.detach().clone() for k, v in ema.named_parameters()}

    def follow(iteration, total, losses):  # the rule of VQ-Seg's teacher, after every step
        decay = min(cfg.ema_decay, 1.0 - 1.0 / iteration)
        for k, v in net.named_parameters():
            expected[k] = decay * expected[k] + (1 - decay) * v.detach()

    _train_supervised(net, cfg, x, y, device, on_step=follow, ema=ema)
    # the student is the `supervised` row's, to the bit: the EMA changes nothing it trains
    for (k, a), b in zip(plain.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k
    for k, v in ema.named_parameters():
        assert torch.allclose(v, expected[k], atol=1e-6), k
        assert not v.requires_grad
    assert any(not torch.equal(v, dict(net.named_parameters())[k]) for k, v in ema.named_parameters())
    for a, b in zip(ema.buffers(), net.buffers()):  # batch-norm statistics are copied, as for the teacher
        assert torch.equal(a, b)


def test_ema_rows_are_labelled_like_their_plain_rows(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, case in enumerate(make_dataset("phantom-liver", 3, seed=7, ct_shape=(8, 40, 40))):
        write_volume(case.ct, folder / f"image_{i}.nii.gz")
        write_volume(case.ct_label.with_array((case.ct_label.array == 1).astype(np.uint8)), folder / f"label_{i}.nii.gz")
    (folder / "test.list").write_text("2\n")
    out = tmp_path / "out"
    run_main("ssl", "--dataset", folder, "--labeled-fraction", "0.25",
             "--methods", "supervised,supervised-ema,supervised-full-ema", "--seeds", "1", "--preset", "tiny",
             "--iterations", "3", "--foundation", "none", "--out", out)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    n = json.loads((out / "run.json").read_text(encoding="utf-8"))["train_slices"]
    assert results["supervised-ema"]["labelled_slices"] == results["supervised"]["labelled_slices"] == round(0.25 * n)
    assert results["supervised-ema"]["per_seed"][0]["labelled_rows"] == results["supervised"]["per_seed"][0]["labelled_rows"]
    assert results["supervised-full-ema"]["labelled_slices"] == n
    assert results["supervised-full-ema"]["labeled_fraction"] == 1.0
    assert "labelled_rows" not in results["supervised-full-ema"]["per_seed"][0]


class _Bar:
    def update(self, n):
        pass

    def set_postfix_str(self, text):
        pass


def test_a_rows_training_losses_are_kept_as_means_over_each_tenth_of_its_iterations():
    """What a row's losses did (a term that starts after the warm-up, a codebook whose
    usage collapses) is read from ``results.json`` after the run, not from a debugger."""
    progress = RowProgress(_Bar(), "vqseg", 0, 20)
    for it in range(1, 21):
        losses = {"total": float(it), "vq": 0.5}
        if it > 4:  # a term of the semi-supervised phase, from iteration 5
            losses["seg_qpm"] = 2.0 * it
        progress(it, 20, losses)
    record = progress.record()
    assert record["iterations"] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert record["means"]["total"] == pytest.approx([1.5, 3.5, 5.5, 7.5, 9.5, 11.5, 13.5, 15.5, 17.5, 19.5])
    assert record["means"]["vq"] == pytest.approx([0.5] * 10)
    # absent before it starts, then the mean of the iterations that had it
    assert record["means"]["seg_qpm"][:2] == [None, None]
    assert record["means"]["seg_qpm"][2:] == pytest.approx([11.0, 15.0, 19.0, 23.0, 27.0, 31.0, 35.0, 39.0])
    json.dumps(record, allow_nan=False)  # plain JSON
    # a trainer that reports no losses leaves an empty record
    quiet = RowProgress(_Bar(), "supervised", 0, 3)
    for it in range(1, 4):
        quiet(it, 3, None)
    assert quiet.record() == {"iterations": [1, 2, 3], "means": {}}
