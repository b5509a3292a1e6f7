"""Synthetic phantoms: determinism, realistic intensities, shared anatomy across grids."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from VQMedSegLib.data.phantoms import (
    LIVER_LABELS,
    LUNG_LABELS,
    TISSUES,
    PhantomCase,
    make_abdominal_case,
    make_chest_case,
    make_dataset,
)
from VQMedSegLib.errors import ConfigError

SEEDS = (0, 1, 2, 3)
T = TISSUES


@pytest.fixture(scope="module")
def abdomen() -> dict[int, PhantomCase]:
    return {seed: make_abdominal_case(seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def chest() -> dict[int, PhantomCase]:
    return {seed: make_chest_case(seed) for seed in SEEDS}


def _median(volume, mask) -> float:
    assert mask.any(), "empty region"
    return float(np.median(volume.array[mask]))


def _centroid(label_volume, value: int) -> np.ndarray:
    """Physical (LPS mm) centroid of one label, via the volume's own geometry."""
    ijk = np.argwhere(label_volume.array == value)[:, ::-1]
    assert len(ijk), f"label {value} absent"
    return label_volume.index_to_physical(ijk).mean(axis=0)


def _arrays(case: PhantomCase) -> list[np.ndarray]:
    vols = [case.ct, case.ct_label, case.ct_tissue, case.mr, case.mr_label, case.mr_tissue]
    return [v.array for v in vols if v is not None]


# ----------------------------------------------------------------- determinism
def test_same_seed_is_bit_identical() -> None:
    a, b = make_abdominal_case(11), make_abdominal_case(11)
    for x, y in zip(_arrays(a), _arrays(b)):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert a.ct.same_geometry(b.ct) and a.mr.same_geometry(b.mr)
    c, d = make_chest_case(11), make_chest_case(11)
    for x, y in zip(_arrays(c), _arrays(d)):
        assert np.array_equal(x, y)


def test_different_seeds_give_different_anatomy(abdomen) -> None:
    a, b = abdomen[0], abdomen[1]
    assert not np.array_equal(a.ct.array, b.ct.array)
    assert (a.ct_label.array == 1).sum() != (b.ct_label.array == 1).sum()
    assert np.linalg.norm(_centroid(a.ct_label, 1) - _centroid(b.ct_label, 1)) > 2.0
    assert not np.array_equal(make_chest_case(0).ct_label.array, make_chest_case(1).ct_label.array)


def test_ct_does_not_depend_on_whether_mr_is_made(abdomen) -> None:
    alone = make_abdominal_case(0, with_mr=False)
    assert alone.mr is None and alone.mr_label is None
    assert np.array_equal(alone.ct.array, abdomen[0].ct.array)
    assert np.array_equal(alone.ct_label.array, abdomen[0].ct_label.array)


def test_ct_shape_changes_sampling_not_anatomy(abdomen) -> None:
    small = make_abdominal_case(0, ct_shape=(16, 64, 64), with_mr=False)
    assert small.ct.shape == (16, 64, 64) == small.ct_label.shape
    fov_small = np.asarray(small.ct.spacing) * small.ct.size_ijk
    fov_full = np.asarray(abdomen[0].ct.spacing) * abdomen[0].ct.size_ijk
    assert np.allclose(fov_small, fov_full, rtol=0.02)
    assert np.linalg.norm(_centroid(small.ct_label, 1) - _centroid(abdomen[0].ct_label, 1)) < 10.0


def test_bad_shape_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ct_shape"):
        make_abdominal_case(0, ct_shape=(40, 128))
    with pytest.raises(ConfigError, match="ct_shape"):
        make_chest_case(0, ct_shape=(0, 64, 64))


# ----------------------------------------------------------------- abdominal CT
@pytest.mark.parametrize("seed", SEEDS)
def test_ct_hounsfield_units_are_realistic(abdomen, seed: int) -> None:
    case = abdomen[seed]
    ct, lab, tis = case.ct, case.ct_label.array, case.ct_tissue.array
    assert ct.array.dtype == np.float32 and lab.dtype == np.uint8
    assert 90.0 <= _median(ct, lab == 1) <= 140.0
    assert -130.0 <= _median(ct, tis == T["fat"]) <= -70.0
    assert 20.0 <= _median(ct, tis == T["muscle"]) <= 70.0
    assert _median(ct, tis == T["air"]) < -900.0
    assert ct.array[:, :3, :3].max() < -900.0  # corners are outside the body
    assert _median(ct, np.isin(tis, [T["bone_cortical"], T["bone_cancellous"]])) > 250.0
    assert _median(ct, tis == T["aorta"]) > 150.0
    # Kidney cortex enhances more than liver.
    assert _median(ct, tis == T["kidney_cortex"]) > _median(ct, lab == 1) + 10.0


