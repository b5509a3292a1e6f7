"""VQ-BEGAL rounds on a real workspace: what ``vqmedseg query`` and ``vqmedseg train
--method begal`` do, and what the Slicer module calls.

* **query** scores the workspace's unlabelled slices with the latest VQ-BEGAL model,
  writes ``suggestions.json`` (atomically: a killed query leaves the previous list, never
  half a new one) and remembers each suggestion's purpose (``encoder``/``decoder``) so
  the next training round sends the slice to its part of the network. Before any model
  exists, the first suggestions are drawn at random (purpose ``both``), as in the
  simulation's initial round.
* **train** runs one round on the slices labelled so far, warm-starting from the previous
  round's model, resumable from ``checkpoints/begal/last.pt``. Under ``torchrun`` every
  rank builds the same pool and trains on its share of each batch
  (:mod:`..training.distributed`); rank 0 alone writes checkpoints, the model and the
  round.

The budget ``B`` (total slices to annotate) is stored in ``state.json``; slices already
labelled count as spent, whoever labelled them.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..config import BEGALConfig
from ..errors import ConfigError, InputError
from ..files import atomic_write_json
from ..jobs.checkpoints import load_checkpoint, load_resume_checkpoint, save_checkpoint
from ..jobs.runner import JobContext
from ..jobs.workspace import Workspace
from ..tasks import get_task
from ..training.begal import PhaseTrainer, build_model, case_dice, model_spec, round_schedule
from ..training.distributed import DistInfo, barrier, cancel_check, current
from ..training.slices import labelled_signature
from .budget import Budget
from .pool import CaseInput, SlicePool, build_pool
from .strategies import BOTH, select

METHOD = "begal"
ARCHITECTURE_KEYS = ("slice_size", "features", "code_dim", "num_codes")


def workspace_pool(ws: Workspace, size: int, seed: int) -> tuple[SlicePool, dict[int, str]]:
    """Every slice of every case, with annotations as labels; returns the labelled
    pool indices and their purposes."""
    state = ws.load_state()
    task = get_task(state["task"])
    inputs = []
    for case_id in sorted(state["cases"]):
        ct = ws.load_ct(case_id)
        annotation = ws.load_annotation(case_id)
        label = annotation if annotation is not None else ct.with_array(np.zeros(ct.shape, np.uint8))
        inputs.append(CaseInput(case_id, ct, label, ws.load_mr(case_id)))
    if not inputs:
        raise InputError(f"workspace {ws.root}: no case registered; add one with 'vqmedseg workspace add'")
    pool = build_pool(inputs, size, task.ct_window, seed=seed)
    where = pool.index_of()
    suggested = state.get("suggested", {})
    labelled: dict[int, str] = {}
    for case_id, slices in ws.labelled_slices().items():
        for s in slices:
            if (case_id, s) in where:
                labelled[where[(case_id, s)]] = suggested.get(case_id, {}).get(str(s), BOTH)
    return pool, labelled


def stored_config(ws: Workspace, requested: BEGALConfig, write: bool = True) -> BEGALConfig:
    """The workspace keeps one architecture across rounds; schedules may change
    (``write``: record ``requested`` in the workspace; only rank 0 writes under torchrun)."""
    stored = ws.load_state().get("methods", {}).get(METHOD, {}).get("config")
    if stored is None:
        if write:
            ws.update(lambda s: s.setdefault("methods", {}).setdefault(METHOD, {}).__setitem__("config", requested.to_json()))
        return requested
    previous = BEGALConfig.from_json(stored, source=f"workspace {ws.root} VQ-BEGAL configuration")
    changed = [k for k in ARCHITECTURE_KEYS if getattr(previous, k) != getattr(requested, k)]
    if changed and ws.latest_model(METHOD) is not None:
        raise ConfigError(
            f"VQ-BEGAL configuration: {', '.join(changed)} differ from the workspace's earlier rounds "
            f"({', '.join(f'{k}={getattr(previous, k)!r}' for k in changed)}); a new architecture needs a new workspace"
        )
    if write:
        ws.update(lambda s: s["methods"][METHOD].__setitem__("config", requested.to_json()))
    return requested


def _load_latest(ws: Workspace, config: BEGALConfig, device: torch.device):
    entry = ws.latest_model(METHOD)
    if entry is None:
        return None, None
    ckpt = load_checkpoint(ws.resolve(entry["path"]), methods=(METHOD,), map_location=device)
    model = build_model(BEGALConfig.from_json(ckpt["model"]["config"], source="checkpoint configuration"))
    model.load_state_dict(ckpt["state_dict"])
    model.config_slice_size = int(ckpt["model"]["config"]["slice_size"])
    return model.to(device).eval(), entry


def _scoring_progress(ctx: JobContext):
    """The pool's scoring as the job's progress; in one process a cancel stops it between
    batches (under torchrun the ranks' shares differ by a batch, so only the end is collective)."""
    from ..training.distributed import current

    single = not current().enabled

    def report(done: int, total: int) -> None:
        ctx.progress(done, total, "scoring the pool")
        if single:
            ctx.check_cancel()

    return report


def query(
    ctx: JobContext,
    ws: Workspace,
    strategy: str,
    n: int,
    device: torch.device,
    config: BEGALConfig,
    budget_total: int | None = None,
    force: bool = False,
) -> dict:
    """Suggest up to ``n`` unlabelled slices; returns what was written to ``suggestions.json``."""
    if n < 1:
        raise InputError(f"--n {n}: expected at least 1 slice")
    if budget_total is not None:
        if budget_total < 1:
            raise InputError(f"--budget {budget_total}: expected at least 1 slice (the total that may be annotated)")
    state = ws.load_state()
    total_slices = sum(c["n_slices"] for c in state["cases"].values())
    labelled_count = sum(len(v) for v in ws.labelled_slices().values())
    # a budget given now is stored only once the query has succeeded: a refused one changes nothing
    chosen = int(budget_total) if budget_total is not None else int(state.get("budget", total_slices))
    budget = Budget(chosen, min(labelled_count, chosen))
    result: dict = {
        "strategy": strategy,
        "created": time.time(),
        "suggestions": [],
        "budget": {"total": budget.total, "spent": labelled_count, "remaining": budget.remaining},
        "labelled": labelled_count,
        "total_slices": total_slices,
        "exhausted": None,
        "message": "",
    }
    if labelled_count >= total_slices:
        result.update(exhausted="pool", message=f"every one of the {total_slices} slices is labelled; nothing left to suggest")
    elif budget.exhausted:
        result.update(exhausted="budget", message=f"the budget of {budget.total} slices is spent ({labelled_count} labelled); raise it with --budget to go on")
    plateau = _plateau(state, config)
    if plateau and not force and result["exhausted"] is None:
        result.update(exhausted="plateau", message=plateau + "; pass --force to suggest more anyway")
    if result["exhausted"] is None:
        config = stored_config(ws, config) if ws.latest_model(METHOD) else config
        model, entry = _load_latest(ws, config, device)
        size = model.config_slice_size if model is not None else config.slice_size
        pool, labelled = workspace_pool(ws, size, config.seed)
        taken = np.array(sorted(labelled), dtype=np.int64)
        unlabelled = np.setdiff1d(np.arange(len(pool)), taken)
        ctx.progress(0, 1, "scoring the pool", force=True)
        seeds = np.random.SeedSequence([config.seed, labelled_count])
        rng = np.random.default_rng(seeds)
        # MC dropout's masks from the same seed as the random draws: a query asked again
        # suggests the same slices (forked, so the caller's torch RNG is left as it was)
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(int(seeds.generate_state(1, np.uint64)[0]))
            picks = select(strategy, model, pool, unlabelled, taken, budget.allowance(n), device, rng, config.mc_samples,
                           progress=_scoring_progress(ctx))
        result["model"] = entry["id"] if entry else None
        if model is None:
            result["message"] = "no VQ-BEGAL model yet: this first set is drawn at random; annotate it, then train"
        result["suggestions"] = [
            {"rank": r + 1, "case": pool.key(s.index)[0], "slice": pool.key(s.index)[1], "score": s.score, "purpose": s.purpose}
            for r, s in enumerate(picks)
        ]
        result["round"] = len(state.get("rounds", []))

    def remember(st: dict) -> None:  # in one write of state.json: the suggestions and the budget given with them
        if result["exhausted"] is None:
            book = st.setdefault("suggested", {})
            for s in result["suggestions"]:
                book.setdefault(s["case"], {})[str(s["slice"])] = s["purpose"]
            st.setdefault("queries", []).append({"time": result["created"], "strategy": strategy,
                                                 "n": len(result["suggestions"]), "model": result["model"]})
        if budget_total is not None:
            st["budget"] = int(budget_total)

    if result["exhausted"] is None or budget_total is not None:
        ws.update(remember)
    if result["exhausted"] is None:
        # after state.json: a query killed between the two leaves the last list on show, never a
        # list whose slices' purposes (which training reads from state.json) were not recorded
        atomic_write_json(ws.root / "suggestions.json", result)
    ctx.emit("result", kind="query", n=len(result["suggestions"]), exhausted=result["exhausted"], message=result["message"])
    return result


def _plateau(state: dict, config: BEGALConfig) -> str:
    if not config.patience:
        return ""
    vals = [r.get("val_dice") for r in state.get("rounds", []) if r.get("val_dice") is not None]
    if len(vals) <= config.patience:
        return ""
    best_before = max(vals[: -config.patience])
    if max(vals[-config.patience :]) <= best_before + config.min_delta:
        return f"validation Dice has not improved by {config.min_delta} for {config.patience} rounds (best {best_before:.4f})"
    return ""


def train_round(ctx: JobContext, ws: Workspace, config: BEGALConfig, device: torch.device,
                dist_info: DistInfo | None = None) -> dict:
    """One VQ-BEGAL round on the labelled slices; records the model and the round
    (returns ``{}`` on ranks other than 0 under torchrun)."""
    info = dist_info or current()
    config = stored_config(ws, config, write=info.is_main)
    torch.manual_seed(config.seed)
    pool, labelled = workspace_pool(ws, config.slice_size, config.seed)
    if not labelled:
        raise InputError(f"workspace {ws.root}: no labelled slice yet; run 'vqmedseg query', annotate, then train")
    val_cases = set(config.validation_cases)
    annotated_cases = {str(pool.case_ids[i]) for i in labelled}
    if unknown := sorted(val_cases - annotated_cases):  # before the round trains, not after
        raise InputError(f"validation case(s) {unknown}: not annotated in workspace {ws.root}; expected some of "
                         f"{sorted(annotated_cases)}")
    train_labelled = {i: p for i, p in labelled.items() if str(pool.case_ids[i]) not in val_cases}
    if not train_labelled:
        raise InputError(f"workspace {ws.root}: every labelled slice belongs to a validation case")
    state = ws.load_state()
    round_index = len(state.get("rounds", []))
    model = build_model(config).to(device)
    previous, prev_entry = _load_latest(ws, config, device)
    if previous is not None:
        model.load_state_dict(previous.state_dict())
    trainer = PhaseTrainer(model, config, pool, device, seed=config.seed + round_index, dist_info=info)
    phases = round_schedule(METHOD, round_index if previous is not None else 0, train_labelled, config)
    signature = labelled_signature(ws.labelled_slices())
    last = ws.checkpoint_dir(METHOD) / "last.pt"
    start = 0
    if last.exists():
        ckpt = load_resume_checkpoint(last, methods=(METHOD,), map_location=device)
        if ckpt.get("round") == round_index and ckpt.get("labelled_signature") == signature and ckpt.get("config") == config.to_json():
            model.load_state_dict(ckpt["state_dict"])
            trainer.load_state(ckpt["optimizers"])
            start = int(ckpt["iteration"])
            ctx.emit("resumed", iteration=start, round=round_index)
        else:
            ctx.warn("found a VQ-BEGAL checkpoint from another round, labelled set or configuration; starting the round afresh")
    ctx.emit(
        "info",
        method=METHOD,
        round=round_index,
        phases=[{"name": p.name, "iterations": p.iterations, "slices": int(len(p.samples))} for p in phases],
        device=str(device),
    )

    def on_step(it: int, total: int, phase: str, losses: dict) -> None:
        if it % 10 == 0 or it == total:
            ctx.emit("loss", iteration=it, phase=phase, **losses)
        ctx.progress(it, total, phase, loss=losses["total"])
        if it % config.checkpoint_interval == 0 and it < total and info.is_main:  # written once, by rank 0
            save_checkpoint(
                last,
                {
                    "method": METHOD,
                    "model": model_spec(config),
                    "state_dict": model.state_dict(),
                    "optimizers": trainer.state(),
                    "iteration": it,
                    "round": round_index,
                    "labelled_signature": signature,
                    "config": config.to_json(),
                },
            )
            ctx.emit("checkpoint", iteration=it, round=round_index)

    t0 = time.monotonic()
    trainer.run(phases, start=start, on_step=on_step, check_cancel=cancel_check(ctx, info))  # rank 0's cancel stops all
    if not info.is_main:
        barrier(info)
        return {}
    val_dice = None
    if val_cases:
        val_idx = [c for c in val_cases if c in set(pool.case_ids.tolist())]
        val_rows = np.array(sorted(i for i in labelled if str(pool.case_ids[i]) in val_idx), dtype=np.int64)
        # only annotated slices count: an unlabelled slice has no reference
        val_dice = float(np.mean(list(case_dice(model, pool.subset(val_rows), device).values())))
        ctx.emit("metric", round=round_index, val_dice=val_dice)
    model_id = f"{METHOD}-r{round_index:02d}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = ws.root / "models" / f"{model_id}.pt"
    save_checkpoint(
        path,
        {
            "method": METHOD,
            "model": model_spec(config),
            "state_dict": model.state_dict(),
            "config": config.to_json(),
            "task": ws.task,
            "preprocessing": {"slice_size": config.slice_size, "modality": "CT", "mr": "optional"},
            "round": round_index,
            "labelled_signature": signature,
            "val_dice": val_dice,
        },
    )
    finished = {"round": round_index, "model": model_id, "labelled": len(labelled), "val_dice": val_dice, "time": time.time()}
    entry = ws.record_model(model_id, path, METHOD, round=round_index, labelled=len(labelled), val_dice=val_dice,
                            seconds=time.monotonic() - t0, also=lambda s: s.setdefault("rounds", []).append(finished))
    last.unlink(missing_ok=True)
    ctx.emit("result", kind="train", method=METHOD, model=entry["path"], model_id=model_id, round=round_index, val_dice=val_dice)
    barrier(info)
    return entry
