"""Calibration of a trained LDM on the validation pairs: translation settings and linear gains.

:func:`calibrate_translation` chooses t0 and omega per RISH order (grid search),
:func:`calibrate_linear_gains` the per-order gains that undo the networks' bias in
linear RISH units; :func:`translate_for_sr` gives the super-resolution head its inputs.
Called by :func:`bids_dmri_ldm.ml.training.train_all`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .inference import translate_latents
from .training_data import encode_all, stack_pairs


@torch.no_grad()
def translate_for_sr(networks, cfg, pairs, norm, device):
    """LDM translation of training 3T volumes (decoded by the 7T VQ-VAE) and their position-paired
    real 7T targets (``pairs``: (3T scan, 7T on the 3T grid), see :func:`~.training_data.prepare_scans`)."""
    from .bundle import Bundle

    bundle = Bundle(cfg, networks, Path("."), "")
    tr = cfg["translation"]
    n_orders = len(cfg["orders"])
    x3, x7 = stack_pairs(pairs, norm, cfg)
    outs = []
    for lo in range(0, len(x3), n_orders):
        z3 = encode_all(networks["vqvae3t"], x3[lo:lo + n_orders], device) * cfg["latent_scale"]
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
    compared with the position-paired real 7T (``pairs``, :func:`~.training_data.prepare_scans`) on the model
    grid: mean squared error of the normalised (log-RISH) values inside the 7T brain.  Orders are independent batch entries, so each
    order takes its own best pair.  Returns the choice and the full score table.
    """
    from .bundle import Bundle

    bundle = Bundle(cfg, networks, Path("."), "")
    tr, steps = cfg["training"], cfg["training"]["sr_ddim_steps"]
    n_orders = len(cfg["orders"])
    norm = cfg["normalisation"]
    x3, _, x7, brain = stack_pairs(pairs, norm, cfg, with_masks=True)
    z3 = encode_all(networks["vqvae3t"], x3, device) * cfg["latent_scale"]
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
    brought there through the affines, ``pairs`` from :func:`~.training_data.prepare_scans`),

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
