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
The loop shared by the stages is :mod:`~.stageloop`, the training data on the model grid
:mod:`~.training_data`, the calibration on the validation pairs :mod:`~.calibration`.
"""
from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..vocabulary import LDM_STAGES
from .bundle import model_card, save_bundle, software_versions, state_to_tensors
from .calibration import calibrate_linear_gains, calibrate_translation, translate_for_sr
from .diffusion import LatentDiffusion
from .distributed import (
    DistContext,
    barrier,
)
from .modelconfig import CLASS_3T, CLASS_7T, CLASS_NULL
from .networks import build_sr_head, build_unet, build_vqvae
from .scalemaps import SMOOTHING_CANDIDATES, calibrate_scale_smoothing
from .stageloop import (
    STAGE_ID,
    LossFn,
    PlotFn,
    completed_stage_state,
    fit_stage,
    sample_generator,
    stage_fingerprint,
)
from .training_data import (
    RishInput,
    TrainingDataError,
    array_digest,
    encode_all,
    setup_training,
    stack_model_grid,
    stack_pairs,
    state_digest,
    training_normalisation,
)

STAGES = LDM_STAGES  # the stages in training order (bids_dmri_ldm.vocabulary)


# --------------------------------------------------------------------------- stage functions
def _vqvae_loss(model: nn.Module, batch: list[torch.Tensor], idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """Paper's VQ-VAE loss: MAE of the reconstruction + quantisation (commitment) loss."""
    x = batch[0]
    recon, quant_loss = model(x)
    return F.l1_loss(recon.float(), x) + quant_loss.float().mean()


def train_vqvae(volumes: torch.Tensor, cfg: dict[str, Any], work_dir: Path, ctx: DistContext,
                resume: bool = False, val_volumes: torch.Tensor | None = None,
                log_dir: Path | None = None, stage: str = "vqvae3t",
                init_state: dict[str, torch.Tensor] | None = None, fingerprint: str | None = None,
                plot_losses: PlotFn | None = None) -> tuple[nn.Module, list]:
    """Train a VQ-VAE on model-grid volumes ``(M, 1, *grid)`` (one RISH order each).

    ``init_state`` starts from given weights (the 7T fine-tune starts from the 3T ones).
    """
    torch.manual_seed(cfg["training"]["seed"] + STAGE_ID[stage])
    model = build_vqvae(cfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    history = fit_stage(stage, model, [volumes], _vqvae_loss, cfg, cfg["training"]["epochs"][stage],
                        cfg["training"]["batch_size"], work_dir, log_dir, ctx, resume,
                        None if val_volumes is None else [val_volumes], plot_losses=plot_losses,
                        fingerprint=fingerprint)
    return model.eval(), history


def finetune_vqvae7t(volumes_7t: torch.Tensor, cfg: dict[str, Any], work_dir: Path, ctx: DistContext,
                     vqvae3t_state: dict[str, torch.Tensor] | None, resume: bool = False,
                     val_volumes: torch.Tensor | None = None, log_dir: Path | None = None,
                     plot_losses: PlotFn | None = None, fingerprint: str | None = None):
    """7T VQ-VAE: fine-tuned from the 3T weights (``training.vqvae7t_init = "3T"``, the
    paper's transfer learning) or trained from scratch (``"scratch"``, the ablation)."""
    init = vqvae3t_state if cfg["training"]["vqvae7t_init"] == "3T" else None
    if cfg["training"]["vqvae7t_init"] == "3T" and init is None:
        raise TrainingDataError("the 7T fine-tune needs the trained 3T VQ-VAE weights")
    return train_vqvae(volumes_7t, cfg, work_dir, ctx, resume, val_volumes, log_dir, "vqvae7t", init,
                       plot_losses=plot_losses, fingerprint=fingerprint)


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
              plot_losses: PlotFn | None = None, fingerprint: str | None = None):
    """Conditional latent diffusion UNet on scaled latents ``(M, C, x, y, z)`` with class ``labels`` (M,)."""
    torch.manual_seed(cfg["training"]["seed"] + STAGE_ID["ldm"])
    model = build_unet(cfg)
    history = fit_stage("ldm", model, [latents, labels], make_ldm_loss(cfg), cfg,
                        cfg["training"]["epochs"]["ldm"], cfg["training"]["latent_batch_size"],
                        work_dir, log_dir, ctx, resume, None if val is None else list(val), plot_losses=plot_losses,
                        fingerprint=fingerprint)
    return model.eval(), history


