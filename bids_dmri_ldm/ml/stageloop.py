"""The training loop shared by every stage: epochs, checkpoints, resume, losses; seeded per sample.

:func:`fit_stage` trains one network with AdamW, checkpointing each epoch into its work
folder (safetensors for the weights and the optimiser tensors, JSON for the rest) and
resuming from there; :func:`sample_generator` draws all randomness per *sample index*,
so one process and N DDP processes see the same numbers.  The stages themselves are in
:mod:`bids_dmri_ldm.ml.training` (and :mod:`bids_dmri_ldm.ml.cnn`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from ..io.files import atomic_path
from ..io.files import atomic_write_text as _atomic_write_text
from ..vocabulary import LDM_STAGES
from .bundle import state_to_tensors
from .distributed import (
    DistContext,
    barrier,
    mean_across,
    unwrap,
    wrap_ddp,
)
from .inference import DeviceMemoryError, autocast_for

STAGE_ID = {**{s: i for i, s in enumerate(LDM_STAGES)}, "cnn": len(LDM_STAGES)}  # cnn: the baseline (ml/cnn.py)

log = logging.getLogger(__name__)

#: With ``training.select_epoch`` "best-validation": the weights of the best epoch so far, beside the checkpoint.
BEST_WEIGHTS = "best.safetensors"


# --------------------------------------------------------------------------- utilities
def sample_generator(seed: int, stage: str, epoch: int, index: int) -> torch.Generator:
    """CPU generator for one sample of one epoch: the same on every rank and device."""
    key = (int(seed) * 1_000_003 + STAGE_ID[stage] * 100_003 + (epoch + 1) * 10_007 + int(index))
    return torch.Generator().manual_seed(key % (2 ** 63))


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimiser state as flat tensors (safetensors) plus JSON-ready param groups."""
    state = opt.state_dict()
    tensors = {f"{idx}.{key}": torch.as_tensor(val).detach().cpu().contiguous().clone()
               for idx, entry in state["state"].items() for key, val in entry.items()}
    return tensors, state["param_groups"]


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           groups: list[dict]) -> None:
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, val in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": groups})


def write_loss_log(history: list[dict[str, float]], csv_path: Path) -> None:
    """Loss history -> CSV (``epoch``, ``train_loss``, ``val_loss``, ``seconds``), written atomically.

    The figure of it is drawn by the caller's ``plot_losses`` (:func:`fit_stage`;
    :func:`bids_dmri_ldm.reports.training.plot_losses` at the group level).
    """
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "train_loss", "val_loss", "seconds"])
        writer.writeheader()
        writer.writerows(history)


# --------------------------------------------------------------------------- fingerprints
def stage_fingerprint(stage: str, settings: Any, *digests: str) -> str:
    """What a stage's checkpoint was trained from: its settings (JSON-ready; the config keys that
    shape this stage, not its epoch count) and the digests (:func:`~.training_data.array_digest`)
    of its training data and of the weights of the stages it builds on.  :func:`fit_stage`
    resumes a checkpoint only when they match (the training's normalisation is recorded the same
    way: :func:`~.training_data.training_normalisation`)."""
    return hashlib.sha256(json.dumps({"stage": stage, "settings": settings, "digests": list(digests)},
                                     sort_keys=True).encode()).hexdigest()


def completed_stage_state(work_dir: Path, epochs: int, fingerprint: str | None = None
                          ) -> dict[str, torch.Tensor] | None:
    """Final weights of a stage completed in ``work_dir`` (at least ``epochs`` epochs, trained
    from ``fingerprint`` when one is given), or None."""
    state_path = work_dir / "state.json"
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    if len(state["history"]) < epochs or (fingerprint is not None and state.get("fingerprint") != fingerprint):
        return None
    return load_file(str(work_dir / "model.safetensors"))


# --------------------------------------------------------------------------- generic loop
PLOT_INTERVAL_S = 30.0
"""Seconds between redraws of a stage's loss-curve PNG during training (the CSV is written every epoch)."""

LossFn = Callable[[nn.Module, list[torch.Tensor], torch.Tensor, int], torch.Tensor]

PlotFn = Callable[[list[dict[str, float]], Path, str], Any]
"""Draws a stage's loss curve: ``plot_losses(history, png_path, title)`` (the group level passes
:func:`bids_dmri_ldm.reports.training.plot_losses`; ``ml`` draws nothing itself)."""


