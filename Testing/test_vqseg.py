"""VQ-Seg parts: quantiser, EMA teacher, patch InfoNCE, CutMix, and a few training steps."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from VQMedSegLib.models.vqseg import MappedEuclideanQuantizer, VQSegNet, patch_info_nce
from VQMedSegLib.training.distributed import DistInfo
from VQMedSegLib.training.vqseg import VQSegConfig, VQSegTrainer, cutmix, cutmix_boxes, ema_update


def test_quantizer_picks_the_nearest_codeword_and_passes_gradients():
    torch.manual_seed(0)
    vq = MappedEuclideanQuantizer(num_codes=50, dim=6, chunk=7)
    z = torch.randn(2, 6, 3, 4, requires_grad=True)
    out = vq(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 6)
    expected = torch.cdist(flat, vq.codebook().detach()).argmin(1)
    assert torch.equal(out.indices.flatten(), expected)
    (out.quantized.sum() + out.entropy_loss + out.codebook_loss).backward()
    assert z.grad.abs().sum() > 0 and vq.mapping.weight.grad.abs().sum() > 0


def test_ema_update_moves_teacher_towards_student():
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    with torch.no_grad():
        student.weight.fill_(1.0)
        teacher.weight.fill_(0.0)
    ema_update(teacher, student, 0.996)
    torch.testing.assert_close(teacher.weight, torch.full((2, 3), 0.004))
    ema_update(teacher, student, 0.996)
    torch.testing.assert_close(teacher.weight, torch.full((2, 3), 1 - 0.996**2))


def test_info_nce_prefers_aligned_over_shuffled_features():
    torch.manual_seed(0)
    target = torch.randn(2, 16, 6, 6)
    aligned = target + 0.1 * torch.randn_like(target)
    shuffled = aligned.flatten(2)[:, :, torch.randperm(36)].reshape_as(aligned)
    good = patch_info_nce(aligned, target, 0.07)
    bad = patch_info_nce(shuffled, target, 0.07)
    assert good < 0.1 < np.log(36) - 1 < bad


def test_cutmix_keeps_labels_with_their_pixels():
    rng = np.random.default_rng(0)
    images = torch.arange(4.0)[:, None, None, None].expand(4, 1, 16, 16).clone()
    labels = torch.arange(4)[:, None, None].expand(4, 16, 16).clone()
    masks = cutmix_boxes(4, 16, rng)
    assert 0 < masks.mean() < 1
    perm = torch.tensor([1, 2, 3, 0])
    mixed, mixed_labels = cutmix(images, labels, masks, perm)
    # every pixel's label is the index of the image its intensity came from
    torch.testing.assert_close(mixed[:, 0], mixed_labels.float())


def test_qpm_perturbation_changes_codes_but_keeps_shapes():
    torch.manual_seed(0)
    net = VQSegNet(features=(4, 8, 8, 16, 16), code_dim=8, num_codes=64, epsilon=0.7)
    x = torch.rand(2, 1, 32, 32)
    clean = net(x, perturb=False)
    noisy = net(x, perturb=True)
    assert noisy.logits.shape == clean.logits.shape == (2, 2, 32, 32)
    assert clean.reconstruction.shape == (2, 1, 32, 32)
    assert not torch.equal(noisy.quantized_used, clean.quantized_used)


def _tiny_trainer(**config) -> VQSegTrainer:
    """A trainer on 6 labelled and 6 unlabelled random 32 x 32 slices with 8-channel
    foundation features, PFA from the second step on."""
    rng = np.random.default_rng(0)
    lx = rng.random((6, 1, 32, 32)).astype(np.float32)
    ly = (lx[:, 0] > 0.5).astype(np.int64)
    ux = rng.random((6, 1, 32, 32)).astype(np.float32)
    fm = rng.standard_normal((6, 8, 4, 4)).astype(np.float16)
    cfg = VQSegConfig(slice_size=32, features=(4, 8, 8, 16, 16), code_dim=8, num_codes=64, labelled_batch=2,
                      unlabelled_batch=2, warmup_supervised=1, pfa_grid=4, **config)
    return VQSegTrainer(cfg, lx, ly, ux, fm, fm_channels=8, device=torch.device("cpu"))


def test_a_few_semi_supervised_steps_run_and_the_teacher_follows():
    trainer = _tiny_trainer(iterations=4)
    before = [p.detach().clone() for p in trainer.teacher.parameters()]
    seen = []
    trainer.run(on_step=lambda it, total, losses: seen.append(losses))
    assert len(seen) == 4 and {"seg_qpm", "seg_cutmix", "align", "rec_u"} <= set(seen[-1])
    assert all(np.isfinite(v) for v in seen[-1].values())
    after = list(trainer.teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert trainer.predict(np.random.default_rng(1).random((6, 1, 32, 32)).astype(np.float32)).shape == (6, 32, 32)


@pytest.mark.parametrize("source, moves, still", [("straight-through", "encoder", "quantizer"),
                                                  ("codewords", "quantizer", "encoder")])
def test_the_alignment_term_moves_the_encoder_or_the_codebook_mapping_as_configured(source, moves, still):
    """Eq. 11 on the straight-through output trains the encoder (the codebook only follows
    through its own loss); on the codewords themselves it trains the codebook mapping and
    leaves the encoder alone. The adapter learns either way."""
    from VQMedSegLib.training.vqseg import VQSegObjective

    torch.manual_seed(0)
    cfg = VQSegConfig(features=(4, 8, 8, 16, 16), code_dim=8, num_codes=64, pfa_source=source)
    net = VQSegNet(features=cfg.features, code_dim=8, num_codes=64, fm_channels=6)
    objective = VQSegObjective(net, cfg)
    objective.alignment(torch.rand(2, 1, 32, 32), torch.randn(2, 6, 4, 4)).backward()

    def grad_norm(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    assert grad_norm(getattr(net, moves)) > 0
    assert grad_norm(getattr(net, still)) == 0
    assert grad_norm(net.pfa) > 0


def test_unlabelled_weight_ramps_up_after_the_supervised_warm_up():
    from VQMedSegLib.training.vqseg import rampup_weight

    assert rampup_weight(9, start=10, length=100) == 0.0
    assert rampup_weight(10, start=10, length=100) == pytest.approx(np.exp(-5.0))
    assert rampup_weight(60, start=10, length=100) == pytest.approx(np.exp(-5.0 * 0.25))
    assert rampup_weight(110, start=10, length=100) == 1.0 == rampup_weight(5000, start=10, length=100)
    assert rampup_weight(10, start=10, length=0) == 1.0
    values = [rampup_weight(i, 10, 100) for i in range(10, 111)]
    assert values == sorted(values)


def test_the_alignment_weight_is_the_papers_constant_or_fades_out_along_a_cosine():
    """``lambda_a_schedule``: "constant" keeps eq. 12's lambda_a from the end of the
    supervised warm-up on; "cosine" starts there at lambda_a and falls to 0 at the last
    iteration."""
    from VQMedSegLib.training.vqseg import alignment_weight

    constant = VQSegConfig(lambda_a=5.0, warmup_supervised=100, iterations=1100)
    assert alignment_weight(99, constant) == 0.0
    assert alignment_weight(100, constant) == alignment_weight(1099, constant) == 5.0
    cosine = constant.replace(lambda_a_schedule="cosine")
    assert alignment_weight(99, cosine) == 0.0
    assert alignment_weight(100, cosine) == 5.0
    assert alignment_weight(600, cosine) == pytest.approx(2.5)
    assert alignment_weight(350, cosine) == pytest.approx(2.5 * (1 + np.cos(np.pi / 4)))
    assert alignment_weight(1100, cosine) == pytest.approx(0.0, abs=1e-12)
    values = [alignment_weight(i, cosine) for i in range(100, 1101)]
    assert values == sorted(values, reverse=True) and 0 < values[-2] < 1e-4


def test_a_fading_alignment_weighs_each_steps_alignment_loss_by_the_schedule():
    runs = {}
    for schedule in ("constant", "cosine"):
        torch.manual_seed(0)
        trainer = _tiny_trainer(iterations=5, lambda_a=5.0, lambda_a_schedule=schedule)
        seen = []
        trainer.run(on_step=lambda it, total, losses: seen.append(losses))
        runs[schedule] = seen
    assert [s.get("lambda_a") for s in runs["constant"]] == [None, 5.0, 5.0, 5.0, 5.0]
    assert [s.get("lambda_a") for s in runs["cosine"]] == pytest.approx(
        [None, 5.0, 2.5 * (1 + np.cos(np.pi / 4)), 2.5, 2.5 * (1 - np.cos(np.pi / 4))])
    # the first aligned step is the same in both; after it the student has moved less far along the alignment
    assert runs["cosine"][1]["align"] == runs["constant"][1]["align"]
    assert runs["cosine"][2]["total"] != runs["constant"][2]["total"]


@pytest.mark.parametrize("bad, key", [({"epsilon": 1.5}, "epsilon"), ({"perturbation": "gaussian"}, "perturbation"),
                                      ({"confidence_threshold": 1.0}, "confidence_threshold"), ({"num_code": 8}, "num_code"),
                                      ({"pfa_source": "encoder"}, "pfa_source"),
                                      ({"lambda_a_schedule": "linear"}, "lambda_a_schedule")])
def test_vqseg_config_names_the_bad_key(bad, key):
    from VQMedSegLib.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        VQSegConfig.from_json(bad)


def test_euclidean_assignment_matches_cdist_and_eval_mode_uses_it():
    from VQMedSegLib.models.vqseg import euclidean_assign

    torch.manual_seed(1)
    flat, codebook = torch.randn(1000, 16), torch.randn(300, 16)
    assert torch.equal(euclidean_assign(flat, codebook, chunk=97), torch.cdist(flat, codebook).argmin(1))
    vq = MappedEuclideanQuantizer(num_codes=300, dim=16).eval()
    z = torch.randn(2, 16, 5, 5)
    out = vq(z)
    expected = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 16), vq.codebook().detach()).argmin(1)
    assert torch.equal(out.indices.flatten(), expected) and float(out.entropy_loss) == 0.0


def test_cpu_presets_bound_the_foundation_feature_pass_and_the_paper_preset_uses_every_slice():
    # LiteMedSAM takes about 3 s a slice on one CPU thread: a CPU preset must not wait an
    # hour on a large workspace's unlabelled slices before its first step
    from VQMedSegLib.config import vqseg_config_from_preset

    for preset in ("tiny", "quick", "cpu"):
        assert 0 < vqseg_config_from_preset(preset).pfa_slices <= 96, preset
    assert vqseg_config_from_preset("paper").pfa_slices == 0  # all of them, as in the paper


def _square_slices(n: int = 3) -> np.ndarray:
    """``n`` copies of a 32 x 32 slice: background 0.2, a bright square off the centre."""
    x = np.full((n, 1, 32, 32), 0.2, np.float32)
    x[:, :, 4:13, 6:15] = 0.9
    return x


def _centroid(img: torch.Tensor) -> np.ndarray:
    """Centroid of the bright square (pixels above the halfway level)."""
    a = img.squeeze().numpy()
    ys, xs = np.nonzero(a > (a.min() + a.max()) / 2)
    return np.array([ys.mean(), xs.mean()])


def _trainer(strong: bool, rank: int = 0) -> VQSegTrainer:
    ux = _square_slices()
    cfg = VQSegConfig(slice_size=32, features=(4, 8, 8, 16, 16), code_dim=8, num_codes=64, iterations=4,
                      labelled_batch=2, unlabelled_batch=1, warmup_supervised=1, use_pfa=False, strong_augment=strong)
    return VQSegTrainer(cfg, ux, (ux[:, 0] > 0.5).astype(np.int64), ux, None, fm_channels=0, device=torch.device("cpu"),
                        dist_info=DistInfo(rank=rank))


def test_every_rank_draws_its_own_augmentation_streams():
    """Four streams a rank (weak, intensity, geometric, strong): under torchrun no stream
    of one rank may start where another rank's does, and rank 0 keeps single-process seeds."""
    def states(trainer):
        return [tuple(t.R.get_state()[1][:8]) for t in (trainer.weak, trainer.intensity, trainer.geometric, trainer.strong)]

    ranks = [states(_trainer(strong=True, rank=r)) for r in range(3)]
    every = [s for streams in ranks for s in streams]
    assert len(set(every)) == len(every) == 12
    from VQMedSegLib.training.supervised import augmentation
    from VQMedSegLib.training.vqseg import strong_intensity

    single = [tuple(t.R.get_state()[1][:8]) for t in (augmentation(0), strong_intensity(3))]  # VQSegConfig's seed is 0
    assert [ranks[0][0], ranks[0][3]] == single


