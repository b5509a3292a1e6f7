"""Speed and memory of VQMedSeg's hot paths, against the alternatives, measured in one run.

Usage::

    python benchmarks/run_speed.py --out bench-out [--threads 2] [--full]

writes ``bench-out/speed.json`` and ``bench-out/speed.md``. Every ratio compares two
measurements taken in the same process, one after the other, on the same inputs. Times
are medians of several repeats after a warm-up. Peak memory is the rise of the process's
resident-set high-water mark (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``)
over its resident size just before the call; elsewhere it is reported as ``null``.

Sections (see ``benchmarks/README.md`` for the targets):

1. quantiser assignment at K = 1,024 and 16,384: our cosine and Euclidean assignment
   against ``torch.cdist`` + argmin, MONAI's ``EMAQuantizer`` and one matrix multiply +
   argmax (the floor);
2. QPM at K = 16,384 on 8 x 16 x 16 tokens: ours against a naive K x K implementation and
   against a Python loop over the unique codes (as in the released VQ-Seg code);
3. pool scoring: VQ-BEGAL's single pass against MC-dropout with T = 10 on the same
   VQ-BEGAL network, at 1k, 10k and 100k slices (MC-dropout at 100k only with
   ``--full``: it takes most of an hour on 2 cores); slices are generated on the fly so
   that only the scorer's own memory is measured;
4. inference on a 512 x 512 x 100 CT: total time and the share spent outside the
   network's forward pass (medians of 5 runs; peak memory from the first), in a fresh
   process of its own, as ``vqmedseg predict`` and the Slicer module's jobs run it;
5. one VQ-Seg training step against the same U-Net without VQ and QPM;
6. presets: a training step of each method's CPU preset and `paper` preset at full batch
   size on this machine, and what the preset's schedule would take on it at that pace
   (why the `gpu` accuracy preset is not run on a CPU);
7. scoring: Dice, Jaccard, HD95 and ASD of a liver-sized prediction on a 512 x 512 x 150
   CT grid (what the Slicer module computes against a reference), ours against MONAI's
   four metric functions on the whole image; and, run on a worker thread as the module
   runs it, the longest the calling (GUI) thread waited meanwhile;
8. gui: what the Slicer module's actions (prepare, mark, load, score) cost its GUI thread
   on a 512 x 512 x 150 CT with an MR, on slicer-core's MRML scene.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from VQMedSegLib import __version__  # noqa: E402
from VQMedSegLib.files import atomic_files, atomic_write_json, atomic_write_text  # noqa: E402
from VQMedSegLib.provenance import compute_environment  # noqa: E402


# ----------------------------------------------------------------------------- tools
def median_time(fn, repeat: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


LAST_PEAK_RSS_MB: list[float | None] = [None]


def peak_extra_mb(fn) -> float | None:
    """Rise of the resident high-water mark during ``fn()`` over the resident size before it
    (the whole process's high-water mark is kept in ``LAST_PEAK_RSS_MB[0]``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        fn()
        return None
    before = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    LAST_PEAK_RSS_MB[0] = None if peak is None else peak / 1024.0
    if before is None or peak is None:
        return None
    return max(0.0, (peak - before) / 1024.0)


# ---------------------------------------------------------------- 1. assignment
def bench_assignment(tokens: int = 8192, dim: int = 64) -> dict:
    from monai.networks.layers.vector_quantizer import EMAQuantizer

    from VQMedSegLib.models.quantizers import cosine_assign
    from VQMedSegLib.models.vqseg import euclidean_assign

    out = {}
    g = torch.Generator().manual_seed(0)
    z = torch.randn(tokens, dim, generator=g)
    for k in (1024, 16384):
        codebook = torch.randn(k, dim, generator=g)
        normed = F.normalize(codebook, dim=1)
        monai_vq = EMAQuantizer(spatial_dims=2, num_embeddings=k, embedding_dim=dim).eval()
        z_image = z.reshape(8, -1, dim).permute(0, 2, 1).reshape(8, dim, 32, 32)  # (B, D, H, W) for MONAI
        with torch.no_grad():
            t = {
                "matmul_argmax_floor": median_time(lambda: (z @ normed.t()).argmax(1)),
                "cosine_ours": median_time(lambda: cosine_assign(z, normed)),
                "euclidean_ours": median_time(lambda: euclidean_assign(z, codebook)),
                "cdist_argmin": median_time(lambda: torch.cdist(z, codebook).argmin(1)),
                "monai_ema_quantizer": median_time(lambda: monai_vq.quantize(z_image)),
            }
        assert torch.equal(euclidean_assign(z, codebook), torch.cdist(z, codebook).argmin(1))
        floor = t["matmul_argmax_floor"]
        out[f"k{k}"] = {
            "tokens": tokens, "dim": dim,
            "seconds": t,
            "million_tokens_per_s": {name: tokens / s / 1e6 for name, s in t.items()},
            "cosine_vs_floor": t["cosine_ours"] / floor,
            "euclidean_vs_floor": t["euclidean_ours"] / floor,
            "cdist_vs_euclidean_ours": t["cdist_argmin"] / t["euclidean_ours"],
            "monai_vs_euclidean_ours": t["monai_ema_quantizer"] / t["euclidean_ours"],
        }
    return out


# ---------------------------------------------------------------------- 2. QPM
def naive_qpm(indices: torch.Tensor, codebook: torch.Tensor, epsilon: float, generator) -> torch.Tensor:
    """The textbook version: the whole K x K transition matrix, then one draw per token."""
    d = torch.cdist(codebook, codebook)
    logits = -d
    logits.fill_diagonal_(float("-inf"))
    probs = torch.softmax(logits, dim=1)
    flat = indices.reshape(-1)
    move = torch.rand(flat.shape, generator=generator) < epsilon
    new = torch.multinomial(probs[flat[move]], 1, generator=generator)[:, 0]
    out = flat.clone()
    out[move] = new
    return out.reshape(indices.shape)


def loop_qpm(indices: torch.Tensor, codebook: torch.Tensor, epsilon: float, generator) -> torch.Tensor:
    """A Python loop over the unique codes of the batch, one distance row each (as in the
    released VQ-Seg code)."""
    flat = indices.reshape(-1)
    move = torch.rand(flat.shape, generator=generator) < epsilon
    out = flat.clone()
    for code in torch.unique(flat[move]).tolist():
        where = move & (flat == code)
        d = torch.linalg.vector_norm(codebook - codebook[code], dim=1)
        logits = -d
        logits[code] = float("-inf")
        out[where] = torch.multinomial(torch.softmax(logits, dim=0), int(where.sum()), replacement=True, generator=generator)
    return out.reshape(indices.shape)


def bench_qpm(k: int = 16384, dim: int = 64, shape=(8, 16, 16), epsilon: float = 0.7) -> dict:
    from VQMedSegLib.models.qpm import QuantizedPerturbation

    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(k, dim, generator=g)
    indices = torch.randint(0, k, shape, generator=g)
    ours = QuantizedPerturbation(epsilon)
    runs = {
        "ours_chunked": lambda: ours(indices, codebook, generator=g),
        "python_loop_unique": lambda: loop_qpm(indices, codebook, epsilon, g),
        "naive_kxk": lambda: naive_qpm(indices, codebook, epsilon, g),
    }
    # memory first, ours first: later calls would reuse memory the allocator keeps
    peak = {name: peak_extra_mb(fn) for name, fn in runs.items()}
    seconds = {name: median_time(fn, repeat=3) for name, fn in runs.items()}
    return {
        "k": k, "dim": dim, "tokens": int(np.prod(shape)), "epsilon": epsilon,
        "seconds": seconds, "peak_extra_mb": peak,
        "kxk_matrix_mb": k * k * 4 / 2**20,
        "speedup_vs_naive": seconds["naive_kxk"] / seconds["ours_chunked"],
        "speedup_vs_python_loop": seconds["python_loop_unique"] / seconds["ours_chunked"],
    }


# ------------------------------------------------------------- 3. pool scoring
class GeneratedPool:
    """A stand-in for :class:`~VQMedSegLib.active_learning.pool.SlicePool` with ``n``
    slices made on demand (deterministic noise), so that the scorer's own memory is what
    is measured, not the pool's storage."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def tensors(self, idx, device):
        g = torch.Generator().manual_seed(int(idx[0]))
        ct = torch.randn(len(idx), 1, self.size, self.size, generator=g)
        mr = torch.randn(len(idx), 1, self.size, self.size, generator=g)
        return ct.to(device), mr.to(device), torch.ones(len(idx), dtype=torch.bool, device=device)


def bench_pool_scoring(full: bool) -> dict:
    from VQMedSegLib.active_learning.strategies import mc_dropout_scores, modality_scores
    from VQMedSegLib.config import begal_config_from_preset
    from VQMedSegLib.training.begal import build_model

    config = begal_config_from_preset("quick")
    model = build_model(config).eval()
    device = torch.device("cpu")
    out = {"preset": "quick", "slice_size": config.slice_size, "mc_samples": 10, "sizes": {}}
    warm = GeneratedPool(128, config.slice_size)  # first-use allocations are not the scorer's growth
    modality_scores(model, warm, np.arange(128), device, batch=64)
    mc_dropout_scores(model, warm, np.arange(128), device, samples=2, batch=64)
    for n in (1000, 10000, 100000):
        pool = GeneratedPool(n, config.slice_size)
        idx = np.arange(n)
        row = {}
        t = time.perf_counter()
        mem = peak_extra_mb(lambda: modality_scores(model, pool, idx, device, batch=64))
        row["begal_seconds"] = time.perf_counter() - t
        row["begal_slices_per_s"] = n / row["begal_seconds"]
        row["begal_peak_extra_mb"] = mem
        row["begal_process_peak_rss_mb"] = LAST_PEAK_RSS_MB[0]
        if n <= 10000 or full:
            t = time.perf_counter()
            mem = peak_extra_mb(lambda: mc_dropout_scores(model, pool, idx, device, samples=10, batch=64))
            row["mcdropout_seconds"] = time.perf_counter() - t
            row["mcdropout_slices_per_s"] = n / row["mcdropout_seconds"]
            row["mcdropout_peak_extra_mb"] = mem
            row["speedup"] = row["begal_slices_per_s"] / row["mcdropout_slices_per_s"]
        out["sizes"][str(n)] = row
        print(f"  pool {n}: {row}", flush=True)
    speedups = [r["speedup"] for r in out["sizes"].values() if "speedup" in r]
    out["speedup_median"] = statistics.median(speedups)
    mems = [r["begal_process_peak_rss_mb"] for r in out["sizes"].values() if r["begal_process_peak_rss_mb"] is not None]
    out["begal_peak_mb_1k_vs_100k"] = [mems[0], mems[-1]] if mems else None
    return out


# ------------------------------------------------------------------ 4. inference
INFERENCE_REPEATS = 5


def bench_inference(shape=(100, 512, 512)) -> dict:
    from VQMedSegLib.config import train_config_from_preset
    from VQMedSegLib.data.volume import Volume
    from VQMedSegLib.inference import predict as predict_module
    from VQMedSegLib.inference.predict import predict_volume
    from VQMedSegLib.models.unet import build_unet, model_spec

    config = train_config_from_preset("quick")
    torch.manual_seed(0)  # untrained weights: how much is predicted as liver depends on them
    model = build_unet(features=tuple(config.features)).eval()
    ckpt = {"task": "liver", "method": "supervised", "config": config.to_json(), "model": model_spec(1, 2, config.features, 0.0),
            "preprocessing": {"slice_size": config.slice_size}}
    rng = np.random.default_rng(0)
    ct = Volume(rng.normal(40, 200, shape).astype(np.int16), (0.7, 0.7, 2.5))
    spent = {"forward": 0.0, "cleanup": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            result = fn(*args, **kwargs)
            spent[key] += time.perf_counter() - t
            return result

        return wrapper

    model.forward = timed(model.forward, "forward")
    # the liver task's clean-up (largest connected component), timed the same way
    original_cleanup = predict_module.keep_largest_component
    predict_module.keep_largest_component = timed(original_cleanup, "cleanup")
    device = torch.device("cpu")
    predict_volume(model, ckpt, ct, device)  # warm-up
    runs: list[dict] = []
    box = {}

    def run():
        box.clear()  # the last run's maps are freed first, as in a fresh call
        spent.update(forward=0.0, cleanup=0.0)
        t = time.perf_counter()
        box["pred"] = predict_volume(model, ckpt, ct, device)
        total = time.perf_counter() - t
        runs.append({"total": total, "forward": spent["forward"], "cleanup": spent["cleanup"],
                     "overhead": (total - spent["forward"]) / total,
                     # what the overhead would be with --keep-all-components (derived, same run)
                     "without_cleanup": (total - spent["forward"] - spent["cleanup"]) / (total - spent["cleanup"])})

    try:
        peak = peak_extra_mb(run)  # memory from the first timed run, times from all of them
        for _ in range(INFERENCE_REPEATS - 1):
            run()
    finally:
        predict_module.keep_largest_component = original_cleanup
    n_slices = shape[0]
    speckle = (rng.random((n_slices, config.slice_size, config.slice_size)) < 0.85).astype(np.uint8)

    def med(key):
        return statistics.median(r[key] for r in runs)

    return {
        "shape_kji": list(shape), "slice_size": config.slice_size, "repeats": len(runs),
        "seconds_total": med("total"), "seconds_forward": med("forward"), "overhead_fraction": med("overhead"),
        "overhead_fraction_runs": [r["overhead"] for r in runs],
        "seconds_largest_component": med("cleanup"),
        "overhead_fraction_without_cleanup": med("without_cleanup"),
        "foreground_fraction": float(box["pred"].label.array.mean()),
        # the clean-up's cost grows with how fragmented the prediction is: here on a slice
        # grid of random speckle (85% foreground), far more pieces than a trained model's
        "seconds_largest_component_speckle": median_time(
            lambda: original_cleanup(speckle, [1]), repeat=5, warmup=1),
        "peak_extra_mb": peak, "input_mb": ct.array.nbytes / 2**20,
    }


# ------------------------------------------------------------------- scoring
def bench_scoring(shape=(150, 512, 512), spacing=(2.5, 0.7, 0.7)) -> dict:
    """Dice, Jaccard, HD95 and ASD of a liver-sized prediction on a CT grid, as the Slicer
    module computes them against a reference: ours (cut to the masks'
    box, the surfaces found once) against MONAI's four functions on the whole image."""
    import warnings

    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance, compute_iou

    from VQMedSegLib.metrics.segmentation import score_masks

    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]

    def ellipsoid(ck, cj, ci, rk, rj, ri):
        return ((k - ck) / rk) ** 2 + ((j - cj) / rj) ** 2 + ((i - ci) / ri) ** 2 < 1

    ref = ellipsoid(75, 250, 220, 50, 120, 140)
    pred = ellipsoid(77, 255, 222, 50, 118, 141)

    def monai_whole():
        p, r = (torch.as_tensor(m, dtype=torch.float32)[None, None] for m in (pred, ref))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return (float(compute_dice(p, r)[0, 0]), float(compute_iou(p, r)[0, 0]),
                    float(compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing))[0, 0]),
                    float(compute_average_surface_distance(p, r, symmetric=True, spacing=list(spacing))[0, 0]))

    ours = score_masks(pred, ref, spacing)
    theirs = monai_whole()
    ours_s = median_time(lambda: score_masks(pred, ref, spacing), repeat=3)
    monai_s = median_time(monai_whole, repeat=3)
    stalls = [_longest_stall_beside(lambda: score_masks(pred, ref, spacing)) for _ in range(3)]
    return {"shape_kji": list(shape), "foreground_fraction": float(ref.mean()),
            "seconds": {"ours": ours_s, "monai_whole_image": monai_s}, "speedup": monai_s / ours_s,
            # the Slicer module scores on a worker thread: how long its GUI thread, ticking
            # every 10 ms meanwhile, waited at most for the interpreter lock (median of 3)
            "gui_thread_longest_wait_s": float(np.median(stalls)),
            "same_scores": bool(np.allclose([ours.dice, ours.jaccard, ours.hd95, ours.asd], theirs, rtol=1e-6, atol=1e-6))}