def fit_stage(stage: str, model: nn.Module, tensors: Sequence[torch.Tensor], loss_fn: LossFn,
              cfg: dict[str, Any], epochs: int, batch_size: int, work_dir: Path, log_dir: Path | None,
              ctx: DistContext, resume: bool = False, val_tensors: Sequence[torch.Tensor] | None = None,
              plot_losses: PlotFn | None = None, fingerprint: str | None = None) -> list[dict[str, float]]:
    """Train ``model`` for ``epochs`` with AdamW, checkpointing and resuming every epoch.

    Parameters
    ----------
    tensors : training tensors sharing the first (sample) axis.
    loss_fn : ``(model, batch_tensors, global_indices, epoch) -> scalar loss`` (batch mean).
    batch_size : global batch; each of the ``ctx.world_size`` processes takes its share.
    work_dir : checkpoint folder of this stage (``model.safetensors``, ``optimizer.safetensors``,
        ``state.json``, the latter written last and read as the commit marker).
    log_dir : where the loss history goes (``losses_<stage>.csv``, every epoch), or None.
    plot_losses : draws ``losses_<stage>.png`` from the history, at most every
        :data:`PLOT_INTERVAL_S` seconds and after the last epoch (None: no figure).
    fingerprint : :func:`stage_fingerprint` of this training, kept in ``state.json``; with
        ``resume``, a checkpoint with another fingerprint (other settings, data or earlier
        stages; or none recorded) is not continued: the stage trains again from its first epoch.

    With ``training.select_epoch`` = ``"best-validation"`` (default ``"last"``) the weights of the
    epoch with the lowest validation loss are kept beside the checkpoint and loaded into ``model``
    at the end (:func:`best_epoch`); training itself is unchanged.

    Returns
    -------
    list of dict
        Per-epoch ``epoch``, ``train_loss``, ``val_loss`` (NaN without validation), ``seconds``.
    """
    tr = cfg["training"]
    keep_best = tr.get("select_epoch", "last") == "best-validation"
    work_dir.mkdir(parents=True, exist_ok=True)
    # channels-last 3D: on CPU (oneDNN) conv3d backward in NCDHW layout measured 6-40x slower
    model.to(ctx.device, memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=tr["lr"], weight_decay=tr["weight_decay"])
    history: list[dict[str, float]] = []
    state_path = work_dir / "state.json"
    state = json.loads(state_path.read_text()) if resume and state_path.is_file() else None
    if state is not None and fingerprint is not None and state.get("fingerprint") != fingerprint:
        if ctx.is_main:
            log.warning("stage %s: the checkpoint in %s was trained from other settings, data or earlier "
                        "stages; training this stage again from its first epoch", stage, work_dir)
        state = None
    if state is not None:
        model.load_state_dict(load_file(str(work_dir / "model.safetensors"), device=str(ctx.device)))
        optimizer_from_tensors(opt, load_file(str(work_dir / "optimizer.safetensors"),
                                              device=str(ctx.device)), state["param_groups"])
        history = state["history"]
    start_epoch = len(history)
    use_amp = bool(tr["amp"]) and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and not torch.cuda.is_bf16_supported()) \
        if use_amp else None
    ddp_model = wrap_ddp(model, ctx)
    n = len(tensors[0])
    per_rank = max(1, batch_size // ctx.world_size)
    dataset = TensorDataset(torch.arange(n), *tensors)
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=True, seed=tr["seed"] + STAGE_ID[stage], drop_last=False)
    loader = DataLoader(dataset, batch_size=per_rank, sampler=sampler, num_workers=0)
    bar = tqdm(range(start_epoch, epochs), desc=stage, disable=not ctx.is_main, unit="epoch",
               initial=start_epoch, total=epochs)
    last_plot = time.monotonic()
    for epoch in bar:
        try:
            history.append(_run_epoch(stage, epoch, ddp_model, loader, sampler, opt, scaler, use_amp,
                                      loss_fn, model, val_tensors, ctx))
        except torch.OutOfMemoryError:
            raise DeviceMemoryError(
                f"out of GPU memory in training stage {stage} (grid {cfg['grid']}, batch {batch_size}): "
                "use a smaller batch_size/latent_batch_size or grid in the config, or more GPUs") from None
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.4g}")
        if ctx.is_main:
            weights = state_to_tensors(unwrap(ddp_model))
            _atomic_save_tensors(weights, work_dir / "model.safetensors")
            if keep_best and best_epoch(history) == history[-1]["epoch"]:
                _atomic_save_tensors(weights, work_dir / BEST_WEIGHTS)
            tensors_opt, groups = optimizer_to_tensors(opt)
            _atomic_save_tensors(tensors_opt, work_dir / "optimizer.safetensors")
            _atomic_write_text(state_path, json.dumps({"stage": stage, "history": history,
                                                       "param_groups": groups, "fingerprint": fingerprint},
                                                      indent=1))
            if log_dir is not None:
                # the PNG costs ~0.1 s, as much as a whole GPU epoch of the demo config:
                # redrawn at most every PLOT_INTERVAL_S seconds and after the last epoch
                plot = epoch == epochs - 1 or time.monotonic() - last_plot >= PLOT_INTERVAL_S
                write_loss_log(history, log_dir / f"losses_{stage}.csv")
                if plot and plot_losses is not None:
                    plot_losses(history, log_dir / f"losses_{stage}.png", stage)
                last_plot = time.monotonic() if plot else last_plot
        barrier(ctx)
    bar.close()
    if keep_best:
        _load_best(stage, model, history, work_dir, ctx)
    return history


