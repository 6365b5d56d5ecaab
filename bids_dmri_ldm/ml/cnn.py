"""The paper's CNN baseline: supervised 3T -> 7T regression of RISH on the model grid.

Zhu et al. (MICCAI 2024, Table 1) compare their latent diffusion model with a CNN in the style of
Karayumak et al. (2018).  Here it is a residual MONAI 3D UNet (:class:`~.networks.ResidualRishCNN`)
that takes all RISH orders of a 3T scan as channels (normalised log-RISH, :mod:`.normalise`, on
the model grid of :mod:`.data`) and predicts the position-paired 7T ones (the 7T brought into the
3T grid through the affines, :func:`~.training_data.prepare_scans`), trained with the mean squared
error inside both brains.  At the participant level its prediction becomes scale maps exactly as
the ldm's does (:class:`bids_dmri_ldm.methods.LearnedMethod`): lambda^2 = predicted 7T RISH /
reference, the reference being the 3T RISH through the same model-grid round trip (to the grid
and back) so that the resampling loss cancels in the ratio.

Arrays: RISH ``(X, Y, Z, n_orders)``, masks ``(X, Y, Z)`` bool, model-grid tensors
``(N, n_orders, *grid)``.
"""
from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bundle import Bundle, model_card, save_bundle, software_versions
from .data import RishScan, denormalised_from_model_grid, to_model_grid
from .distributed import barrier
from .inference import Translation, autocast_for, precision_provenance, resolve_precision
from .networks import build_cnn
from .normalise import normalise
from .scalemaps import SMOOTHING_CANDIDATES, calibrate_scale_smoothing
from .stageloop import (
    PlotFn,
    fit_stage,
    kept_epoch,
    sample_generator,
    stage_fingerprint,
)
from .training_data import (
    RishInput,
    array_digest,
    setup_training,
    stack_pairs,
    training_normalisation,
)

STAGE = "cnn"


