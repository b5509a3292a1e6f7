"""VQ-BEGAL rounds through a workspace, each command through the CLI's ``main``:
query -> annotate (a partial label volume) -> train -> query -> train -> predict.

The commands run in this process (:func:`conftest.run_main`); the command line as a real
process is tested in ``test_cli_end_to_end.py`` and ``test_reliability.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from VQMedSegLib.data.io import read_label, read_volume, write_volume
from VQMedSegLib.data.phantoms import make_dataset
from VQMedSegLib.jobs.workspace import Workspace

from conftest import one_case_workspace, run_main as vq



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("begal")
    cases = make_dataset("phantom-liver", 2, seed=11, ct_shape=(16, 64, 64))
    ws = root / "ws"
    vq("workspace", "init", ws, "--task", "liver")
    for c in cases:
        write_volume(c.ct, root / f"{c.case_id}_ct.nrrd")
        write_volume(c.mr, root / f"{c.case_id}_mr.nii.gz")
        write_volume(c.ct_label, root / f"{c.case_id}_label.nrrd")
        vq("workspace", "add", ws, "--case", c.case_id, "--ct", root / f"{c.case_id}_ct.nrrd", "--mr", root / f"{c.case_id}_mr.nii.gz")
    return root, ws, cases


def _annotate(root: Path, ws: Path, suggestions: list[dict]) -> None:
    """Annotate exactly the suggested slices, as a partial label volume (the rest is empty)."""
    by_case: dict[str, list[int]] = {}
    for s in suggestions:
        by_case.setdefault(s["case"], []).append(s["slice"])
    for case, slices in by_case.items():
        full = read_label(root / f"{case}_label.nrrd")
        partial = np.zeros_like(full.array)
        partial[slices] = full.array[slices]  # axial volumes: the slice axis is k (numpy axis 0)
        write_volume(full.with_array(partial), root / f"{case}_partial.nrrd")
        vq("workspace", "annotate", ws, "--case", case, "--label", root / f"{case}_partial.nrrd", "--label-value", "1",
           "--slices", ",".join(map(str, slices)))


def test_every_state_a_round_writes_lists_its_model_and_its_round_together(tmp_path, monkeypatch):
    """A VQ-BEGAL round recorded its model and then, in a second write of state.json, the
    round: a job killed between the two left a model without its round, and the next
    `train` trained the finished round again (from its last checkpoint) and recorded a
    second model for it. Every state a round writes must hold both or neither."""
    import copy

    import VQMedSegLib.jobs.workspace as workspace_module

    ws = one_case_workspace(tmp_path, "phantom-liver", "liver", "c0", (8, 48, 48), 3, "--label-value", "1", "--slices", "2-5")
    written: list[dict] = []
    real = workspace_module.atomic_write_json

    def recording(path, data, *args, **kwargs):
        if Path(path).name == "state.json":
            written.append(copy.deepcopy(data))
        return real(path, data, *args, **kwargs)

    monkeypatch.setattr(workspace_module, "atomic_write_json", recording)
    vq("train", "--workspace", ws, "--method", "begal", "--preset", "tiny")
    assert written and written[-1]["rounds"], written[-1]
    for state in written:
        models = [(m["round"], m["id"]) for m in state["models"] if m["method"] == "begal"]
        rounds = [(r["round"], r["model"]) for r in state.get("rounds", [])]
        assert models == rounds, (models, rounds)


def test_validation_cases_are_checked_before_training_and_refused_where_unused(tmp_path):
    """A VQ-BEGAL round with a validation case that has no annotation is refused before it
    trains (it used to train the whole round, then fail and lose it); VQ-Seg in a workspace
    uses no validation cases, so it refuses them rather than train on them silently."""
    ws = one_case_workspace(tmp_path, "phantom-liver", "liver", "c0", (8, 48, 48), 3, "--label-value", "1", "--slices", "2-5")
    begal = vq("train", "--workspace", ws, "--method", "begal", "--preset", "tiny", "--validation-cases", "nope", check=False)
    assert begal.returncode == 2 and "validation case(s) ['nope']: not annotated in workspace" in begal.stderr, begal.stderr
    assert "expected some of ['c0']" in begal.stderr
    state = Workspace.open(ws).load_state()
    assert state["models"] == [] and not state.get("rounds")
    assert not (ws / "checkpoints" / "begal").exists() or not any((ws / "checkpoints" / "begal").iterdir())  # nothing trained
    vqseg = vq("train", "--workspace", ws, "--method", "vqseg", "--preset", "tiny", "--validation-cases", "c0", check=False)
    assert vqseg.returncode == 2 and "--validation-cases c0: not used by --method vqseg" in vqseg.stderr, vqseg.stderr
    (tmp_path / "config.json").write_text('{"validation_cases": ["c0"]}', encoding="utf-8")
    from_file = vq("train", "--workspace", ws, "--method", "vqseg", "--preset", "tiny", "--foundation", "none",
                   "--config", tmp_path / "config.json", check=False)
    assert from_file.returncode == 2 and "config key 'validation_cases' ['c0']: not used by VQ-Seg" in from_file.stderr


def test_a_query_records_its_suggestions_and_budget_in_one_write_before_it_shows_them(tmp_path, monkeypatch):
    """The query's record, its slices' purposes (which training reads) and a ``--budget``
    given with it go to state.json in one write, and only then is the new list written to
    suggestions.json: a query killed at any point shows either the last list, or a new one
    whose purposes and budget are stored (once, two writes of state.json followed the list)."""
    from VQMedSegLib.active_learning import rounds
    from VQMedSegLib.jobs import workspace as workspace_module

    ws = one_case_workspace(tmp_path, "phantom-liver", "liver", "c0", (8, 48, 48), 3, "--label-value", "1", "--slices", "2-3")
    written = []

    def recording(real):
        def write(path, data, *args, **kwargs):
            written.append((Path(path).name, json.loads(json.dumps(data))))
            return real(path, data, *args, **kwargs)
        return write

    monkeypatch.setattr(workspace_module, "atomic_write_json", recording(workspace_module.atomic_write_json))
    monkeypatch.setattr(rounds, "atomic_write_json", recording(rounds.atomic_write_json))
    vq("query", "--workspace", ws, "--n", "2", "--budget", "5", "--preset", "tiny")
    names = [name for name, _ in written]
    shown = names.index("suggestions.json")
    suggested = {(s["case"], str(s["slice"])) for s in written[shown][1]["suggestions"]}
    states = [data for name, data in written if name == "state.json"]
    with_query = [state for state in states if state.get("queries")]
    assert with_query and all(state.get("budget") == 5 for state in with_query), [s.get("budget") for s in with_query]
    before = [data for name, data in written[:shown] if name == "state.json"]
    assert before and before[-1].get("budget") == 5
    assert {(c, k) for c, book in before[-1]["suggested"].items() for k in book} == suggested


def test_query_train_rounds(setup):
    root, ws, cases = setup
    first = json.loads(vq("query", "--workspace", ws, "--n", "6", "--budget", "14", "--preset", "tiny", "--json").stdout)
    assert first["model"] is None and "random" in first["message"]
    assert len(first["suggestions"]) == 6 and all(s["purpose"] == "both" for s in first["suggestions"])
    assert json.loads((ws / "suggestions.json").read_text())["suggestions"] == first["suggestions"]
    _annotate(root, ws, first["suggestions"])
    state = Workspace.open(ws)
    assert sum(len(v) for v in state.labelled_slices().values()) == 6

    vq("train", "--workspace", ws, "--method", "begal", "--preset", "tiny")
    second = json.loads(vq("query", "--workspace", ws, "--n", "6", "--preset", "tiny", "--json").stdout)
    assert second["model"].startswith("begal-r00")
    events = [json.loads(line) for line in (ws / "events.jsonl").read_text().splitlines()]
    scoring = [(e["done"], e["total"]) for e in events if e.get("message") == "scoring the pool"]
    assert scoring[-1] == (26, 26), scoring  # the 26 unlabelled slices of the two 16-slice cases
    purposes = [s["purpose"] for s in second["suggestions"]]
    assert purposes.count("decoder") == 3 and purposes.count("encoder") == 3
    taken = {(s["case"], s["slice"]) for s in first["suggestions"]}
    assert not taken & {(s["case"], s["slice"]) for s in second["suggestions"]}, "suggested an already labelled slice"
    dec = [s["score"] for s in second["suggestions"] if s["purpose"] == "decoder"]
    enc = [s["score"] for s in second["suggestions"] if s["purpose"] == "encoder"]
    assert min(dec) >= max(enc)
    _annotate(root, ws, second["suggestions"])

    vq("train", "--workspace", ws, "--method", "begal", "--preset", "tiny")
    events = [json.loads(l) for l in (ws / "events.jsonl").read_text().splitlines()]
    info = [e for e in events if e["type"] == "info" and e.get("round") == 1][-1]
    phases = {p["name"]: p["slices"] for p in info["phases"]}
    assert phases == {"encoder": 9, "decoder": 9}  # 3 low + 6 initial, 3 high + 6 initial
    state = Workspace.open(ws).load_state()
    assert [r["round"] for r in state["rounds"]] == [0, 1]

    # the budget: 12 of 14 spent, so only 2 more may be suggested, then none
    third = json.loads(vq("query", "--workspace", ws, "--n", "6", "--preset", "tiny", "--json").stdout)
    assert len(third["suggestions"]) == 2 and third["budget"]["remaining"] == 2
    _annotate(root, ws, third["suggestions"])
    done = vq("query", "--workspace", ws, "--n", "6", "--preset", "tiny")
    assert "budget of 14 slices is spent" in done.stdout
    # a budget of no slice is refused and the stored one kept; one below the labelled count is not
    # (annotating beyond the suggestions is allowed), and says so in plain numbers
    zero = vq("query", "--workspace", ws, "--n", "6", "--budget", "0", "--preset", "tiny", check=False)
    assert zero.returncode == 2 and "--budget 0: expected at least 1 slice" in zero.stderr, zero.stderr
    assert Workspace.open(ws).load_state()["budget"] == 14
    # a query refused for another reason (here the default preset, not the model's) stores no budget either
    wrong = vq("query", "--workspace", ws, "--n", "6", "--budget", "30", check=False)
    assert wrong.returncode == 2 and Workspace.open(ws).load_state()["budget"] == 14, wrong.stderr
    below = vq("query", "--workspace", ws, "--n", "6", "--budget", "10", "--preset", "tiny")
    assert "budget: 14 labelled, 4 over the budget of 10 slices" in below.stdout, below.stdout
    vq("query", "--workspace", ws, "--n", "6", "--budget", "14", "--preset", "tiny")

    unknown = vq("predict", "--workspace", ws, "--model-id", "begal-r09", check=False)
    assert unknown.returncode == 2 and "--model-id 'begal-r09': not a model of workspace" in unknown.stderr
    # a prediction reports its progress within each case, not only between cases
    from VQMedSegLib.inference.workspace import predict_workspace

    class Recorder:
        job_id, calls = "recorded", []

        def progress(self, done, total, message="", force=False, **fields):
            self.calls.append((done, total, message))

        def check_cancel(self):
            pass

        def emit(self, *args, **fields):
            pass

    recorder = Recorder()
    predict_workspace(recorder, Workspace.open(ws), torch.device("cpu"), None, None)
    first, second = sorted(c.case_id for c in cases)
    assert recorder.calls == [(0, 2000, f"predicting {first}"), (1000, 2000, f"predicting {first}"),
                              (1000, 2000, f"predicting {second}"), (2000, 2000, f"predicting {second}"), (2000, 2000, "done")]
    # the paths it prints are where the user finds the files, as train's are
    for line in vq("predict", "--workspace", ws).stdout.splitlines():
        files = line.split(": ", 1)[1].split(", ")
        assert len(files) == 2 and all(Path(f).is_file() and Path(f).is_relative_to(ws) for f in files), line
    model = Workspace.open(ws).latest_model("begal")["path"]
    case = cases[0].case_id
    vq("predict", "--model", ws / model, "--ct", root / f"{case}_ct.nrrd", "--out", root / "ct_only")
    vq("predict", "--model", ws / model, "--ct", root / f"{case}_ct.nrrd", "--mr", root / f"{case}_mr.nii.gz", "--out", root / "with_mr")
    for out in ("ct_only", "with_mr"):
        seg = read_label(root / out / "prediction.seg.nrrd")
        assert seg.same_geometry(read_volume(root / f"{case}_ct.nrrd"))


def test_annotated_empty_slices_count_and_are_never_suggested(setup, tmp_path):
    root, _, cases = setup
    ws = tmp_path / "ws"
    case = cases[1].case_id
    vq("workspace", "init", ws)
    vq("workspace", "add", ws, "--case", case, "--ct", root / f"{case}_ct.nrrd")
    empty = read_label(root / f"{case}_label.nrrd")
    write_volume(empty.with_array(np.zeros_like(empty.array)), tmp_path / "empty.nrrd")
    vq("workspace", "annotate", ws, "--case", case, "--label", tmp_path / "empty.nrrd", "--slices", "0-9")
    assert Workspace.open(ws).labelled_slices() == {case: list(range(10))}
    r = json.loads(vq("query", "--workspace", ws, "--strategy", "random", "--n", "50", "--json").stdout)
    assert sorted(s["slice"] for s in r["suggestions"]) == list(range(10, 16))  # only the 6 nobody looked at
    vq("workspace", "annotate", ws, "--case", case, "--label", tmp_path / "empty.nrrd",
       "--slices", ",".join(str(s["slice"]) for s in r["suggestions"]))
    r = json.loads(vq("query", "--workspace", ws, "--strategy", "random", "--n", "5", "--json").stdout)
    assert r["exhausted"] == "pool" and r["suggestions"] == [] and "every one of the 16 slices" in r["message"]


def test_a_query_asked_again_suggests_the_same_slices_with_every_strategy(setup, tmp_path):
    """MC dropout draws its masks: seeded per query (the preset's seed and the slices labelled so far), as random is."""
    root, _, cases = setup
    ws = tmp_path / "ws"
    case = cases[0].case_id
    vq("workspace", "init", ws)
    vq("workspace", "add", ws, "--case", case, "--ct", root / f"{case}_ct.nrrd")
    vq("workspace", "annotate", ws, "--case", case, "--label", root / f"{case}_label.nrrd", "--label-value", "1",
       "--slices", "2,5,8,11,14")
    vq("train", "--workspace", ws, "--method", "begal", "--preset", "tiny")
    for strategy in ("mcdropout", "random", "entropy"):
        first, again = (json.loads(vq("query", "--workspace", ws, "--strategy", strategy, "--n", "4", "--preset", "tiny",
                                      "--json").stdout)["suggestions"] for _ in range(2))
        assert first == again, strategy
        assert len(first) == 4, strategy


def test_query_refuses_unknown_strategy(setup):
    _, ws, _ = setup
    r = vq("query", "--workspace", ws, "--strategy", "oracle", check=False)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_simulate_writes_results_table_and_plot(tmp_path):
    out = tmp_path / "sim"
    vq("simulate", "--dataset", "phantom-liver", "--preset", "tiny", "--strategies", "begal,random",
       "--rounds", "1", "--initial", "4", "--per-round", "10%", "--seeds", "2", "--out", out, "--device", "cpu")
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"begal", "random"}
    for r in results.values():
        assert len(r["labeled_fraction"]) == len(r["dice_mean"]) == len(r["dice_std"]) == 2
        assert r["labeled_fraction"][1] > r["labeled_fraction"][0] > 0
        assert all(0 <= d <= 1 for d in r["dice_mean"])
    # both strategies start from the same initial set, so round 0 is identical
    assert results["begal"]["dice_per_seed"][0][0] == results["random"]["dice_per_seed"][0][0]
    table = (out / "results.md").read_text()
    assert "VQ + BEGAL (ours)" in table and "±" in table
    assert (out / "dice_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    run = json.loads((out / "run.json").read_text())
    assert run["seeds"] == [0, 1] and run["versions"]["torch"]
    # a share of the pool is recorded as given and as the slices it came to
    assert (run["initial"], run["per_round"]) == (4, "10%")
    assert run["per_round_slices"] == round(run["pool_slices"] / 10) and run["initial_slices"] == 4
    n_pool = run["pool_slices"]
    for r in results.values():
        assert r["labeled_fraction"] == pytest.approx([4 / n_pool, (4 + run["per_round_slices"]) / n_pool])
    assert run["device"] == "cpu" and run["threads"] >= 1 and run["cpu_count"] >= 1
    assert run["cpu_capability"] and run["cpu_model"]  # what bit-for-bit reproduction needs besides the threads


def test_a_dataset_folder_with_ct_and_mr_folders_simulates_each_ct_with_its_own_mr(tmp_path):
    """`vqmedseg phantom --out DIR` writes DIR/CT and DIR/MR; `simulate --dataset DIR`
    pairs each CT with the MR of the same case, as `--dataset phantom-liver` does, and
    `--dataset DIR/CT` runs CT-only."""
    from VQMedSegLib.active_learning.simulation import load_simulation_data
    from VQMedSegLib.data.phantoms import write_datasets
    from VQMedSegLib.errors import InputError

    write_datasets(tmp_path / "data", "phantom-liver", 4, seed=3)
    both = load_simulation_data(str(tmp_path / "data"), 32)
    ids = sorted(set(both.pool.case_ids))
    assert ids == [f"phantom-liver-{i:03d}" for i in range(4)]
    for case_id in ids:
        rows = np.flatnonzero(both.pool.case_ids == case_id)
        assert set(both.pool.mr_case_ids[both.pool.pair[rows]]) == {case_id}
    assert "with 4 MR cases (paired by case)" in both.description
    ct_only = load_simulation_data(str(tmp_path / "data" / "CT"), 32)
    assert (ct_only.pool.pair == -1).all() and len(ct_only.pool.mr) == 0
    # simulate is about the liver: a dataset whose label 1 is something else is refused, not trained on
    write_datasets(tmp_path / "lung", "phantom-lung", 3, seed=3)
    with pytest.raises(InputError, match=r"dataset.json names label 1 'tumour'; simulate compares strategies on the liver"):
        load_simulation_data(str(tmp_path / "lung"), 32)


def test_simulate_rejects_a_budget_larger_than_the_pool(tmp_path):
    r = vq("simulate", "--dataset", "phantom-liver", "--preset", "tiny", "--rounds", "100", "--per-round", "50",
           "--seeds", "1", "--out", tmp_path, check=False)
    assert r.returncode == 2 and "exceed the pool" in r.stderr


def test_simulate_table_shows_a_spread_only_over_several_seeds():
    from VQMedSegLib.active_learning.simulation import results_table, summarise

    def run(dice):
        return {"test_dice": dice, "labeled_fraction": [0.2, 0.4]}

    one = results_table(summarise({"begal": [run([0.9, 0.95])]}), "chaos", "one CT", [0], "cpu")
    assert "| VQ + BEGAL (ours) | 90.00 | 95.00 |" in one and "±" not in one.split("| strategy |")[1]
    assert "one seed" in one
    three = results_table(summarise({"begal": [run([0.9, 0.95]), run([0.8, 0.95]), run([0.7, 0.95])]}),
                          "chaos", "one CT", [0, 1, 2], "cpu")
    # population standard deviation over the seeds (ddof 0), as the header says
    assert f"| VQ + BEGAL (ours) | 80.00 ± {100 * np.std([0.9, 0.8, 0.7]):.2f} | 95.00 ± 0.00 |" in three
    assert "population standard deviation" in three


def test_pool_scoring_reports_each_batch():
    from VQMedSegLib.active_learning.strategies import _stream

    seen = []
    scores = _stream(np.arange(70), 32, lambda b: torch.as_tensor(b, dtype=torch.float32),
                     progress=lambda done, total: seen.append((done, total)))
    assert seen == [(32, 70), (64, 70), (70, 70)] and (scores == np.arange(70)).all()



def test_the_chaos_sample_data_splits_its_one_ct_patient_into_slabs_as_the_benchmark_ran(real_data):
    """The one CHAOS CT case of the sample data: 40 pool and 38 test slices at 128 x 128,
    the split `chaos-begal` ran on, with the 20 MR T2 cases as auxiliary MR; the
    benchmark's budgets (20%, then rounds of 10%) come to 8 and 4 of its slices."""
    from VQMedSegLib.active_learning.budget import slice_count
    from VQMedSegLib.active_learning.simulation import load_simulation_data

    data = load_simulation_data("chaos", 128)
    assert len(data.candidates) == 40 and [len(t) for t in data.test.values()] == [38]
    assert data.val == {} and len(set(data.pool.mr_case_ids)) == 20
    assert "alternate 8-slice slabs" in data.description
    assert (slice_count("20%", 40, "--initial"), slice_count("10%", 40, "--per-round")) == (8, 4)