def _sr_loss(model, batch, idx, epoch):
    ldm_out, target = batch
    return F.mse_loss(model(ldm_out).float(), target)


def train_sr(ldm_outputs: torch.Tensor, targets_7t: torch.Tensor, cfg: dict[str, Any], work_dir: Path,
             ctx: DistContext, resume: bool = False,
             val: tuple[torch.Tensor, torch.Tensor] | None = None, log_dir: Path | None = None,
             plot_losses: PlotFn | None = None, fingerprint: str | None = None):
    """Super-resolution head: decoded LDM outputs ``(M, 1, *grid)`` -> real 7T ``(M, 1, *grid)``, MSE."""
    torch.manual_seed(cfg["training"]["seed"] + STAGE_ID["sr"])
    model = build_sr_head(cfg)
    history = fit_stage("sr", model, [ldm_outputs, targets_7t], _sr_loss, cfg,
                        cfg["training"]["epochs"]["sr"], cfg["training"]["batch_size"],
                        work_dir, log_dir, ctx, resume, None if val is None else list(val), plot_losses=plot_losses,
                        fingerprint=fingerprint)
    return model.eval(), history


#: Config keys that shape each stage's training (``(section, key)``; ``key`` None: the whole
#: section); the epoch counts are not among them, so a resumed stage may be trained longer.
_COMMON_SETTINGS = (("grid", None), ("orders", None), ("translation", "crop_margin"),
                    *(("training", k) for k in ("seed", "val_fraction", "lr", "weight_decay", "amp",
                                                "normalisation")))
_STAGE_SETTINGS = {
    "vqvae3t": (("vqvae", None), ("training", "batch_size")),
    "vqvae7t": (("vqvae", None), ("training", "batch_size"), ("training", "vqvae7t_init")),
    "ldm": (("unet", None), ("diffusion", None), ("training", "latent_batch_size"), ("training", "cfg_dropout")),
    "sr": (("sr", None), ("training", "batch_size"), ("training", "sr_ddim_steps"),
           *(("translation", k) for k in ("t0", "guidance", "invert_class", "requantise"))),
}


