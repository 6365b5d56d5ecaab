"""Training data: paired 3T/7T RISH scans in canonical orientation, stacked on the model grid.

:func:`prepare_scans` brings each participant's 7T scan onto its 3T grid (every 3T/7T
comparison of training uses it); the stacking helpers crop, normalise and resize scans
to the model grid, orders interleaved, for :mod:`bids_dmri_ldm.ml.training` and
:mod:`bids_dmri_ldm.ml.calibration`.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io.files import atomic_write_text
from .data import RishScan, canonical_scan, target_on_source, to_model_grid
from .distributed import DistContext, init_distributed
from .modelconfig import validate_config
from .normalise import LEGACY_METHOD, fit_normalisation, normalise
from .split import split_participants
from .stageloop import stage_fingerprint


class TrainingDataError(ValueError):
    """The training data cannot support the requested stage (e.g. no paired participants)."""



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


def paired_participants(scans_3t: Mapping[str, RishScan], scans_7t: Mapping[str, RishScan],
                        targets: Mapping[str, RishScan]) -> list[str]:
    """The participants with both a 3T and a 7T scan (``targets``' keys, :func:`prepare_scans`),
    sorted; :class:`TrainingDataError` naming what was found when there is none."""
    paired = sorted(targets)
    if not paired:
        raise TrainingDataError(
            f"no paired participants: found {len(scans_3t)} with 3T ({', '.join(sorted(scans_3t)[:5]) or 'none'}) "
            f"and {len(scans_7t)} with 7T ({', '.join(sorted(scans_7t)[:5]) or 'none'}) data, none in both")
    return paired


@dataclass
class TrainingSetup:
    """What every trainer starts from (:func:`setup_training`): a private copy of the validated
    config, its folders, the process's place in the (possibly distributed) run, when training
    started, the scans of :func:`prepare_scans` and the participant split."""

    cfg: dict[str, Any]
    out_dir: Path
    work_dir: Path
    ctx: DistContext
    t_start: float
    scans_3t: dict[str, RishScan]
    scans_7t: dict[str, RishScan]
    targets: dict[str, RishScan]
    train_ids: list[str]
    val_ids: list[str]

    @property
    def log_dir(self) -> Path | None:
        """Where the loss curves go (``out_dir/training``); None on DDP ranks > 0."""
        return self.out_dir / "training" if self.ctx.is_main else None


def setup_training(rish_3t: RishInput, rish_7t: RishInput, config: dict[str, Any], out_dir: str | Path,
                   work_dir: str | Path, device: torch.device | str) -> TrainingSetup:
    """Validate ``config`` (a training config), join the run's process group, prepare the scans and
    split the paired participants into training and validation ones (``training.val_fraction``,
    ``training.seed``); ``work_dir`` is created.

    Raises
    ------
    ConfigError
        An invalid config.
    TrainingDataError
        No paired participant.
    """
    validate_config(config, "training")
    cfg = json.loads(json.dumps(config))  # the trainers record calibrated settings in their copy
    tr = cfg["training"]
    ctx = init_distributed(device)
    t_start = time.perf_counter()
    scans_3t, scans_7t, targets = prepare_scans(rish_3t, rish_7t)
    paired = paired_participants(scans_3t, scans_7t, targets)
    train_ids, val_ids = split_participants(paired, tr["val_fraction"], tr["seed"])
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return TrainingSetup(cfg, Path(out_dir), work_dir, ctx, t_start, scans_3t, scans_7t, targets,
                         train_ids, val_ids)


def array_digest(arrays: Iterable[np.ndarray | torch.Tensor]) -> str:
    """SHA-256 of arrays' (numpy or torch) shapes, dtypes and bytes, in the order given: what
    training data, or a trained stage's weights, were (:func:`~.stageloop.stage_fingerprint`)."""
    h = hashlib.sha256()
    for array in arrays:
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().contiguous()
            h.update(f"{tuple(array.shape)} {array.dtype};".encode())
            h.update(array.reshape(-1).view(torch.uint8).numpy().data)  # any dtype, bfloat16 too
        else:
            array = np.ascontiguousarray(array)
            h.update(f"{array.shape} {array.dtype};".encode())
            h.update(array.data)
    return h.hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """:func:`array_digest` of a state dict's tensors in key order."""
    return array_digest(state[key] for key in sorted(state))


def training_normalisation(path: Path, scans: Sequence[RishScan], cfg: dict, resume: bool,
                           write: bool) -> dict:
    """The amplitude normalisation of a training run: fitted on ``scans`` (the 3T training
    scans) with ``cfg["training"]``'s method and seed and written to ``path`` when ``write`` (the
    main rank), or, with ``resume``, the one an interrupted run fitted there on the same scans
    with the same settings (recorded in the file as ``fitted_on``; else it is fitted again)."""
    tr = cfg["training"]
    method = tr.get("normalisation", LEGACY_METHOD)
    fitted_on = stage_fingerprint("normalisation", [list(cfg["orders"]), tr["seed"], method],
                                  array_digest(array for scan in scans for array in (scan.rish, scan.mask)))
    if resume and path.is_file():
        stored = json.loads(path.read_text())
        if stored.pop("fitted_on", None) == fitted_on:
            return stored
    norm = fit_normalisation([s.rish for s in scans], [s.mask for s in scans], cfg["orders"], tr["seed"], method)
    if write:
        atomic_write_text(path, json.dumps({**norm, "fitted_on": fitted_on}, indent=1))
    return norm


def stack_model_grid(scans: Sequence[RishScan], norm: dict, cfg: dict,
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


def stack_pairs(pairs: Sequence[tuple[RishScan, RishScan]], norm: dict, cfg: dict, with_masks: bool = False):
    """Model-grid 3T volumes and their position-paired 7T targets (both cropped by the 3T box);
    with ``with_masks`` each followed by its model-grid brain masks."""
    sources = [p[0] for p in pairs]
    x3 = stack_model_grid(sources, norm, cfg, with_masks=with_masks)
    x7 = stack_model_grid([p[1] for p in pairs], norm, cfg, boxes=[s.mask for s in sources], with_masks=with_masks)
    return (*x3, *x7) if with_masks else (x3, x7)


@torch.no_grad()
def encode_all(vq: nn.Module, volumes: torch.Tensor, device: torch.device, batch: int = 8) -> torch.Tensor:
    out = []
    for lo in range(0, len(volumes), batch):
        z = vq.encode(volumes[lo:lo + batch].to(device))
        out.append(vq.quantize(z.float())[0].cpu())
    if not out:  # no validation participants (val_fraction 0): an empty set, skipped by callers
        return torch.zeros(0)
    return torch.cat(out)

