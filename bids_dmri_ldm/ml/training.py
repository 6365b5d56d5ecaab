"""Group-level training of the four networks, stage by stage, resumable, DDP-ready.

Stages (Zhu et al., MICCAI 2024, Sec. 2-3; AdamW, lr 1e-4):

``vqvae3t``  3T VQ-VAE on every 3T volume, loss = MAE + quantisation loss.
``vqvae7t``  7T VQ-VAE fine-tuned from the 3T weights (transfer learning) or from scratch.
``ldm``      conditional latent diffusion UNet on 3T (class 0) and 7T (class 1) latents,
             eps-prediction MSE (Eq. 7), class dropped to null with ``cfg_dropout``.
``sr``       super-resolution head on the LDM's translated training 3T volumes vs real 7T (MSE).

Every stage checkpoints each epoch into ``work_dir/<stage>/`` (safetensors for the
weights and the optimiser tensors, JSON for the rest), resumes from there, writes
its losses to ``out_dir/training/losses_<stage>.csv`` and ``.png``, and is
deterministic for a seed: all randomness (shuffling, noise, timesteps, label
dropout) is drawn per *sample index*, so one process and N DDP processes see the
same numbers.  Entry point for the workflow layer: :func:`train_all`.
"""
from __future__ import annotations

import csv
import json
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from ..io.files import atomic_path
from ..io.files import atomic_write_text as _atomic_write_text
from ..vocabulary import LDM_STAGES
from .bundle import model_card, save_bundle, software_versions, state_to_tensors
from .data import RishScan, canonical_scan, target_on_source, to_model_grid
from .diffusion import LatentDiffusion
from .distributed import (
    DistContext,
    barrier,
    init_distributed,
    mean_across,
    unwrap,
    wrap_ddp,
)
from .inference import DeviceMemoryError, autocast_for, translate_latents
from .modelconfig import CLASS_3T, CLASS_7T, CLASS_NULL, validate_config
from .networks import build_sr_head, build_unet, build_vqvae
from .normalise import LEGACY_METHOD, fit_normalisation, normalise
from .scalemaps import SMOOTHING_CANDIDATES, calibrate_scale_smoothing
from .split import split_participants

STAGES = LDM_STAGES  # the stages in training order (bids_dmri_ldm.vocabulary)
_STAGE_ID = {**{s: i for i, s in enumerate(STAGES)}, "cnn": len(STAGES)}  # cnn: the baseline (ml/cnn.py)


class TrainingDataError(ValueError):
    """The training data cannot support the requested stage (e.g. no paired participants)."""


# --------------------------------------------------------------------------- utilities
def sample_generator(seed: int, stage: str, epoch: int, index: int) -> torch.Generator:
    """CPU generator for one sample of one epoch: the same on every rank and device."""
    key = (int(seed) * 1_000_003 + _STAGE_ID[stage] * 100_003 + (epoch + 1) * 10_007 + int(index))
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
              plot_losses: PlotFn | None = None) -> list[dict[str, float]]:
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

    Returns
    -------
    list of dict
        Per-epoch ``epoch``, ``train_loss``, ``val_loss`` (NaN without validation), ``seconds``.
    """
    tr = cfg["training"]
    work_dir.mkdir(parents=True, exist_ok=True)
    # channels-last 3D: on CPU (oneDNN) conv3d backward in NCDHW layout measured 6-40x slower
    model.to(ctx.device, memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=tr["lr"], weight_decay=tr["weight_decay"])
    history: list[dict[str, float]] = []
    state_path = work_dir / "state.json"
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text())
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
                                 shuffle=True, seed=tr["seed"] + _STAGE_ID[stage], drop_last=False)
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
            _atomic_save_tensors(state_to_tensors(unwrap(ddp_model)), work_dir / "model.safetensors")
            tensors_opt, groups = optimizer_to_tensors(opt)
            _atomic_save_tensors(tensors_opt, work_dir / "optimizer.safetensors")
            _atomic_write_text(state_path, json.dumps({"stage": stage, "history": history,
                                                       "param_groups": groups}, indent=1))
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
    return history


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


# --------------------------------------------------------------------------- stage functions
def _vqvae_loss(model: nn.Module, batch: list[torch.Tensor], idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """Paper's VQ-VAE loss: MAE of the reconstruction + quantisation (commitment) loss."""
    x = batch[0]
    recon, quant_loss = model(x)
    return F.l1_loss(recon.float(), x) + quant_loss.float().mean()


