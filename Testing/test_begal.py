"""VQ-BEGAL: entropy score, bimodal selection, budget, the phase schedule's freezing,
CT-only inference, pairing, and the baseline strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from VQMedSegLib.active_learning.budget import Budget, slice_count
from VQMedSegLib.active_learning.pool import CaseInput, body_positions, build_pool, target_case
from VQMedSegLib.active_learning.strategies import (
    BOTH,
    DECODER,
    ENCODER,
    bimodal_select,
    kcenter_greedy,
    mc_dropout_scores,
    modality_scores,
    select,
)
from VQMedSegLib.config import begal_config_from_preset
from VQMedSegLib.data.phantoms import make_dataset
from VQMedSegLib.errors import InputError
from VQMedSegLib.models.begal import binary_entropy_from_logits
from VQMedSegLib.training.begal import PhaseTrainer, build_model, round_schedule

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cases():
    return make_dataset("phantom-liver", 3, seed=5, ct_shape=(12, 64, 64))


@pytest.fixture(scope="module")
def pool(cases):
    inputs = [target_case(c.case_id, c.ct, c.ct_label, c.mr) for c in cases]
    return build_pool(inputs, 32, (-160, 240), seed=0)


@pytest.fixture
def config():
    return begal_config_from_preset("tiny")


def test_entropy_score_matches_eq5():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0], [np.log(3), 0.0]])
    h = binary_entropy_from_logits(logits)
    p = 0.75
    expected = [np.log(2), 0.0, -(p * np.log(p) + (1 - p) * np.log(1 - p))]
    np.testing.assert_allclose(h.numpy(), expected, atol=1e-6)


def test_bimodal_selection_on_known_scores():
    scores = np.array([0.5, 0.9, 0.1, 0.7, 0.3, 0.05, 0.69])
    high, low = bimodal_select(scores, 4)
    assert high == [1, 3] and low == [5, 2]
    high, low = bimodal_select(scores, 5)  # odd: the extra slice goes to the high side
    assert high == [1, 3, 6] and low == [5, 2]
    high, low = bimodal_select(scores[:3], 10)  # fewer candidates than asked: all, no repeats
    assert sorted(high + low) == [0, 1, 2]


def test_budget_arithmetic():
    b = Budget(total=100)
    assert b.allowance(50) == 50
    b.spend(25, 25)  # eq. 9: b = b + 2n
    assert (b.spent, b.remaining) == (50, 50)
    b.spend(25, 20)
    assert b.allowance(50) == 5
    with pytest.raises(InputError, match="only 5 of 100 remain"):
        b.spend(3, 3)
    b.spend(3, 2)
    assert b.exhausted and b.allowance(10) == 0


def test_a_number_of_slices_is_a_count_or_a_share_of_the_pool():
    """`--initial` and `--per-round` take a count or a share such as 10%: a benchmark's
    budgets (20% initial, rounds of 10%) then mean the same on a pool of 40 slices and on
    one of 1,350."""
    assert slice_count(8, 40, "--initial") == 8 and slice_count("8", 40, "--initial") == 8
    assert slice_count("20%", 40, "--initial") == 8 and slice_count("10%", 40, "--per-round") == 4
    assert slice_count("10%", 1350, "--per-round") == 135 and slice_count("12.5%", 40, "--per-round") == 5
    assert slice_count("1%", 40, "--per-round") == 1  # a share rounds to at least one slice
    for bad in ("0%", "150%", "ten", "-3", 0, "2.5", "%"):
        with pytest.raises(InputError, match=r"--per-round: found '?.*'?; expected a number of slices \(1 or more\) "
                                             r"or a share of the pool's 40 slices such as 10%"):
            slice_count(bad, 40, "--per-round")


def test_one_or_two_ct_patients_are_cut_into_slabs_and_more_are_split_by_patient():
    """With a single CT patient (the CHAOS case here) the test slices must come from that
    patient: alternate 8-slice slabs, counted within each case. With three or more (the
    CHAOS training set has 20), whole patients are held out, as the paper's figures are."""
    from VQMedSegLib.active_learning.simulation import chaos_split

    cases = make_dataset("phantom-liver", 4, seed=5, ct_shape=(20, 64, 64))
    inputs = [target_case(c.case_id, c.ct, c.ct_label) for c in cases]
    mr = [(cases[0].case_id + "-mr", cases[0].mr)]

    one = chaos_split(inputs[:1], mr, 32, seed=0)
    (group, test), = one.test.items()
    assert group == f"{inputs[0].case_id}-test-slabs" and one.val == {}
    n = len(one.pool)
    assert test.tolist() == [i for i in range(n) if (i // 8) % 2 == 1]
    assert one.candidates.tolist() == [i for i in range(n) if (i // 8) % 2 == 0]
    assert "alternate 8-slice slabs" in one.description and "1 CHAOS MR T2 cases" in one.description

    two = chaos_split(inputs[:2], mr, 32, seed=0)
    assert set(two.test) == {f"{c.case_id}-test-slabs" for c in inputs[:2]}
    for case in inputs[:2]:  # each case's slabs start at its own first slice
        rows = np.flatnonzero(two.pool.case_ids == case.case_id)
        assert two.test[f"{case.case_id}-test-slabs"].tolist() == rows[(np.arange(len(rows)) // 8) % 2 == 1].tolist()
    assert len(two.candidates) + sum(len(t) for t in two.test.values()) == len(two.pool)

    four = chaos_split(inputs, mr, 32, seed=0)
    pool_cases = set(four.pool.case_ids[four.candidates])
    assert pool_cases == {c.case_id for c in inputs[:2]}
    assert set(four.val) == {inputs[2].case_id} and set(four.test) == {inputs[3].case_id}
    assert not pool_cases & (set(four.val) | set(four.test))
    assert "held out by patient" in four.description


def test_kcenter_greedy_picks_far_points_first():
    cand = np.array([[0.0], [0.1], [5.0], [10.0], [10.1]])
    assert kcenter_greedy(cand, np.array([[0.0]]), 2) == [4, 2]


def test_a_target_case_keeps_one_label_value_as_its_binary_oracle(cases):
    """Liver is label 1 in the phantoms and in CHAOS; kidneys and spleen must not leak in."""
    c = cases[0]
    assert set(np.unique(c.ct_label.array)) > {0, 1}  # the phantom holds other organs too
    case = target_case(c.case_id, c.ct, c.ct_label, c.mr)
    assert case.case_id == c.case_id and case.ct is c.ct and case.mr is c.mr
    assert case.label.array.dtype == np.uint8
    np.testing.assert_array_equal(case.label.array, (c.ct_label.array == 1).astype(np.uint8))
    np.testing.assert_array_equal(case.label.spacing, c.ct_label.spacing)
    spleen = target_case(c.case_id, c.ct, c.ct_label, value=4)
    assert spleen.mr is None
    np.testing.assert_array_equal(spleen.label.array, (c.ct_label.array == 4).astype(np.uint8))


def test_pairing_uses_relative_body_position_and_is_deterministic(cases):
    inputs = [CaseInput(c.case_id, c.ct, None, None) for c in cases[:2]]
    extra = [(c.case_id, c.mr) for c in cases]
    a = build_pool(inputs, 32, (-160, 240), seed=3, extra_mr=extra)
    b = build_pool(inputs, 32, (-160, 240), seed=3, extra_mr=extra)
    np.testing.assert_array_equal(a.pair, b.pair)
    # each CT slice is paired with the MR slice closest in relative body position
    gap = np.abs(a.position - a.mr_position[a.pair])
    assert gap.max() < 0.15
    # the inferior end pairs with the inferior end of the MR
    first = np.flatnonzero(a.case_ids == cases[0].case_id)
    assert a.mr_position[a.pair[first[0]]] < 0.2 and a.mr_position[a.pair[first[-1]]] > 0.8


def test_same_patient_mr_is_preferred(pool, cases):
    for c in cases:
        rows = np.flatnonzero(pool.case_ids == c.case_id)
        assert set(pool.mr_case_ids[pool.pair[rows]]) == {c.case_id}


def test_body_positions_span_the_body_only():
    slices = np.zeros((10, 8, 8), np.float32)
    slices[2:8, 2:6, 2:6] = 1
    pos = body_positions(slices, 0.5)
    assert pos[2] == 0 and pos[7] == 1 and pos[0] == 0 and pos[9] == 1


def _params(modules):
    return [p.detach().clone() for m in modules for p in m.parameters()]


def test_encoder_and_decoder_phases_freeze_the_other_half(pool, config):
    torch.manual_seed(0)
    model = build_model(config)
    trainer = PhaseTrainer(model, config, pool, CPU, seed=0)
    labelled = {0: ENCODER, 5: ENCODER, 10: DECODER, 15: DECODER, 20: BOTH}
    phases = round_schedule("begal", 1, labelled, config)
    assert [p.name for p in phases] == ["encoder", "decoder"]
    assert sorted(phases[0].samples.tolist()) == [0, 5, 20] and sorted(phases[1].samples.tolist()) == [10, 15, 20]

    enc0, dec0 = _params(model.encoder_modules()), _params(model.decoder_modules())
    codebook0 = model.quantizer.codebook.detach().clone()
    trainer.run([phases[0]])
    enc1, dec1 = _params(model.encoder_modules()), _params(model.decoder_modules())
    assert all(torch.equal(a, b) for a, b in zip(dec0, dec1)), "decoder changed in the encoder phase"
    assert any(not torch.equal(a, b) for a, b in zip(enc0, enc1)), "encoders did not learn in the encoder phase"

    codebook1 = model.quantizer.codebook.detach().clone()
    trainer.run([phases[1]])
    enc2, dec2 = _params(model.encoder_modules()), _params(model.decoder_modules())
    assert all(torch.equal(a, b) for a, b in zip(enc1, enc2)), "encoders changed in the decoder phase"
    assert torch.equal(codebook1, model.quantizer.codebook), "codebook revived or moved in the decoder phase"
    assert any(not torch.equal(a, b) for a, b in zip(dec1, dec2)), "decoder did not learn in the decoder phase"
    assert not torch.equal(codebook0, codebook1)


def test_other_strategies_train_end_to_end(config):
    labelled = {0: BOTH, 1: BOTH}
    assert [p.name for p in round_schedule("egal", 2, labelled, config)] == ["end-to-end"]
    assert round_schedule("begal", 0, labelled, config)[0].name == "initial"
    assert round_schedule("random", 1, labelled, config)[0].iterations == config.round_iterations


def test_ct_only_inference_runs_and_matches_duplicated_codes(pool, config):
    torch.manual_seed(0)
    model = build_model(config).eval()
    ct, mr, present = pool.batch(np.arange(4))
    ct_t = torch.as_tensor(ct)
    ct_only = model(ct_t)
    assert ct_only.logits.shape == (4, 2, 32, 32)
    torch.testing.assert_close(ct_only.z_mr, ct_only.z_ct)  # a missing MR is filled with the CT's own codes
    with_mr = model(ct_t, torch.as_tensor(mr), torch.as_tensor(present))
    assert not torch.allclose(with_mr.logits, ct_only.logits)
    # a pair marked as missing behaves exactly like CT-only for that slice
    absent = model(ct_t, torch.as_tensor(mr), torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(absent.logits, ct_only.logits)
    assert modality_scores(model, pool, np.arange(6), CPU).shape == (6,)


def test_training_with_mr_dropout_teaches_ct_only(pool, config):
    """After training, CT-only predictions agree closely with CT+MR predictions."""
    torch.manual_seed(1)
    cfg = config.replace(mr_dropout=0.5, initial_iterations=60)
    model = build_model(cfg)
    trainer = PhaseTrainer(model, cfg, pool, CPU, seed=1)
    labelled = {int(i): BOTH for i in np.flatnonzero(pool.labels.reshape(len(pool), -1).any(1))[:12]}
    trainer.run(round_schedule("begal", 0, labelled, cfg))
    idx = np.arange(len(pool))
    ct, mr, present = pool.batch(idx)
    with torch.no_grad():
        a = model(torch.as_tensor(ct)).logits.argmax(1)
        b = model(torch.as_tensor(ct), torch.as_tensor(mr), torch.as_tensor(present)).logits.argmax(1)
    assert (a == b).float().mean() > 0.9


@pytest.mark.parametrize("strategy", ["begal", "egal", "random", "entropy", "mcdropout", "coreset"])
def test_every_strategy_selects_unlabelled_slices_only(pool, config, strategy):
    torch.manual_seed(0)
    model = build_model(config)
    labelled = np.arange(0, 10)
    unlabelled = np.arange(10, len(pool))
    picks = select(strategy, model, pool, unlabelled, labelled, 6, CPU, np.random.default_rng(0), mc_samples=3)
    idx = [p.index for p in picks]
    assert len(idx) == 6 == len(set(idx)) and set(idx) <= set(unlabelled.tolist())
    if strategy == "begal":
        assert [p.purpose for p in picks].count(DECODER) == 3 and [p.purpose for p in picks].count(ENCODER) == 3
        dec = [p.score for p in picks if p.purpose == DECODER]
        enc = [p.score for p in picks if p.purpose == ENCODER]
        assert min(dec) >= max(enc)


def test_mc_dropout_passes_differ(pool, config):
    torch.manual_seed(0)
    model = build_model(config.replace(decoder_dropout=0.3))
    s1 = mc_dropout_scores(model, pool, np.arange(4), CPU, samples=3)
    s2 = mc_dropout_scores(model, pool, np.arange(4), CPU, samples=3)
    assert not np.allclose(s1, s2)
    with pytest.raises(InputError, match="no active dropout"):
        mc_dropout_scores(build_model(config.replace(decoder_dropout=0.0)), pool, np.arange(2), CPU)


def test_plateau_stops_queries_after_patience_rounds(config):
    from VQMedSegLib.active_learning.rounds import _plateau

    cfg = config.replace(patience=2, min_delta=0.01)
    rounds = lambda *v: {"rounds": [{"val_dice": x} for x in v]}  # noqa: E731
    assert _plateau(rounds(0.5, 0.6, 0.7), cfg) == ""
    assert _plateau(rounds(0.5, 0.70, 0.705, 0.702), cfg).startswith("validation Dice has not improved by 0.01 for 2 rounds")
    assert _plateau(rounds(0.5, 0.70, 0.705, 0.72), cfg) == ""
    assert _plateau(rounds(0.5, 0.70, 0.69, 0.69), config.replace(patience=0)) == ""  # patience 0: never stop


def test_pool_can_live_in_memory_mapped_files(cases, pool, tmp_path):
    """The same pool, memory-mapped: RAM no longer grows with the number of slices."""
    inputs = [target_case(c.case_id, c.ct, c.ct_label, c.mr) for c in cases]
    mapped = build_pool(inputs, 32, (-160, 240), seed=0, storage=tmp_path)
    assert isinstance(mapped.ct, np.memmap) and isinstance(mapped.mr, np.memmap) and isinstance(mapped.labels, np.memmap)
    np.testing.assert_array_equal(mapped.ct, pool.ct)
    np.testing.assert_array_equal(mapped.mr, pool.mr)
    np.testing.assert_array_equal(mapped.labels, pool.labels)
    np.testing.assert_array_equal(mapped.pair, pool.pair)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.npy", "labels.npy", "mr.npy"]