def _longest_stall_beside(work) -> float:
    """Run ``work`` on a worker thread (as the Slicer module scores); how long this
    thread could not run meanwhile (:func:`_longest_stall_until`)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(work)
        longest = _longest_stall_until(future)
        future.result()
    return longest


def _longest_stall_until(pending, tick: float = 0.01) -> float:
    """Sleep ``tick`` seconds at a time, as an idle event loop does, until
    ``pending.done()``; the longest time one tick took beyond ``tick`` is how long this
    thread could not run while the worker held Python's lock."""
    longest, last = 0.0, time.perf_counter()
    while not pending.done():
        time.sleep(tick)
        now = time.perf_counter()
        longest, last = max(longest, now - last - tick), now
    return longest


# ------------------------------------------------------------- the module's GUI thread
def bench_gui(shape=(150, 512, 512), spacing=(0.8, 0.8, 2.5)) -> dict:
    """What the Slicer module's actions cost its GUI thread on a CT of ``shape`` with an
    MR beside it, on slicer-core's MRML scene: the time each call holds the calling
    thread, and for the two that hand work to the worker thread (preparing a case,
    scoring against a reference), how long that work takes and the longest the calling
    thread, ticking every 10 ms meanwhile, had to wait. Needs slicer-core."""
    import tempfile

    try:
        from VQMedSegLib.export import mrml
    except ImportError as exc:  # pragma: no cover - slicer-core is in the [all] extra
        return {"skipped": f"slicer-core is not installed ({exc})"}
    from VQMedSegLib.data.io import write_volume
    from VQMedSegLib.data.volume import Volume
    from VQMedSegLib.workflow import WorkflowLogic

    scene, logics = mrml.new_scene()
    rng = np.random.default_rng(0)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((j - 256) / 200.0) ** 2 + ((i - 256) / 230.0) ** 2 < 1
    liver = ((k - 75) / 50.0) ** 2 + ((j - 250) / 120.0) ** 2 + ((i - 220) / 140.0) ** 2 < 1
    ct = Volume(np.where(body, 40 + rng.normal(0, 20, shape), -1000).astype(np.int16), spacing)
    mr = Volume((body * rng.random(shape) * 300).astype(np.float32), spacing)
    ct_node, mr_node = mrml.add_volume(scene, ct, "CT"), mrml.add_volume(scene, mr, "MR")
    segment = [{"value": 1, "name": "Liver", "color": (1, 0, 0)}]
    out: dict = {"shape_kji": list(shape)}

    def handed_over(start, finish):
        t = time.perf_counter()
        pending = start()
        held = time.perf_counter() - t
        longest = _longest_stall_until(pending)
        finish(pending)
        return {"calling_thread_s": held, "until_done_s": time.perf_counter() - t, "longest_wait_s": longest}

    with tempfile.TemporaryDirectory() as tmp:
        logic = WorkflowLogic(scene)
        out["prepare_first"] = handed_over(lambda: logic.start_prepare(ct_node, mr_node, folder=Path(tmp) / "ws"),
                                           lambda pending: logic.finish_prepare())
        out["prepare_again"] = handed_over(lambda: logic.start_prepare(ct_node, mr_node), lambda pending: logic.finish_prepare())
        case = "CT"
        drawn = mrml.add_segmentation(scene, ct.with_array(liver.astype(np.uint8)), segment, reference_node=ct_node, name="drawn")
        out["mark_one_slice_s"] = median_time(lambda: logic.mark_annotated(case, [75], drawn), repeat=3)
        ws = logic.workspace
        write_volume(ct.with_array(np.roll(liver, 2, axis=2).astype(np.uint8)), ws.prediction_dir(case) / "prediction.nrrd")
        # an entropy map compresses as badly as a model's does (the demo's: to 87% of its size)
        write_volume(ct.with_array(rng.random(shape).astype(np.float32)), ws.prediction_dir(case) / "uncertainty.nrrd")
        ws.update(lambda st: st.setdefault("predictions", {}).update({case: {"method": "supervised", "files": {
            "segmentation": f"predictions/{case}/prediction.nrrd", "uncertainty": f"predictions/{case}/uncertainty.nrrd"}}}))
        out["load_results_s"] = median_time(lambda: logic.load_results(case), repeat=3)
        assert list(logic.loaded[case]["overlays"]) == ["entropy"], "the uncertainty map was not loaded"
        # *Load last prediction*, and the load after a prediction job: the worker reads the files,
        # the GUI thread makes the nodes
        out["load_results_reading"] = handed_over(lambda: logic.start_loading(case), lambda pending: pending.result())
        read = logic.start_loading(case).result()
        out["load_results_read_on_worker_s"] = median_time(lambda: logic.load_results(case, read=read), repeat=3)
        out["score"] = handed_over(lambda: logic.start_scoring(case, drawn), lambda pending: pending.result())
    del logics
    return out