def best_epoch(history: Sequence[dict[str, float]]) -> int | None:
    """The (1-based) epoch of ``history`` with the lowest finite validation loss, the earliest of
    equal ones; None when no epoch has one."""
    scored = [(h["val_loss"], h["epoch"]) for h in history if math.isfinite(h["val_loss"])]
    return min(scored)[1] if scored else None


def kept_epoch(history: Sequence[dict[str, float]], training: dict[str, Any]) -> dict[str, Any]:
    """Which epoch's weights :func:`fit_stage` kept, for the model's record: ``{"epoch", "of", "rule"}``."""
    best = best_epoch(history) if training.get("select_epoch", "last") == "best-validation" else None
    if best is None:
        return {"epoch": len(history), "of": len(history), "rule": "last"}
    return {"epoch": best, "of": len(history), "rule": "lowest validation loss"}


def _load_best(stage: str, model: nn.Module, history: Sequence[dict[str, float]], work_dir: Path,
               ctx: DistContext) -> None:
    """Load the weights of :func:`best_epoch` into ``model`` (every rank; rank 0 wrote them)."""
    epoch, path = best_epoch(history), work_dir / BEST_WEIGHTS
    if epoch is None or not path.is_file():
        if ctx.is_main:
            log.warning("stage %s: select_epoch is best-validation, but %s; keeping the last epoch", stage,
                        "no epoch has a validation loss" if epoch is None else f"{path} is missing")
        return
    model.load_state_dict(load_file(str(path), device=str(ctx.device)))
    if ctx.is_main:
        log.info("stage %s: kept epoch %d of %d (lowest validation loss %.4g)", stage, epoch, len(history),
                 history[epoch - 1]["val_loss"])


def _run_epoch(stage, epoch, ddp_model, loader, sampler, opt, scaler, use_amp, loss_fn, model,
               val_tensors, ctx) -> dict[str, float]:
    """One pass over this rank's shard; returns the epoch's history row."""
    t_start = time.perf_counter()
    sampler.set_epoch(epoch)
    ddp_model.train()
    losses = []
    for batch in loader:
        idx, batch_tensors = batch[0], [_to_device(b, ctx.device) for b in batch[1:]]
        opt.zero_grad(set_to_none=True)
        with autocast_for(ctx.device, use_amp):
            loss = loss_fn(ddp_model, batch_tensors, idx, epoch)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
    train_loss = mean_across(float(np.mean(losses)), ctx)
    val_loss = float("nan")
    if val_tensors is not None and len(val_tensors[0]):
        val_loss = evaluate_loss(model, val_tensors, loss_fn, ctx)
    return {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
            "seconds": round(time.perf_counter() - t_start, 3)}


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch tensor; volumes (5-D) in the channels-last layout of the networks."""
    tensor = tensor.to(device)
    return tensor.contiguous(memory_format=torch.channels_last_3d) if tensor.ndim == 5 else tensor


@torch.no_grad()
def evaluate_loss(model: nn.Module, tensors: Sequence[torch.Tensor], loss_fn: LossFn,
                  ctx: DistContext, batch_size: int = 8) -> float:
    """Mean loss over a held-out set with fixed randomness (epoch = -1), eval mode."""
    model.eval()
    total, count = 0.0, 0
    n = len(tensors[0])
    for lo in range(0, n, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, n))
        batch = [_to_device(t[idx], ctx.device) for t in tensors]
        total += float(loss_fn(model, batch, idx, -1)) * len(idx)
        count += len(idx)
    model.train()
    return total / max(count, 1)