@pytest.mark.parametrize("seed", SEEDS)
def test_spleen_is_a_real_distractor(abdomen, seed: int) -> None:
    case = abdomen[seed]
    lab = case.ct_label.array
    assert abs(_median(case.ct, lab == 4) - _median(case.ct, lab == 1)) <= 25.0


def test_no_single_threshold_isolates_the_liver(abdomen) -> None:
    """Even the best HU window, chosen with the answer known, gives a poor liver Dice."""
    case = abdomen[0]
    ct, liver = case.ct.array, case.ct_label.array == 1
    best = 0.0
    for lo in range(50, 140, 10):
        for hi in range(lo + 20, 260, 10):
            band = (ct >= lo) & (ct <= hi)
            best = max(best, 2.0 * (band & liver).sum() / (band.sum() + liver.sum()))
    assert best < 0.85


@pytest.mark.parametrize("seed", SEEDS)
def test_intrahepatic_vessels_are_labelled_liver(abdomen, seed: int) -> None:
    case = abdomen[seed]
    vessels = case.ct_tissue.array == T["liver_vessel"]
    assert vessels.sum() > 50
    assert np.all(case.ct_label.array[vessels] == LIVER_LABELS["liver"])
    parenchyma = case.ct_tissue.array == T["liver"]
    assert _median(case.ct, vessels) > _median(case.ct, parenchyma) + 30.0
    # Aorta, IVC and bone are background.
    for name in ("aorta", "ivc", "bone_cortical", "bone_cancellous"):
        assert np.all(case.ct_label.array[case.ct_tissue.array == T[name]] == 0)


@pytest.mark.parametrize("seed", SEEDS)
def test_all_labels_present_on_both_grids(abdomen, seed: int) -> None:
    case = abdomen[seed]
    expected = {0, *LIVER_LABELS.values()}
    assert set(np.unique(case.ct_label.array)) == expected
    assert set(np.unique(case.mr_label.array)) == expected
    assert case.ct_label.same_geometry(case.ct) and case.mr_label.same_geometry(case.mr)


@pytest.mark.parametrize("seed", SEEDS)
def test_organs_sit_on_the_correct_side_in_lps(abdomen, seed: int) -> None:
    """LPS: +x is patient left, +y posterior. Checked on both grids (the MR may be flipped)."""
    case = abdomen[seed]
    for label in (case.ct_label, case.mr_label):
        liver, rk, lk, spleen = (_centroid(label, LIVER_LABELS[n]) for n in LIVER_LABELS)
        assert liver[0] < -20.0 and rk[0] < -20.0
        assert spleen[0] > 20.0 and lk[0] > 20.0
        assert rk[1] > liver[1] and lk[1] > liver[1]  # kidneys are posterior


@pytest.mark.parametrize("seed", SEEDS)
def test_liver_missing_at_an_end_but_present_in_most_slices(abdomen, seed: int) -> None:
    per_slice = (abdomen[seed].ct_label.array == 1).any(axis=(1, 2))
    assert not per_slice[0] or not per_slice[-1]
    assert per_slice.mean() >= 0.6


# ----------------------------------------------------------------- abdominal MR
@pytest.mark.parametrize("seed", SEEDS)
def test_mr_has_its_own_grid_but_the_same_anatomy(abdomen, seed: int) -> None:
    case = abdomen[seed]
    ct, mr = case.ct, case.mr
    assert mr.shape != ct.shape
    assert not np.allclose(mr.spacing, ct.spacing)
    def centre(v):
        return v.index_to_physical((np.asarray(v.size_ijk) - 1) / 2.0)

    assert np.linalg.norm(centre(mr) - centre(ct)) > 10.0
    assert mr.spacing[2] > ct.spacing[2] and mr.spacing[0] > ct.spacing[0]
    for name, value in LIVER_LABELS.items():
        d = np.linalg.norm(_centroid(case.ct_label, value) - _centroid(case.mr_label, value))
        assert d < 10.0, f"{name} centroid differs by {d:.1f} mm between CT and MR"