# ----------------------------------------------------------------- 5. training step
def bench_training_step() -> dict:
    from VQMedSegLib.config import vqseg_config_from_preset
    from VQMedSegLib.training.ssl_experiment import SupervisedNet
    from VQMedSegLib.training.vqseg import VQSegTrainer

    cfg = vqseg_config_from_preset("quick", warmup_supervised=0, rampup=0, use_pfa=False, iterations=1000)
    s = cfg.slice_size
    rng = np.random.default_rng(0)
    lx = rng.random((32, 1, s, s)).astype(np.float32)
    ly = (lx[:, 0] > 0.6).astype(np.int64)
    ux = rng.random((64, 1, s, s)).astype(np.float32)
    trainer = VQSegTrainer(cfg, lx, ly, ux, None, 0, torch.device("cpu"))
    vq_step = median_time(trainer.step, repeat=5, warmup=2)
    plain = VQSegTrainer(cfg.replace(use_qpm=False, use_reconstruction=False), lx, ly, ux, None, 0, torch.device("cpu"))
    no_qpm_step = median_time(plain.step, repeat=5, warmup=2)

    net = SupervisedNet(tuple(cfg.features))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.as_tensor(lx[: cfg.labelled_batch])
    y = torch.as_tensor(ly[: cfg.labelled_batch])

    def supervised_step():
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    sup = median_time(supervised_step, repeat=5, warmup=2)
    return {
        "slice_size": s, "labelled_batch": cfg.labelled_batch, "unlabelled_batch": cfg.unlabelled_batch,
        "vqseg_step_s": vq_step, "vqseg_without_qpm_and_reconstruction_step_s": no_qpm_step,
        "unet_labelled_only_step_s": sup,
        "vqseg_vs_unet": vq_step / sup,
        "note": "a VQ-Seg step runs the student on the labelled batch, on QPM-perturbed and CutMix views of the "
                "unlabelled batch and the teacher once: four forward passes where the U-Net step runs one",
    }