def test_unlabelled_slices_are_rotated_and_the_students_strong_view_gets_colour_jitter_and_blur():
    """The paper (section 4.1): random rotation, colour jittering and CutMix for unlabelled
    data. With one unlabelled slice a step, CutMix pastes the slice into itself, so the
    strong view is the weak view with the intensity changes alone."""
    trainer = _trainer(strong=True)
    original = _centroid(torch.as_tensor(_square_slices(1)[0]))
    moved, jittered = 0, 0
    for _ in range(12):
        u = trainer.unlabelled_batch()
        if np.abs(_centroid(u.x[0]) - original).max() > 1.0:
            moved += 1
        # the strong view keeps the weak view's geometry, so its pseudo-label still fits it
        assert torch.equal(u.y_mix, u.pseudo)
        np.testing.assert_allclose(_centroid(u.x_mix[0]), _centroid(u.x[0]), atol=0.75)
        assert np.corrcoef(u.x_mix.flatten().numpy(), u.x.flatten().numpy())[0, 1] > 0.8
        # clipped to the weak view's range, as colour jitter on an 8-bit image is
        assert u.x.min() - 1e-6 <= u.x_mix.min() and u.x_mix.max() <= u.x.max() + 1e-6
        if (u.x_mix - u.x).abs().max() > 0.05:
            jittered += 1
    assert moved >= 4 and jittered >= 6


def test_without_strong_augmentation_unlabelled_views_keep_their_geometry_and_the_cutmix_view_its_intensities():
    trainer = _trainer(strong=False)
    original = _centroid(torch.as_tensor(_square_slices(1)[0]))
    for _ in range(6):
        u = trainer.unlabelled_batch()
        np.testing.assert_allclose(_centroid(u.x[0]), original, atol=1e-6)
        assert torch.equal(u.x_mix, u.x)


def test_foundation_features_report_each_batch_and_can_be_stopped_between_them():
    from VQMedSegLib.training.vqseg import foundation_features

    class Stub(torch.nn.Module):
        def forward(self, x):
            return x.repeat(1, 3, 1, 1)

    images = np.random.default_rng(0).random((10, 1, 8, 8), dtype=np.float32)
    seen = []
    out = foundation_features(Stub(), images, grid=2, batch=4, progress=lambda done, total: seen.append((done, total)))
    assert out.shape == (10, 3, 2, 2) and seen == [(4, 10), (8, 10), (10, 10)]

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        foundation_features(Stub(), images, grid=2, batch=4, progress=stop)