def stage_settings(cfg: dict[str, Any], stage: str) -> dict[str, Any]:
    """The config values that shape ``stage``'s training (for :func:`~.stageloop.stage_fingerprint`)."""
    return {f"{section}.{key}" if key else section: (cfg[section] if key is None else cfg[section].get(key))
            for section, key in (*_COMMON_SETTINGS, *_STAGE_SETTINGS[stage])}


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
    setup = setup_training(rish_3t, rish_7t, config, out_dir, work_dir, device)
    cfg, out_dir, work_dir, ctx, log_dir = setup.cfg, setup.out_dir, setup.work_dir, setup.ctx, setup.log_dir
    scans_3t, scans_7t, targets = setup.scans_3t, setup.scans_7t, setup.targets
    train_ids, val_ids, tr = setup.train_ids, setup.val_ids, cfg["training"]
    only3 = sorted(set(scans_3t) - set(targets))
    only7 = sorted(set(scans_7t) - set(targets))

    norm = training_normalisation(work_dir / "normalisation.json", [scans_3t[i] for i in train_ids + only3],
                                  cfg, resume, ctx.is_main)
    train_pairs = [(scans_3t[i], targets[i]) for i in train_ids]
    val_pairs = [(scans_3t[i], targets[i]) for i in val_ids]
    x3 = stack_model_grid([scans_3t[i] for i in train_ids + only3], norm, cfg)
    x7 = torch.cat([stack_pairs(train_pairs, norm, cfg)[1],
                    stack_model_grid([scans_7t[i] for i in only7], norm, cfg)])
    v3, v7 = stack_pairs(val_pairs, norm, cfg)
    epochs = tr["epochs"]
    data = array_digest([x3, x7, v3, v7])

    def fingerprint(stage, *upstream):
        """``upstream``: the weights of the stages ``stage`` builds on (each hashed once)."""
        return stage_fingerprint(stage, stage_settings(cfg, stage), data, *upstream)

    def need(stage, stage_fp):
        """A completed earlier stage's weights, when this call does not train it (else None)."""
        return completed_stage_state(work_dir / stage, epochs[stage], stage_fp) if stage not in stages else None

    fp = fingerprint("vqvae3t")
    vq3_state = need("vqvae3t", fp)
    if "vqvae3t" in stages:
        vq3, _ = train_vqvae(x3, cfg, work_dir / "vqvae3t", ctx, resume, v3, log_dir, plot_losses=plot_losses,
                             fingerprint=fp)
        vq3_state = state_to_tensors(vq3)
    vq3_digest = state_digest(vq3_state) if vq3_state is not None else None
    fp = fingerprint("vqvae7t", *([vq3_digest] if tr["vqvae7t_init"] == "3T" and vq3_digest else []))
    vq7_state = need("vqvae7t", fp)
    if "vqvae7t" in stages:
        if vq3_state is None and tr["vqvae7t_init"] == "3T":
            raise TrainingDataError("stage vqvae7t needs the vqvae3t stage completed first "
                                    "(with these settings and data)")
        vq7, _ = finetune_vqvae7t(x7, cfg, work_dir / "vqvae7t", ctx, vq3_state, resume, v7, log_dir,
                                  plot_losses=plot_losses, fingerprint=fp)
        vq7_state = state_to_tensors(vq7)
    if vq3_state is None or vq7_state is None:
        if "ldm" in stages or "sr" in stages:
            raise TrainingDataError("stages ldm/sr need the vqvae3t and vqvae7t stages completed first "
                                    "(with these settings and data)")
        return None
    vq3, vq7 = build_vqvae(cfg), build_vqvae(cfg)
    vq3.load_state_dict(vq3_state), vq7.load_state_dict(vq7_state)
    vq3.to(ctx.device).eval(), vq7.to(ctx.device).eval()

    z3, z7 = encode_all(vq3, x3, ctx.device), encode_all(vq7, x7, ctx.device)
    latent_scale = float(1.0 / torch.cat([z3, z7]).std().clamp(min=1e-6))
    cfg_latent = latent_scale
    lat = torch.cat([z3, z7]) * cfg_latent
    labels = torch.cat([torch.full((len(z3),), CLASS_3T), torch.full((len(z7),), CLASS_7T)])
    vz = torch.cat([encode_all(vq3, v3, ctx.device), encode_all(vq7, v7, ctx.device)]) * cfg_latent
    vlab = torch.cat([torch.full((len(v3),), CLASS_3T), torch.full((len(v7),), CLASS_7T)])
    vq_digests = (vq3_digest, state_digest(vq7_state))
    fp = fingerprint("ldm", *vq_digests)
    unet_state = need("ldm", fp)
    if "ldm" in stages:
        unet, _ = train_ldm(lat, labels, cfg, work_dir / "ldm", ctx, resume,
                            (vz, vlab) if len(vz) else None, log_dir, plot_losses=plot_losses, fingerprint=fp)
        unet_state = state_to_tensors(unet)
    if unet_state is None:
        if "sr" in stages:
            raise TrainingDataError("stage sr needs the ldm stage completed first (with these settings and data)")
        return None

    networks = {"vqvae3t": vq3, "vqvae7t": vq7, "unet": build_unet(cfg)}
    networks["unet"].load_state_dict(unet_state)
    networks["unet"].to(ctx.device).eval()
    bundle_cfg = dict(cfg, normalisation=norm, latent_scale=latent_scale)
    fp = fingerprint("sr", *vq_digests, state_digest(unet_state))
    sr_state = need("sr", fp)
    if "sr" in stages:
        sr_in, sr_target = translate_for_sr(networks, bundle_cfg, train_pairs, norm, ctx.device)
        val_sr = translate_for_sr(networks, bundle_cfg, val_pairs, norm, ctx.device) if val_ids else None
        sr, _ = train_sr(sr_in, sr_target, cfg, work_dir / "sr", ctx, resume, val_sr, log_dir,
                         plot_losses=plot_losses, fingerprint=fp)
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
                [(scans_3t[i], scans_7t[i]) for i in val_ids], cfg["grid"],
                bundle_cfg["translation"].get("scale_reference", "roundtrip"), candidates,
                fit_pairs=[(scans_3t[i], scans_7t[i]) for i in train_ids])
            bundle_cfg["translation"].update(scale_smoothing=smoothing["sigma"], scale_strength=smoothing["strength"],
                                             scale_gain=smoothing["gain"])
            calibration["scale_smoothing"] = smoothing
    elapsed = time.perf_counter() - setup.t_start
    bundle_cfg.update(
        training_data={"n_3t": len(scans_3t), "n_7t": len(scans_7t), "n_paired": len(targets),
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