# ------------------------------------------------------------------- 6. presets
def _vqseg_stepper(preset: str):
    from VQMedSegLib.config import vqseg_config_from_preset
    from VQMedSegLib.training.vqseg import VQSegTrainer

    # every step semi-supervised and aligned, as after the warm-up
    cfg = vqseg_config_from_preset(preset, warmup_supervised=0, rampup=0)
    s, channels, rng = cfg.slice_size, 256, np.random.default_rng(0)
    lx = rng.random((2 * cfg.labelled_batch, 1, s, s)).astype(np.float32)
    ly = (lx[:, 0] > 0.6).astype(np.int64)
    ux = rng.random((2 * cfg.unlabelled_batch, 1, s, s)).astype(np.float32)
    fm = rng.standard_normal((cfg.pfa_batch, channels, cfg.pfa_grid, cfg.pfa_grid)).astype(np.float16)
    trainer = VQSegTrainer(cfg, lx, ly, ux, fm, channels, torch.device("cpu"), fm_slices=np.arange(cfg.pfa_batch))
    # one row and seed of an ACDC part: the preset's iterations
    return cfg, trainer.step, cfg.iterations, f"{cfg.labelled_batch} labelled + {cfg.unlabelled_batch} unlabelled"


def _begal_stepper(preset: str, rounds: int):
    from VQMedSegLib.active_learning.pool import build_pool, target_case
    from VQMedSegLib.config import begal_config_from_preset
    from VQMedSegLib.data.phantoms import make_dataset
    from VQMedSegLib.training.begal import Phase, PhaseTrainer, build_model

    cfg = begal_config_from_preset(preset)
    cases = make_dataset("phantom-liver", 1, seed=5, ct_shape=(24, 64, 64))
    inputs = [target_case(c.case_id, c.ct, c.ct_label, c.mr) for c in cases]
    pool = build_pool(inputs, cfg.slice_size, (-160, 240), seed=0)
    torch.manual_seed(0)
    trainer = PhaseTrainer(build_model(cfg), cfg, pool, torch.device("cpu"), seed=0)
    phase = Phase("initial", 1, "all", np.arange(len(pool)))
    # one strategy and seed of the CHAOS part: the initial set's training, then each round's
    iterations = cfg.initial_iterations + rounds * cfg.round_iterations
    return cfg, lambda: trainer.step(phase), iterations, f"{cfg.batch_size} labelled + {cfg.unlabelled_batch} unlabelled"