def test_some_mr_grids_are_not_identity_oriented() -> None:
    directions = [make_abdominal_case(s, ct_shape=(8, 32, 32)).mr.direction for s in range(8)]
    assert any(not np.allclose(d, np.eye(3)) for d in directions)
    assert any(np.allclose(d, np.eye(3)) for d in directions)


@pytest.mark.parametrize("seed", SEEDS)
def test_mr_contrast_is_t2_like(abdomen, seed: int) -> None:
    case = abdomen[seed]
    mr, lab = case.mr, case.mr_label.array
    assert mr.array.dtype == np.float32 and mr.array.min() >= 0.0
    liver = _median(mr, lab == 1)
    assert liver < _median(mr, lab == 4)  # spleen brighter than liver on T2
    assert liver < _median(mr, (lab == 2) | (lab == 3))  # kidneys bright
    assert _median(mr, case.mr_tissue.array == T["air"]) < 0.5 * liver


# ----------------------------------------------------------------- chest
@pytest.mark.parametrize("seed", SEEDS)
def test_chest_tumour_is_inside_lung_and_visible(chest, seed: int) -> None:
    case = chest[seed]
    assert case.mr is None and case.mr_label is None
    lab, tis, ct = case.ct_label.array, case.ct_tissue.array, case.ct
    assert set(np.unique(lab)) == {0, LUNG_LABELS["tumour"]}
    tumour = lab == 1
    # Surrounded by lung: the one-voxel in-plane shell around it is (almost) all lung.
    shell = ndimage.binary_dilation(tumour, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)) & ~tumour
    lungish = np.isin(tis[shell], [T["lung"], T["lung_vessel"]])
    assert lungish.mean() > 0.8
    lung = tis == T["lung"]
    assert _median(ct, tumour) - _median(ct, lung) > 500.0
    assert _median(ct, lung) < -750.0
    per_slice = tumour.any(axis=(1, 2))
    assert per_slice.any() and not per_slice.all()
    radius = (3.0 * tumour.sum() * np.prod(ct.spacing) / (4.0 * np.pi)) ** (1.0 / 3.0)
    assert 10.0 <= radius <= 30.0


def test_chest_has_bone_and_mediastinum(chest) -> None:
    case = chest[0]
    tis = case.ct_tissue.array
    assert _median(case.ct, np.isin(tis, [T["bone_cortical"], T["bone_cancellous"], T["rib"]])) > 250.0
    assert (tis == T["rib"]).sum() > 100
    assert 0.0 < _median(case.ct, tis == T["heart"]) < 200.0


# ----------------------------------------------------------------- datasets
def test_make_dataset_ids_and_determinism() -> None:
    cases = make_dataset("phantom-liver", 3, seed=5, ct_shape=(8, 32, 32), with_mr=False)
    assert [c.case_id for c in cases] == ["phantom-liver-000", "phantom-liver-001", "phantom-liver-002"]
    assert all(c.mr is None for c in cases)
    again = make_dataset("phantom-liver", 2, seed=5, ct_shape=(8, 32, 32), with_mr=False)
    assert all(np.array_equal(a.ct.array, b.ct.array) for a, b in zip(cases, again))
    assert not np.array_equal(cases[0].ct.array, cases[1].ct.array)
    other = make_dataset("phantom-liver", 1, seed=6, ct_shape=(8, 32, 32), with_mr=False)
    assert not np.array_equal(other[0].ct.array, cases[0].ct.array)

    lungs = make_dataset("phantom-lung", 2, ct_shape=(16, 48, 48))
    assert [c.case_id for c in lungs] == ["phantom-lung-000", "phantom-lung-001"]
    assert all(c.mr is None and c.ct.metadata["modality"] == "CT" for c in lungs)
    assert make_dataset("phantom-lung", 0) == []


def test_make_dataset_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="phantom-liver"):
        make_dataset("phantom-brain", 1)
    with pytest.raises(ConfigError, match="n_cases"):
        make_dataset("phantom-liver", -1)


