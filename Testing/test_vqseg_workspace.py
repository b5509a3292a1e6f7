"""VQ-Seg through a workspace, each command through the CLI's ``main`` in this process:
train on labelled + unlabelled slices, then predict with both uncertainty maps (entropy
and QPM)."""

from __future__ import annotations

import json


from VQMedSegLib.data.io import read_label, read_volume
from VQMedSegLib.jobs.workspace import Workspace

from conftest import one_case_workspace, run_main as vq



def test_vqseg_trains_on_a_workspace_and_predicts_two_uncertainty_maps(tmp_path):
    ws = one_case_workspace(tmp_path, "phantom-lung", "lung-tumour", "c1", (12, 64, 64), 4, "--slices", "3-6")
    config = {"slice_size": 32, "features": [4, 8, 8, 16, 16], "code_dim": 8, "num_codes": 64, "iterations": 12,
              "labelled_batch": 2, "unlabelled_batch": 2, "warmup_supervised": 2, "foundation": "none"}
    (tmp_path / "vqseg.json").write_text(json.dumps(config))
    vq("train", "--workspace", ws, "--method", "vqseg", "--config", tmp_path / "vqseg.json", "--device", "cpu")
    events = [json.loads(line) for line in (ws / "events.jsonl").read_text().splitlines()]
    info = next(e for e in events if e["type"] == "info" and e.get("method") == "vqseg")
    assert info["labelled_slices"] == 4 and info["unlabelled_slices"] == 8 and info["qpm_kl"] > 0
    losses = [e for e in events if e["type"] == "loss"]
    assert {"seg_qpm", "seg_cutmix", "perplexity", "utilisation"} <= set(losses[-1])
    assert any(e["type"] == "warning" and "PFA is off" in e["message"] for e in events)
    model = Workspace.open(ws).latest_model("vqseg")
    vq("predict", "--model", ws / model["path"], "--ct", tmp_path / "ct.nrrd", "--out", tmp_path / "pred")
    entropy = read_volume(tmp_path / "pred" / "uncertainty.nrrd")
    qpm = read_volume(tmp_path / "pred" / "uncertainty_qpm.nrrd")
    ct = read_volume(tmp_path / "ct.nrrd")
    assert entropy.same_geometry(ct) and qpm.same_geometry(ct)
    assert 0 <= qpm.array.min() and qpm.array.max() <= 1
    assert read_label(tmp_path / "pred" / "prediction.seg.nrrd").same_geometry(ct)
    # the QPM map is drawn, but the same model on the same CT gives the same map every time
    assert qpm.array.max() > 0
    vq("predict", "--model", ws / model["path"], "--ct", tmp_path / "ct.nrrd", "--out", tmp_path / "again")
    assert (read_volume(tmp_path / "again" / "uncertainty_qpm.nrrd").array == qpm.array).all()