def bench_preset_steps() -> dict:
    from run_accuracy import PRESETS as ACCURACY_PRESETS  # a script of this folder

    out = {}
    # each library preset that a run_accuracy.py preset trains, with that preset's schedule;
    # keyed by the accuracy preset, so two of them sharing a library preset keep a row each
    for accuracy_preset, settings in ACCURACY_PRESETS.items():
        vqseg, begal = settings["ssl_preset"], settings["al_preset"]
        out[f"{accuracy_preset}_vqseg"] = _time_step("vqseg", vqseg, accuracy_preset, *_vqseg_stepper(vqseg))
        out[f"{accuracy_preset}_begal"] = _time_step("begal", begal, accuracy_preset, *_begal_stepper(begal, settings["rounds"]))
    return out


def _time_step(method: str, preset: str, accuracy_preset: str, cfg, step, iterations: int, batch: str) -> dict:
    step()  # warm-up
    extra = peak_extra_mb(step)
    seconds = median_time(step, repeat=3, warmup=0)
    print(f"  {method} {preset}: {seconds:.2f} s a step", flush=True)
    return {
        "method": method, "preset": preset, "accuracy_preset": accuracy_preset, "slice_size": cfg.slice_size,
        "num_codes": cfg.num_codes, "features": list(cfg.features), "batch": batch, "step_s": seconds,
        "step_peak_extra_mb": extra, "schedule_iterations": iterations,
        "schedule_hours_here": seconds * iterations / 3600.0,
    }