def test_generation_is_fast() -> None:
    """Well under a second on a laptop; the loose bound only catches accidental blow-ups."""
    start = time.perf_counter()
    make_abdominal_case(123)
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize("kind", ["phantom-liver", "phantom-lung"])
def test_the_phantom_command_writes_datasets_the_tools_read(tmp_path, kind) -> None:
    """`vqmedseg phantom` once wrote CASE/ct.nrrd folders that no command could take as a
    dataset; it now writes one dataset folder per modality, in the image_N/label_N layout
    with a dataset.json naming the modality and the labels."""
    import json

    from conftest import run_main

    from VQMedSegLib.data.datasets import discover_cases, load_case
    from VQMedSegLib.training.ssl_experiment import load_cases

    printed = run_main("phantom", "--out", tmp_path, "--kind", kind, "--n", "2", "--seed", "5").stdout
    cases = make_dataset(kind, 2, seed=5)
    labels = LIVER_LABELS if kind == "phantom-liver" else LUNG_LABELS
    modalities = ["CT", "MR"] if kind == "phantom-liver" else ["CT"]
    assert sorted(p.name for p in tmp_path.iterdir()) == modalities
    for modality in modalities:
        folder = tmp_path / modality
        info = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
        assert info["channel_names"] == {"0": modality} and info["labels"] == {"background": 0, **labels}
        assert info["numTraining"] == 2 and info["file_ending"] == ".nrrd"
        refs = discover_cases(folder)
        assert [r.case_id for r in refs] == [c.case_id for c in cases]
        assert {(r.modality, r.layout, r.options["modality_source"]) for r in refs} == {(modality, "pairs", "dataset.json")}
        for ref, case in zip(refs, cases):
            image, label = load_case(ref)
            expected_image, expected_label = (case.ct, case.ct_label) if modality == "CT" else (case.mr, case.mr_label)
            assert image.same_geometry(expected_image) and np.allclose(image.array, expected_image.array)
            assert np.array_equal(label.array, expected_label.array)
        assert f"{folder}: 2 {modality} cases" in printed
        report = json.loads(run_main("dataset", "check", folder, "--json").stdout)
        assert report["n_cases"] == 2 and all(not c["problems"] for c in report["cases"]), report
        # an experiment names the structures as the dataset.json does
        assert load_cases(str(folder)).structures == {value: name for name, value in labels.items()}


def test_the_phantom_command_replaces_its_own_dataset_and_never_touches_anyone_elses(tmp_path) -> None:
    """Written again with fewer cases, a phantom dataset once kept the earlier cases beside a
    dataset.json counting fewer; another --kind mixed liver and lung cases under the lung's
    labels; and a dataset folder of the user's got phantom cases and a new dataset.json."""
    import json

    from conftest import run_main

    from VQMedSegLib.data.datasets import discover_cases

    run_main("phantom", "--out", tmp_path / "ph", "--n", "3")
    run_main("phantom", "--out", tmp_path / "ph", "--n", "2", "--seed", "1")
    for modality in ("CT", "MR"):
        assert [r.case_id for r in discover_cases(tmp_path / "ph" / modality)] == ["phantom-liver-000", "phantom-liver-001"]
        assert json.loads((tmp_path / "ph" / modality / "dataset.json").read_text(encoding="utf-8"))["numTraining"] == 2
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "ph").rglob("*"))
    lung = run_main("phantom", "--out", tmp_path / "ph", "--kind", "phantom-lung", "--n", "1", check=False)
    assert lung.returncode == 2 and (f"{tmp_path / 'ph' / 'CT'}: holds a phantom-liver dataset; expected a new or empty "
                                     "folder, or one of phantom-lung to write again; give another --out") in lung.stderr
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "ph").rglob("*")) == before
    mine = tmp_path / "mine" / "CT"
    mine.mkdir(parents=True)
    (mine / "dataset.json").write_text('{"name": "my hospital CT"}', encoding="utf-8")
    (mine / "image_1.nii.gz").write_bytes(b"not read")
    theirs = run_main("phantom", "--out", tmp_path / "mine", "--n", "1", check=False)
    assert theirs.returncode == 2 and (f"{mine}: holds dataset.json and image_1.nii.gz, which vqmedseg phantom did not "
                                       "write; expected a new or empty folder") in theirs.stderr, theirs.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["dataset.json", "image_1.nii.gz"] and not (tmp_path / "mine" / "MR").exists()
    assert (mine / "dataset.json").read_text(encoding="utf-8") == '{"name": "my hospital CT"}'


def test_the_phantom_command_refuses_no_cases(tmp_path) -> None:
    from conftest import run_main

    r = run_main("phantom", "--out", tmp_path / "none", "--n", "0", check=False)
    assert r.returncode == 2 and "--n 0: expected at least 1 case" in r.stderr
    assert not (tmp_path / "none").exists()