def train_vqvae(volumes: torch.Tensor, cfg: dict[str, Any], work_dir: Path, ctx: DistContext,
                resume: bool = False, val_volumes: torch.Tensor | None = None,
                log_dir: Path | None = None, stage: str = "vqvae3t",
                init_state: dict[str, torch.Tensor] | None = None,
                plot_losses: PlotFn | None = None) -> tuple[nn.Module, list]:
    """Train a VQ-VAE on model-grid volumes ``(M, 1, *grid)`` (one RISH order each).

    ``init_state`` starts from given weights (the 7T fine-tune starts from the 3T ones).
    """
    torch.manual_seed(cfg["training"]["seed"] + _STAGE_ID[stage])
    model = build_vqvae(cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    history = fit_stage(stage, model, [volumes], _vqvae_loss, cfg, cfg["training"]["epochs"][stage],
                        cfg["training"]["batch_size"], work_dir, log_dir, ctx, resume,
                        None if val_volumes is None else [val_volumes], plot_losses=plot_losses)
    return model.eval(), history


def finetune_vqvae7t(volumes_7t: torch.Tensor, cfg: dict[str, Any], work_dir: Path, ctx: DistContext,
                     vqvae3t_state: dict[str, torch.Tensor] | None, resume: bool = False,
                     val_volumes: torch.Tensor | None = None, log_dir: Path | None = None,
                     plot_losses: PlotFn | None = None):
    """7T VQ-VAE: fine-tuned from the 3T weights (``training.vqvae7t_init = "3T"``, the
    paper's transfer learning) or trained from scratch (``"scratch"``, the ablation)."""
    init = vqvae3t_state if cfg["training"]["vqvae7t_init"] == "3T" else None
    if cfg["training"]["vqvae7t_init"] == "3T" and init is None:
        raise TrainingDataError("the 7T fine-tune needs the trained 3T VQ-VAE weights")
    return train_vqvae(volumes_7t, cfg, work_dir, ctx, resume, val_volumes, log_dir, "vqvae7t", init,
                       plot_losses=plot_losses)


def make_ldm_loss(cfg: dict[str, Any]) -> LossFn:
    """eps-prediction loss (Eq. 7) with per-sample seeded t, noise and label dropout."""
    diffusion = LatentDiffusion.from_config(cfg)
    seed, p_drop = cfg["training"]["seed"], cfg["training"]["cfg_dropout"]

    def loss_fn(model, batch, idx, epoch):
        z, labels = batch
        noise, steps, drop = [], [], []
        for i in idx.tolist():
            g = sample_generator(seed, "ldm", epoch, i)
            steps.append(int(torch.randint(0, diffusion.num_train_timesteps, (1,), generator=g)))
            drop.append(bool(torch.rand(1, generator=g) < p_drop))
            noise.append(torch.randn(z.shape[1:], generator=g))
        noise = torch.stack(noise).to(z.device)
        t = torch.tensor(steps, device=z.device)
        labels = torch.where(torch.tensor(drop, device=z.device), torch.full_like(labels, CLASS_NULL), labels)
        return diffusion.training_loss(model, z, labels, noise, t)

    return loss_fn


def train_ldm(latents: torch.Tensor, labels: torch.Tensor, cfg: dict[str, Any], work_dir: Path,
              ctx: DistContext, resume: bool = False,
              val: tuple[torch.Tensor, torch.Tensor] | None = None, log_dir: Path | None = None,
              plot_losses: PlotFn | None = None):
    """Conditional latent diffusion UNet on scaled latents ``(M, C, x, y, z)`` with class ``labels`` (M,)."""
    torch.manual_seed(cfg["training"]["seed"] + _STAGE_ID["ldm"])
    model = build_unet(cfg)
    history = fit_stage("ldm", model, [latents, labels], make_ldm_loss(cfg), cfg,
                        cfg["training"]["epochs"]["ldm"], cfg["training"]["latent_batch_size"],
                        work_dir, log_dir, ctx, resume, None if val is None else list(val), plot_losses=plot_losses)
    return model.eval(), history


def _sr_loss(model, batch, idx, epoch):
    ldm_out, target = batch
    return F.mse_loss(model(ldm_out).float(), target)


def train_sr(ldm_outputs: torch.Tensor, targets_7t: torch.Tensor, cfg: dict[str, Any], work_dir: Path,
             ctx: DistContext, resume: bool = False,
             val: tuple[torch.Tensor, torch.Tensor] | None = None, log_dir: Path | None = None,
             plot_losses: PlotFn | None = None):
    """Super-resolution head: decoded LDM outputs ``(M, 1, *grid)`` -> real 7T ``(M, 1, *grid)``, MSE."""
    torch.manual_seed(cfg["training"]["seed"] + _STAGE_ID["sr"])
    model = build_sr_head(cfg)
    history = fit_stage("sr", model, [ldm_outputs, targets_7t], _sr_loss, cfg,
                        cfg["training"]["epochs"]["sr"], cfg["training"]["batch_size"],
                        work_dir, log_dir, ctx, resume, None if val is None else list(val), plot_losses=plot_losses)
    return model.eval(), history


# --------------------------------------------------------------------------- whole pipeline
RishInput = Mapping[str, "RishScan | tuple[np.ndarray, np.ndarray, np.ndarray]"]


def as_rish_scan(value: RishScan | Sequence[np.ndarray]) -> RishScan:
    """A :class:`~.data.RishScan` from ``(rish, mask, affine)``, checked for matching shapes."""
    rish, mask, affine = value
    rish, mask = np.asarray(rish, np.float32), np.asarray(mask, bool)
    affine = np.asarray(affine, np.float64)
    if rish.ndim != 4 or rish.shape[:3] != mask.shape or affine.shape != (4, 4):
        raise TrainingDataError(f"RISH {rish.shape}, mask {mask.shape} and affine {affine.shape} do not fit "
                                "(expected (X, Y, Z, n), (X, Y, Z) and (4, 4))")
    return RishScan(rish, mask, affine)


def prepare_scans(rish_3t: RishInput, rish_7t: RishInput
                  ) -> tuple[dict[str, RishScan], dict[str, RishScan], dict[str, RishScan]]:
    """Canonical-orientation scans and, for every paired participant, its 7T on the 3T grid.

    Returns ``(scans_3t, scans_7t, targets)`` where ``targets[p]`` is participant ``p``'s 7T
    RISH and mask brought into its 3T grid through the affines (:func:`~.data.target_on_source`):
    every 3T/7T comparison of training (SR pairs, validation losses, calibration, gains) uses it.
    """
    scans_3t = {k: canonical_scan(as_rish_scan(v)) for k, v in rish_3t.items()}
    scans_7t = {k: canonical_scan(as_rish_scan(v)) for k, v in rish_7t.items()}
    targets = {k: target_on_source(scans_7t[k], scans_3t[k]) for k in sorted(set(scans_3t) & set(scans_7t))}
    return scans_3t, scans_7t, targets


def _stack_model_grid(scans: Sequence[RishScan], norm: dict, cfg: dict,
                      boxes: Sequence[np.ndarray | None] | None = None, with_masks: bool = False):
    """Per scan -> (n_scans * n, 1, *grid), orders interleaved.

    ``boxes[i]`` (optional) is the mask whose bounding box crops scan ``i`` (a 7T target on its
    3T partner's grid is cropped with the 3T brain box); default: the scan's own mask.  With
    ``with_masks`` also the brain masks on the model grid, (n_scans * n, 1, *grid) bool (each
    scan's mask repeated for its orders).
    """
    vols, masks = [], []
    n = len(cfg["orders"])
    boxes = boxes if boxes is not None else [None] * len(scans)
    for scan, box in zip(scans, boxes):
        x, mask, _ = to_model_grid(normalise(scan.rish, scan.mask, norm), scan.mask, tuple(cfg["grid"]),
                                   cfg["translation"]["crop_margin"], box_mask=box)
        vols.append(x)
        masks.append(mask[None, None].expand(n, 1, *mask.shape))
    empty = (0, 1, *cfg["grid"])
    volumes = torch.cat(vols) if vols else torch.zeros(empty)
    if not with_masks:
        return volumes
    return volumes, (torch.cat(masks) if masks else torch.zeros(empty, dtype=torch.bool))


def _stack_pairs(pairs: Sequence[tuple[RishScan, RishScan]], norm: dict, cfg: dict, with_masks: bool = False):
    """Model-grid 3T volumes and their position-paired 7T targets (both cropped by the 3T box);
    with ``with_masks`` each followed by its model-grid brain masks."""
    sources = [p[0] for p in pairs]
    x3 = _stack_model_grid(sources, norm, cfg, with_masks=with_masks)
    x7 = _stack_model_grid([p[1] for p in pairs], norm, cfg, boxes=[s.mask for s in sources], with_masks=with_masks)
    return (*x3, *x7) if with_masks else (x3, x7)


@torch.no_grad()
def _encode_all(vq: nn.Module, volumes: torch.Tensor, device: torch.device, batch: int = 8) -> torch.Tensor:
    out = []
    for lo in range(0, len(volumes), batch):
        z = vq.encode(volumes[lo:lo + batch].to(device))
        out.append(vq.quantize(z.float())[0].cpu())
    if not out:  # no validation participants (val_fraction 0): an empty set, skipped by callers
        return torch.zeros(0)
    return torch.cat(out)


def _stage_state(work_dir: Path, stage: str, epochs: int) -> dict[str, torch.Tensor] | None:
    """Final weights of a completed stage, or None."""
    state_path = work_dir / stage / "state.json"
    if not state_path.is_file():
        return None
    if len(json.loads(state_path.read_text())["history"]) < epochs:
        return None
    return load_file(str(work_dir / stage / "model.safetensors"))


def train_all(rish_3t: RishInput, rish_7t: RishInput, config: dict[str, Any], out_dir: str | Path,
              work_dir: str | Path, device: torch.device | str = "cpu", resume: bool = False,
              stages: Sequence[str] = STAGES, command: str = "", plot_losses: PlotFn | None = None) -> Path | None:
    """Train every stage and write the model bundle (group-level entry point).

    Parameters
    ----------
    rish_3t, rish_7t : mapping participant label -> (RISH (X, Y, Z, n_orders) float32, mask (X, Y, Z) bool,
        affine (4, 4))
        RISH features (Eq. 1) of each participant's 3T and 7T scan, any grid and voxel order
        (each is brought to canonical RAS order, cropped to its brain and resized to the model
        grid here).  A participant present in both mappings is *paired*: its 7T scan is
        brought into its 3T grid through the affines and cropped with the 3T brain box, so the
        pair is compared voxel by voxel at the same place (:func:`prepare_scans`).  Unpaired
        3T scans still train the 3T VQ-VAE and the LDM's 3T class; unpaired 7T scans the 7T
        VQ-VAE.
    config : validated training config (``modelconfig.load_config``).
    out_dir : results folder; the bundle goes to ``out_dir/model`` and the loss curves
        (CSV + PNG) to ``out_dir/training``.
    work_dir : checkpoints (``work_dir/<stage>/``), reused with ``resume=True``.
    device : from ``ml.device.resolve_device``; under torchrun each process joins the group.
    stages : subset of ``("vqvae3t", "vqvae7t", "ldm", "sr")``; a stage needs the earlier
        stages completed in ``work_dir``.  The bundle is written when all four are complete.
    command : the command line, recorded in the model card.
    plot_losses : draws each stage's loss curve PNG beside its CSV (None: CSV only).

    Returns
    -------
    Path or None
        The bundle directory, or None when stages remain to be trained (or on ranks > 0).

    Raises
    ------
    TrainingDataError
        No paired participant, or an earlier stage missing.
    """
    validate_config(config, "training")
    cfg = json.loads(json.dumps(config))
    tr = cfg["training"]
    out_dir, work_dir = Path(out_dir), Path(work_dir)
    ctx = init_distributed(device)
    t_start = time.perf_counter()
    scans_3t, scans_7t, targets = prepare_scans(rish_3t, rish_7t)
    paired = sorted(targets)
    if not paired:
        raise TrainingDataError(
            f"no paired participants: found {len(rish_3t)} with 3T ({', '.join(sorted(rish_3t)[:5]) or 'none'}) "
            f"and {len(rish_7t)} with 7T ({', '.join(sorted(rish_7t)[:5]) or 'none'}) data, none in both")
    train_ids, val_ids = split_participants(paired, tr["val_fraction"], tr["seed"])
    only3 = sorted(set(rish_3t) - set(paired))
    only7 = sorted(set(rish_7t) - set(paired))
    log_dir = out_dir / "training" if ctx.is_main else None
    work_dir.mkdir(parents=True, exist_ok=True)

    norm_path = work_dir / "normalisation.json"
    if resume and norm_path.is_file():
        norm = json.loads(norm_path.read_text())
    else:
        ids = train_ids + only3
        norm = fit_normalisation([scans_3t[i].rish for i in ids], [scans_3t[i].mask for i in ids],
                                 cfg["orders"], tr["seed"], tr.get("normalisation", LEGACY_METHOD))
        if ctx.is_main:
            _atomic_write_text(norm_path, json.dumps(norm, indent=1))
    train_pairs = [(scans_3t[i], targets[i]) for i in train_ids]
    val_pairs = [(scans_3t[i], targets[i]) for i in val_ids]
    x3 = _stack_model_grid([scans_3t[i] for i in train_ids + only3], norm, cfg)
    x7 = torch.cat([_stack_pairs(train_pairs, norm, cfg)[1],
                    _stack_model_grid([scans_7t[i] for i in only7], norm, cfg)])
    v3, v7 = _stack_pairs(val_pairs, norm, cfg)
    epochs = tr["epochs"]

    def need(stage):
        return _stage_state(work_dir, stage, epochs[stage]) if stage not in stages else None

    vq3_state = need("vqvae3t")
    if "vqvae3t" in stages:
        vq3, _ = train_vqvae(x3, cfg, work_dir / "vqvae3t", ctx, resume, v3, log_dir, plot_losses=plot_losses)
        vq3_state = state_to_tensors(vq3)
    vq7_state = need("vqvae7t")
    if "vqvae7t" in stages:
        if vq3_state is None and tr["vqvae7t_init"] == "3T":
            raise TrainingDataError("stage vqvae7t needs the vqvae3t stage completed first")
        vq7, _ = finetune_vqvae7t(x7, cfg, work_dir / "vqvae7t", ctx, vq3_state, resume, v7, log_dir,
                                  plot_losses=plot_losses)
        vq7_state = state_to_tensors(vq7)
    if vq3_state is None or vq7_state is None:
        if "ldm" in stages or "sr" in stages:
            raise TrainingDataError("stages ldm/sr need the vqvae3t and vqvae7t stages completed first")
        return None
    vq3, vq7 = build_vqvae(cfg), build_vqvae(cfg)
    vq3.load_state_dict(vq3_state), vq7.load_state_dict(vq7_state)
    vq3.to(ctx.device).eval(), vq7.to(ctx.device).eval()

    z3, z7 = _encode_all(vq3, x3, ctx.device), _encode_all(vq7, x7, ctx.device)
    latent_scale = float(1.0 / torch.cat([z3, z7]).std().clamp(min=1e-6))
    cfg_latent = latent_scale
    lat = torch.cat([z3, z7]) * cfg_latent
    labels = torch.cat([torch.full((len(z3),), CLASS_3T), torch.full((len(z7),), CLASS_7T)])
    vz = torch.cat([_encode_all(vq3, v3, ctx.device), _encode_all(vq7, v7, ctx.device)]) * cfg_latent
    vlab = torch.cat([torch.full((len(v3),), CLASS_3T), torch.full((len(v7),), CLASS_7T)])
    unet_state = need("ldm")
    if "ldm" in stages:
        unet, _ = train_ldm(lat, labels, cfg, work_dir / "ldm", ctx, resume,
                            (vz, vlab) if len(vz) else None, log_dir, plot_losses=plot_losses)
        unet_state = state_to_tensors(unet)
    if unet_state is None:
        if "sr" in stages:
            raise TrainingDataError("stage sr needs the ldm stage completed first")
        return None

    networks = {"vqvae3t": vq3, "vqvae7t": vq7, "unet": build_unet(cfg)}
    networks["unet"].load_state_dict(unet_state)
    networks["unet"].to(ctx.device).eval()
    bundle_cfg = dict(cfg, normalisation=norm, latent_scale=latent_scale)
    sr_state = need("sr")
    if "sr" in stages:
        sr_in, sr_target = _translate_for_sr(networks, bundle_cfg, train_pairs, norm, ctx.device)
        val_sr = _translate_for_sr(networks, bundle_cfg, val_pairs, norm, ctx.device) if val_ids else None
        sr, _ = train_sr(sr_in, sr_target, cfg, work_dir / "sr", ctx, resume, val_sr, log_dir,
                         plot_losses=plot_losses)
        sr_state = state_to_tensors(sr)
    if sr_state is None:
        return None
    networks["sr"] = build_sr_head(cfg)
    networks["sr"].load_state_dict(sr_state)
    if not ctx.is_main:
        barrier(ctx)
        return None
    networks["sr"].to(ctx.device).eval()
    calibration = None
    if val_ids and tr["calibrate_t0"] and tr["calibrate_guidance"]:
        calibration = calibrate_translation(networks, bundle_cfg, val_pairs, ctx.device)
        bundle_cfg["translation"].update(t0=calibration["t0"], guidance=calibration["guidance"])
    if val_ids:
        gains = calibrate_linear_gains(networks, bundle_cfg, val_pairs, ctx.device)
        bundle_cfg["translation"].update(gain_7t=gains["gain_7t"], gain_3t=gains["gain_3t"])
        calibration = dict(calibration or {}, linear_gains=gains)
        candidates = tr.get("calibrate_smoothing", SMOOTHING_CANDIDATES)
        if candidates:
            from .bundle import Bundle
            from .inference import translate_rish

            bundle = Bundle(bundle_cfg, networks, Path("."), "")
            smoothing = calibrate_scale_smoothing(
                lambda r, m: translate_rish(r, m, bundle, device=ctx.device, num_samples=1),
                [(scans_3t[i], scans_7t[i]) for i in val_ids], cfg["grid"], bundle_cfg["translation"].get("scale_reference", "roundtrip"), candidates)
            bundle_cfg["translation"].update(scale_smoothing=smoothing["sigma"], scale_strength=smoothing["strength"])
            calibration["scale_smoothing"] = smoothing
    elapsed = time.perf_counter() - t_start
    bundle_cfg.update(
        training_data={"n_3t": len(scans_3t), "n_7t": len(scans_7t), "n_paired": len(paired),
                       "pairing": "7T brought into the 3T grid through the affines (world space), "
                                  "canonical RAS voxel order",
                       "train_participants": train_ids, "validation_participants": val_ids,
                       "unpaired_3t": only3, "unpaired_7t": only7, "calibration": calibration},
        software=software_versions(),
        created=datetime.now(UTC).isoformat(timespec="seconds"))
    card = model_card(bundle_cfg, command=command, training_time_s=elapsed,
                      machine=f"{platform.node()} {platform.processor() or platform.machine()}, "
                              f"{torch.get_num_threads()} threads, {ctx.device}")
    bundle_dir = save_bundle(out_dir / "model", bundle_cfg, networks, card)
    barrier(ctx)
    return bundle_dir


@torch.no_grad()
def _translate_for_sr(networks, cfg, pairs, norm, device):
    """LDM translation of training 3T volumes (decoded by the 7T VQ-VAE) and their position-paired
    real 7T targets (``pairs``: (3T scan, 7T on the 3T grid), see :func:`prepare_scans`)."""
    from .bundle import Bundle

    bundle = Bundle(cfg, networks, Path("."), "")
    tr = cfg["translation"]
    n_orders = len(cfg["orders"])
    x3, x7 = _stack_pairs(pairs, norm, cfg)
    outs = []
    for lo in range(0, len(x3), n_orders):
        z3 = _encode_all(networks["vqvae3t"], x3[lo:lo + n_orders], device) * cfg["latent_scale"]
        z7 = translate_latents(bundle, z3, tr["t0"], tr["guidance"], cfg["training"]["sr_ddim_steps"], device)
        z7 = z7 / cfg["latent_scale"]
        if tr["requantise"]:
            z7, _ = networks["vqvae7t"].quantize(z7)
        outs.append(networks["vqvae7t"].decode(z7).float().cpu())
    return torch.cat(outs), x7


@torch.no_grad()
def calibrate_translation(networks, cfg, pairs, device) -> dict[str, Any]:
    """Choose t0 and omega per RISH order on the validation pairs (grid search).

    For every (t0, omega) of ``training.calibrate_t0`` x ``training.calibrate_guidance`` the
    validation 3T volumes are translated (``sr_ddim_steps`` steps, SR head applied) and
    compared with the position-paired real 7T (``pairs``, :func:`prepare_scans`) on the model
    grid: mean squared error of the normalised (log-RISH) values inside the 7T brain.  Orders are independent batch entries, so each
    order takes its own best pair.  Returns the choice and the full score table.
    """
    from .bundle import Bundle

    bundle = Bundle(cfg, networks, Path("."), "")
    tr, steps = cfg["training"], cfg["training"]["sr_ddim_steps"]
    n_orders = len(cfg["orders"])
    norm = cfg["normalisation"]
    x3, _, x7, brain = _stack_pairs(pairs, norm, cfg, with_masks=True)
    z3 = _encode_all(networks["vqvae3t"], x3, device) * cfg["latent_scale"]
    table = []
    for t0 in tr["calibrate_t0"]:
        for w in tr["calibrate_guidance"]:
            z7 = translate_latents(bundle, z3, [int(t0)] * len(z3), [float(w)] * len(z3),
                                   min(steps, int(t0) + 1), device) / cfg["latent_scale"]
            if cfg["translation"]["requantise"]:
                z7, _ = networks["vqvae7t"].quantize(z7)
            out = networks["sr"](networks["vqvae7t"].decode(z7).float()).float().cpu()
            err = ((out - x7) ** 2 * brain).view(-1, n_orders, *x7.shape[1:])
            count = brain.view(-1, n_orders, *x7.shape[1:]).sum(dim=(0, 2, 3, 4, 5)).clamp(min=1)
            mse = err.sum(dim=(0, 2, 3, 4, 5)) / count
            table.append({"t0": int(t0), "guidance": float(w), "mse": [float(m) for m in mse]})
    best = [min(table, key=lambda row: row["mse"][o]) for o in range(n_orders)]
    return {"t0": [b["t0"] for b in best], "guidance": [b["guidance"] for b in best],
            "metric": "MSE of normalised log-RISH vs real 7T, model grid, validation pairs",
            "table": table}


@torch.no_grad()
def calibrate_linear_gains(networks, cfg, pairs, device) -> dict[str, Any]:
    """Per-order gains that undo the networks' bias in linear RISH units, on validation pairs.

    The networks regress normalised *log*-RISH; back in linear units their outputs are biased
    (the exponential of a log-domain estimate is not the mean: Jensen's inequality, Duan's
    retransformation bias), and differently on the 7T path (LDM + 7T decoder + SR head, trained
    against noisy 7T) and the 3T round trip, so the bias does not cancel in the scale maps.
    Each validation participant's 3T RISH goes through
    :func:`~bids_dmri_ldm.ml.inference.translate_rish` (final t0, omega, DDIM steps; gains 1);
    then, per order, with means over the voxels inside both brains on the 3T grid (the 7T
    brought there through the affines, ``pairs`` from :func:`prepare_scans`),

        gain_7t_l = sum_p mean(real 7T RISH_l) / sum_p mean(predicted 7T RISH_l)
        gain_3t_l = sum_p mean(3T RISH_l)      / sum_p mean(round-trip 3T RISH_l)

    ``translate_rish`` multiplies its outputs by them (``translation.gain_7t`` / ``gain_3t``).
    (A least-squares gain of the output against the 7T scan was tried when the pairs were still
    matched through their own brain crop boxes and shrank the high orders far too much,
    docs/evaluation_results.md.)
    """
    import copy

    from .bundle import Bundle
    from .inference import translate_rish

    cfg = copy.deepcopy(cfg)
    for key in ("gain_7t", "gain_3t"):
        cfg["translation"].pop(key, None)
    bundle = Bundle(cfg, networks, Path("."), "")
    sums = np.zeros((4, len(cfg["orders"])))  # real 7T, predicted 7T, 3T, round-trip 3T
    for source, target in pairs:
        both = source.mask & target.mask
        if not both.any():
            continue
        result = translate_rish(source.rish, source.mask, bundle, device=device, num_samples=1)
        sums[0] += target.rish[both].astype(np.float64).mean(axis=0)
        sums[1] += result.pred_7t[both].astype(np.float64).mean(axis=0)
        sums[2] += source.rish[both].astype(np.float64).mean(axis=0)
        sums[3] += result.recon_3t[both].astype(np.float64).mean(axis=0)
    gain_7t = sums[0] / np.maximum(sums[1], 1e-30)
    gain_3t = sums[2] / np.maximum(sums[3], 1e-30)
    return {"gain_7t": [float(g) for g in gain_7t], "gain_3t": [float(g) for g in gain_3t],
            "metric": "brain-mean linear RISH, real / network output, validation pairs"}