def paired_tensors(pairs: Sequence[tuple[RishScan, RishScan]], norm: dict, cfg: dict
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model-grid inputs, targets and loss weights of position-paired scans.

    Returns
    -------
    x, y : (n_pairs, n_orders, *grid) float32, normalised 3T and 7T log-RISH.
    weight : (n_pairs, 1, *grid) float32, 1 where both brains are (model-grid fraction > 0.5).
    """
    n, grid = len(cfg["orders"]), tuple(cfg["grid"])
    x, mask_x, y, mask_y = stack_pairs(pairs, norm, cfg, with_masks=True)
    weight = (mask_x[::n] & mask_y[::n]).float()  # one mask per scan
    return x.view(-1, n, *grid), y.view(-1, n, *grid), weight


def make_loss(seed: int, augment_flip: bool):
    """Masked MSE over all orders; with ``augment_flip`` each training sample is mirrored left-right
    (x axis of the canonical RAS grid) with probability 1/2, drawn per sample and epoch."""

    def loss_fn(model, batch, idx, epoch):
        x, y, w = batch
        if augment_flip and epoch >= 0:
            flip = torch.tensor([bool(torch.rand(1, generator=sample_generator(seed, STAGE, epoch, i)) < 0.5)
                                 for i in idx.tolist()], device=x.device).view(-1, 1, 1, 1, 1)
            x, y, w = (torch.where(flip, t.flip(2), t) for t in (x, y, w))
        out = model(x).float()
        return ((out - y) ** 2 * w).sum() / (w.sum() * y.shape[1]).clamp(min=1.0)

    return loss_fn


def train_cnn(rish_3t: RishInput, rish_7t: RishInput, config: dict[str, Any], out_dir: str | Path,
              work_dir: str | Path, device: torch.device | str = "cpu", resume: bool = False,
              command: str = "", plot_losses: PlotFn | None = None) -> Path | None:
    """Train the cnn baseline on the paired participants and write its bundle to ``out_dir/model``.

    Parameters are those of :func:`~.training.train_all` (RISH, mask and affine per participant;
    only paired participants are used, split into training and validation participants by
    ``training.val_fraction``).  Checkpoints go to ``work_dir/cnn`` (``resume`` continues), the
    loss curve to ``out_dir/training/losses_cnn.{csv,png}``.

    Returns the bundle directory (None on DDP ranks > 0).

    Raises
    ------
    TrainingDataError
        No paired participant.
    """
    setup = setup_training(rish_3t, rish_7t, config, out_dir, work_dir, device)
    cfg, out_dir, work_dir, ctx, log_dir = setup.cfg, setup.out_dir, setup.work_dir, setup.ctx, setup.log_dir
    scans_3t, scans_7t, targets = setup.scans_3t, setup.scans_7t, setup.targets
    train_ids, val_ids, tr = setup.train_ids, setup.val_ids, cfg["training"]
    norm = training_normalisation(work_dir / "normalisation.json", [scans_3t[i] for i in train_ids], cfg, resume,
                                  ctx.is_main)
    train = paired_tensors([(scans_3t[i], targets[i]) for i in train_ids], norm, cfg)
    val = paired_tensors([(scans_3t[i], targets[i]) for i in val_ids], norm, cfg) if val_ids else None
    torch.manual_seed(tr["seed"])
    model = build_cnn(cfg)
    settings = {"cnn": cfg["cnn"], "grid": cfg["grid"], "orders": cfg["orders"],
                "crop_margin": cfg["translation"]["crop_margin"],
                "training": {k: v for k, v in tr.items() if k not in ("epochs", "calibrate_smoothing")}}
    fingerprint = stage_fingerprint(STAGE, settings, array_digest([*train, *(val if val is not None else ())]))
    history = fit_stage(STAGE, model, list(train), make_loss(tr["seed"], bool(tr.get("augment_flip", False))), cfg,
                        tr["epochs"][STAGE], tr["batch_size"], work_dir / STAGE, log_dir, ctx, resume,
                        None if val is None else list(val), plot_losses=plot_losses, fingerprint=fingerprint)
    if not ctx.is_main:
        barrier(ctx)
        return None
    model = model.cpu().eval()
    calibration = None
    candidates = tr.get("calibrate_smoothing", SMOOTHING_CANDIDATES)
    if val_ids and candidates:
        bundle = Bundle(dict(cfg, normalisation=norm), {STAGE: model}, Path("."), "")
        calibration = calibrate_scale_smoothing(lambda r, m: predict_rish(r, m, bundle), [
            (scans_3t[i], scans_7t[i]) for i in val_ids], cfg["grid"],
            cfg["translation"].get("scale_reference", "roundtrip"), candidates,
            fit_pairs=[(scans_3t[i], scans_7t[i]) for i in train_ids])
        cfg["translation"].update(scale_smoothing=calibration["sigma"], scale_strength=calibration["strength"],
                                  scale_gain=calibration["gain"])
    bundle_cfg = dict(cfg, normalisation=norm, software=software_versions(),
                      created=datetime.now(UTC).isoformat(timespec="seconds"),
                      training_data={"n_3t": len(scans_3t), "n_7t": len(scans_7t), "n_paired": len(targets),
                                     "pairing": "7T brought into the 3T grid through the affines (world "
                                                "space), canonical RAS voxel order",
                                     "train_participants": train_ids, "validation_participants": val_ids,
                                     "epoch_kept": kept_epoch(history, tr),
                                     "calibration": {"scale_smoothing": calibration}})
    card = model_card(bundle_cfg, command=command, training_time_s=time.perf_counter() - setup.t_start,
                      machine=f"{platform.node()} {platform.processor() or platform.machine()}, "
                              f"{torch.get_num_threads()} threads, {ctx.device}")
    bundle_dir = save_bundle(out_dir / "model", bundle_cfg, {STAGE: model}, card)
    barrier(ctx)
    return bundle_dir


@torch.no_grad()
def predict_rish(rish_3t: np.ndarray, mask: np.ndarray, bundle: Bundle,
                 device: torch.device | str = "cpu", precision: str = "auto") -> Translation:
    """Predict 7T-like RISH with a cnn bundle (arrays in canonical orientation, see
    :mod:`.orientation`); ``precision`` as in :func:`~.inference.translate_rish`.

    Returns
    -------
    Translation
        ``pred_7t`` (X, Y, Z, n_orders) float32, ``std`` None, ``recon_3t`` the 3T RISH through the
        same model-grid round trip (the scale-map reference), provenance.
    """
    start = time.perf_counter()
    device = torch.device(device)
    cfg = bundle.config
    option, precision = precision, resolve_precision(cfg, device, precision)
    norm, grid, n = cfg["normalisation"], tuple(cfg["grid"]), len(cfg["orders"])
    rish_3t = np.asarray(rish_3t, dtype=np.float32)
    mask = np.asarray(mask, bool)
    if rish_3t.ndim != 4 or rish_3t.shape[-1] != n or rish_3t.shape[:3] != mask.shape:
        raise ValueError(f"rish_3t must be (X, Y, Z, {n}) matching the mask {mask.shape}, got {rish_3t.shape}")
    x, _, crop = to_model_grid(normalise(rish_3t, mask, norm), mask, grid, cfg["translation"]["crop_margin"])
    net = bundle.networks[STAGE]
    with autocast_for(device, precision=precision):
        out = net(x.view(1, n, *grid).to(device, memory_format=torch.channels_last_3d)).float().cpu()
    pred = denormalised_from_model_grid(out.view(n, 1, *grid), crop, mask, norm)
    reference = denormalised_from_model_grid(x, crop, mask, norm)
    provenance = {"Method": STAGE, "ModelName": cfg["name"], "ModelGrid": list(grid),
                  "RISHOrders": list(cfg["orders"]), "Device": str(device),
                  **precision_provenance(device, precision), "PrecisionOption": option,
                  "CropBox": crop.as_list(),
                  "ElapsedSeconds": round(time.perf_counter() - start, 3)}
    return Translation(pred, None, reference, provenance)