# ------------------------------------------------------------ fresh processes
# Sections measured in a process of their own. Inference runs in a fresh job process in
# the product; after the pool section in the same process its calls alternated between
# about 14% and 27% outside the forward pass (cause not found: neither huge-page
# fallback nor glibc's mmap threshold), against 13-16% for every call in a fresh one.
FRESH_PROCESS_SECTIONS = ("inference",)


def section_in_fresh_process(name: str, threads: int) -> dict:
    """Run one section in a new Python process (``--only NAME --in-process``) and return
    its results, with the child's ``pid`` and ``"process": "fresh"``."""
    with tempfile.TemporaryDirectory(prefix="vqmedseg-speed-") as tmp:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--out", tmp, "--only", name, "--threads", str(threads), "--in-process"],
            capture_output=True, text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"section {name!r} in a fresh process failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        section = json.loads((Path(tmp) / "speed.json").read_text(encoding="utf-8"))["sections"][name]
    return {**section, "process": "fresh"}


# ------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the targets are for 2 CPU threads)")
    p.add_argument("--full", action="store_true", help="also MC-dropout on the 100k-slice pool (slow)")
    p.add_argument("--only", help="comma-separated sections: assignment,qpm,pool,inference,training,presets,scoring,gui")
    p.add_argument("--in-process", action="store_true",
                   help=f"run every section in this process ({', '.join(FRESH_PROCESS_SECTIONS)} otherwise gets a fresh one)")
    args = p.parse_args(argv)
    sections = {"assignment": bench_assignment, "qpm": bench_qpm, "pool": lambda: bench_pool_scoring(args.full),
                "inference": bench_inference, "training": bench_training_step, "presets": bench_preset_steps,
                "scoring": bench_scoring, "gui": bench_gui}
    chosen = args.only.split(",") if args.only else list(sections)
    for name in chosen:
        if name not in sections:
            p.error(f"--only: unknown section {name!r}; expected some of {', '.join(sections)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result: dict = {"sections": {}}
    for name in chosen:
        print(f"{name} ...", flush=True)
        t = time.perf_counter()
        if name in FRESH_PROCESS_SECTIONS and not args.in_process:
            result["sections"][name] = section_in_fresh_process(name, args.threads)
        else:
            result["sections"][name] = {**sections[name](), "pid": os.getpid()}
        result["sections"][name]["wall_seconds"] = time.perf_counter() - t
        print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
    sec = result["sections"]
    if "pool" in sec:
        result["begal_vs_mcdropout_scoring_speedup"] = sec["pool"]["speedup_median"]
    if "qpm" in sec:
        result["qpm_peak_mem_mb_k16384"] = sec["qpm"]["peak_extra_mb"]["ours_chunked"]
        result["qpm_vs_naive_speedup"] = sec["qpm"]["speedup_vs_naive"]
    if "inference" in sec:
        result["inference_overhead_fraction"] = sec["inference"]["overhead_fraction"]
    if "assignment" in sec:
        result["cosine_assignment_vs_matmul_argmax"] = sec["assignment"]["k16384"]["cosine_vs_floor"]
    result["environment"] = {
        "vqmedseg": __version__, "torch": torch.__version__, "python": platform.python_version(),
        **compute_environment("cpu"), "machine": platform.machine(), "cuda": torch.cuda.is_available(), "full": args.full,
    }
    result["wall_seconds"] = time.perf_counter() - t0
    result["targets"] = check_targets(result)
    with atomic_files() as stage:  # the figures and their report replace an earlier run's together
        atomic_write_json(stage(out / "speed.json"), result)
        atomic_write_text(stage(out / "speed.md"), report(result))
    print(report(result))
    return 0


TARGETS = [
    ("begal_vs_mcdropout_scoring_speedup", ">=", 8.0, "BEGAL pool scoring speed-up against MC-dropout (T = 10)"),
    ("qpm_peak_mem_mb_k16384", "<", 100.0, "QPM peak extra memory at K = 16,384, 8 x 16 x 16 tokens (MB)"),
    ("qpm_vs_naive_speedup", ">=", 5.0, "QPM speed-up against the naive K x K version"),
    ("cosine_assignment_vs_matmul_argmax", "<=", 1.3, "cosine assignment time / one matmul + argmax (K = 16,384)"),
    ("inference_overhead_fraction", "<=", 0.2, "inference time outside the forward pass (512 x 512 x 100 CT)"),
]


def check_targets(result: dict) -> dict:
    out = {}
    for key, op, bound, _ in TARGETS:
        value = result.get(key)
        if value is None:
            out[key] = None
            continue
        out[key] = bool(value >= bound if op == ">=" else value < bound if op == "<" else value <= bound)
    pool = result["sections"].get("pool")
    if pool and pool.get("begal_peak_mb_1k_vs_100k"):
        small, large = pool["begal_peak_mb_1k_vs_100k"]
        out["pool_scoring_memory_flat"] = bool(large <= small * 1.05 + 20.0)
    return out


def _met(verdict) -> str:
    return "not measured" if verdict is None else "yes" if verdict else "**no**"


def report(result: dict) -> str:
    env = result["environment"]
    threads = f"{env['threads']} thread{'' if env['threads'] == 1 else 's'} of {env['cpu_count']} CPUs"
    lines = ["# Speed and memory", "",
             f"VQMedSeg {env['vqmedseg']}, torch {env['torch']}, Python {env['python']}; {threads} "
             f"({env['cpu_model']}, {env['cpu_capability']} kernels); CUDA {'present' if env['cuda'] else 'absent'}.",
             "", "| measurement | value | target | met |", "|---|---|---|---|"]
    for key, op, bound, text in TARGETS:
        value = result.get(key)
        shown = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"| {text} | {shown} | {op} {bound} | {_met(result['targets'].get(key))} |")
    pool = result["sections"].get("pool")
    if pool:
        mem = pool.get("begal_peak_mb_1k_vs_100k")
        lines.append(f"| pool scoring: process peak RSS, 1k vs 100k slices (MB) | {mem} | flat | "
                     f"{_met(result['targets'].get('pool_scoring_memory_flat'))} |")
        lines += ["", "| pool size | BEGAL slices/s | MC-dropout slices/s | speed-up | BEGAL process peak RSS MB | BEGAL extra MB | MC extra MB |",
                  "|---|---|---|---|---|---|---|"]
        for n, r in pool["sizes"].items():
            lines.append(f"| {n} | {r['begal_slices_per_s']:.0f} | {r.get('mcdropout_slices_per_s', float('nan')):.0f} | "
                         f"{r.get('speedup', float('nan')):.1f} | {r['begal_process_peak_rss_mb']:.0f} | {r['begal_peak_extra_mb']:.1f} | "
                         f"{r.get('mcdropout_peak_extra_mb')} |")
    a = result["sections"].get("assignment")
    if a:
        lines += ["", "| K | method | M tokens/s |", "|---|---|---|"]
        for k, r in a.items():
            if not k.startswith("k"):
                continue
            for name, v in r["million_tokens_per_s"].items():
                lines.append(f"| {k[1:]} | {name} | {v:.4f} |")
    q = result["sections"].get("qpm")
    if q:
        lines += ["", "| QPM (K = 16,384) | seconds | peak extra MB |", "|---|---|---|"]
        for name in q["seconds"]:
            lines.append(f"| {name} | {q['seconds'][name]:.4f} | {q['peak_extra_mb'][name]} |")
    inf = result["sections"].get("inference")
    if inf:
        where = " (in a fresh process)" if inf.get("process") == "fresh" else ""
        lines += ["", f"Inference, 512 x 512 x 100 CT{where}: {inf['seconds_total']:.2f} s total, {inf['seconds_forward']:.2f} s in the "
                  f"forward pass ({100 * inf['overhead_fraction']:.1f}% outside it; "
                  f"{100 * inf['overhead_fraction_without_cleanup']:.1f}% without the clean-up), "
                  f"{inf['seconds_largest_component']:.3f} s in the liver's largest-component clean-up "
                  f"({100 * inf['foreground_fraction']:.0f}% of the voxels predicted as liver; "
                  f"{inf['seconds_largest_component_speckle']:.3f} s on a slice grid 85% foreground), "
                  f"peak extra {inf['peak_extra_mb']:.0f} MB."]
    sc = result["sections"].get("scoring")
    if sc:
        lines += ["", f"Scoring a prediction against a reference (Dice, Jaccard, HD95, ASD; {' x '.join(map(str, sc['shape_kji']))} "
                  f"voxels, {100 * sc['foreground_fraction']:.0f}% liver): {sc['seconds']['ours']:.2f} s, against "
                  f"{sc['seconds']['monai_whole_image']:.2f} s for MONAI's four functions on the whole image "
                  f"({sc['speedup']:.1f}x; the same scores: {'yes' if sc['same_scores'] else '**no**'}). "
                  f"On a worker thread, as the Slicer module runs it, the calling thread waited at most "
                  f"{1000 * sc['gui_thread_longest_wait_s']:.0f} ms at a time."]
    gui = result["sections"].get("gui")
    if gui and "skipped" in gui:
        lines += ["", f"The Slicer module's GUI thread: not measured ({gui['skipped']})."]
    elif gui:
        def handed(r):
            return (f"{1000 * r['calling_thread_s']:.0f} ms on the GUI thread, the rest on the worker (done after "
                    f"{r['until_done_s']:.2f} s; the GUI thread waited at most {1000 * r['longest_wait_s']:.0f} ms at a time)")
        lines += ["", f"The Slicer module's GUI thread, CT and MR of {' x '.join(map(str, gui['shape_kji']))} voxels on "
                  "slicer-core's scene:", "",
                  f"- Prepare workspace, first time: {handed(gui['prepare_first'])}",
                  f"- Prepare workspace again (the same CT and MR): {handed(gui['prepare_again'])}",
                  f"- Mark one slice annotated: {gui['mark_one_slice_s']:.2f} s",
                  f"- Load a prediction and its uncertainty map, all on the calling thread (the Logic's load_results, "
                  f"as the Python console calls it): {gui['load_results_s']:.2f} s",
                  f"- The same as *Load last prediction* and the end of a prediction job do it: the files read "
                  f"({handed(gui['load_results_reading'])}), then the nodes made on the GUI thread: "
                  f"{gui['load_results_read_on_worker_s']:.2f} s",
                  f"- Score against a reference: {handed(gui['score'])}"]
    tr = result["sections"].get("training")
    if tr:
        lines += ["", f"Training step: VQ-Seg {tr['vqseg_step_s']:.3f} s, VQ-Seg without QPM and reconstruction "
                  f"{tr['vqseg_without_qpm_and_reconstruction_step_s']:.3f} s, U-Net (labelled only) {tr['unet_labelled_only_step_s']:.3f} s."]
    ps = result["sections"].get("presets")
    if ps:
        lines += ["", "| method | preset | slices | K | batch | seconds a step | step peak extra MB | schedule | at this pace |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (v for v in ps.values() if isinstance(v, dict)):
            extra = "n/a" if r["step_peak_extra_mb"] is None else f"{r['step_peak_extra_mb']:.0f}"
            lines.append(f"| {r['method']} | {r['preset']} | {r['slice_size']} | {r['num_codes']:,} | {r['batch']} | {r['step_s']:.2f} | "
                         f"{extra} | {r['schedule_iterations']:,} iterations | {_duration(r['schedule_hours_here'])} |")
    return "\n".join(lines) + "\n"


def _duration(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


if __name__ == "__main__":
    raise SystemExit(main())
