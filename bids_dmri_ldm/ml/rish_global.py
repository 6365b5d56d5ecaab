"""rish-global at the group level: one scale factor per RISH order and shell, learned from paired
3T/7T participants (the model record :class:`RishGlobalModel` and its fitting).

The model is applied at the participant level by :class:`bids_dmri_ldm.methods.rish_global.RishGlobalMethod`,
which also reads and writes its folder (``rish_global.json`` + checksums). Shapes: RISH maps
``(X, Y, Z, n_orders)`` float32 (orders on the last axis), masks ``(X, Y, Z)`` bool, affines
``(4, 4)`` voxel -> scanner mm.
"""
from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.resample import resample, resample_mask
from ..core.sh import DEFAULT_TAU, RISH_ORDERS, scale_maps
from .modelconfig import trained_for as make_trained_for

RISH_GLOBAL = "rish-global"
"""The method's name, recorded in its model file."""


@dataclass
class RishGlobalModel:
    """One scale factor per RISH order (a spatially constant lambda_l), for each trained shell.

    Attributes
    ----------
    factors : tuple of float
        lambda_l for each order in ``orders``, of ``shell`` (the lowest trained shell).
    orders : tuple of int
        RISH orders, e.g. (0, 2, 4).
    tau : float
        The tau of Eq. 2 used when fitting.
    training : dict
        Summary of the data the factors were learned from (of every shell under ``per_shell``).
    name, version : str
        Model identity recorded in derivative sidecars.
    sha256 : str or None
        SHA-256 of the model folder's checksum list (``SHA256SUMS``), which covers every file
        of the model.
    shell, sh_order_max : float, int or None
        The b-value (s/mm²) of ``factors`` and the SH order of the data the factors were learned from.
    shell_factors : dict
        ``{b-value: factors}`` of every trained shell, ascending (``{shell: factors}`` when only
        ``shell`` and ``factors`` are given; empty when the shell is unknown).
    """

    factors: tuple[float, ...]
    orders: tuple[int, ...] = RISH_ORDERS
    tau: float = DEFAULT_TAU
    training: dict[str, Any] = field(default_factory=dict)
    name: str = RISH_GLOBAL
    version: str = "1"
    sha256: str | None = None
    shell: float | None = None
    sh_order_max: int | None = None
    validation: dict[str, Any] | None = None
    """The group level's validation table (:mod:`bids_dmri_ldm.evaluation.gate`), if any."""
    shell_factors: dict[float, tuple[float, ...]] = field(default_factory=dict)
    path: Path | None = None
    """The folder the model was read from or written to (None: in memory only)."""

    def __post_init__(self) -> None:
        if not self.shell_factors and self.shell is not None:
            self.shell_factors = {float(self.shell): tuple(float(f) for f in self.factors)}
        self.shell_factors = {float(b): tuple(float(f) for f in fs) for b, fs in sorted(self.shell_factors.items())}
        if self.shell_factors:
            self.shell, self.factors = next(iter(self.shell_factors.items()))

    @property
    def shells(self) -> list[float]:
        """The trained shells (s/mm², ascending; empty when unknown)."""
        return list(self.shell_factors)

    def factors_for(self, bval: float, tolerance: float) -> tuple[float, ...] | None:
        """The factors of the trained shell nearest to ``bval`` within ``tolerance``, or None;
        a model that does not record its shell applies its factors to any shell."""
        if not self.shell_factors:
            return self.factors
        gaps = {b: abs(b - float(bval)) for b in self.shell_factors}
        nearest = min(gaps, key=gaps.get)
        return self.shell_factors[nearest] if gaps[nearest] <= tolerance else None

    def to_json(self) -> dict[str, Any]:
        """The JSON document of the model file (checksum excluded: it lives in SHA256SUMS).

        ``factors``/``shell`` are those of the lowest shell (what a single-shell model holds);
        ``shell_factors`` lists every shell.
        """
        return {
            "name": self.name,
            "version": self.version,
            "method": RISH_GLOBAL,
            "orders": list(self.orders),
            "factors": [float(f) for f in self.factors],
            "tau": float(self.tau),
            "shell": self.shell,
            "shell_factors": [{"shell": b, "factors": list(fs)} for b, fs in self.shell_factors.items()],
            "sh_order_max": self.sh_order_max,
            "trained_for": self.trained_for,
            "training": self.training,
            **({"validation": self.validation} if self.validation is not None else {}),
        }

    @property
    def trained_for(self) -> dict[str, Any] | None:
        """The ``trained_for`` record (None when the shell or the SH order is unknown)."""
        if not self.shell_factors or self.sh_order_max is None:
            return None
        return make_trained_for(self.shells, self.sh_order_max, self.orders)


@dataclass
class RishPair:
    """RISH maps of one participant's paired source (3T) and target (7T) scans.

    Both scans are of the same head in the same scanner-world space, so their affines
    ``(4, 4)`` (voxel -> mm) relate the two grids directly; no registration is done here.
    ``rish_*`` are ``(X, Y, Z, n_orders)``, ``mask_*`` ``(X, Y, Z)`` bool.
    """

    rish_source: np.ndarray
    mask_source: np.ndarray
    affine_source: np.ndarray
    rish_target: np.ndarray
    mask_target: np.ndarray
    affine_target: np.ndarray
    label: str = ""


MIN_RISH0 = 1e-4
"""RISH_0 (of S/S0) below which a voxel is treated as background when fitting (a brain voxel
has RISH_0 = 4 pi mean(S/S0)^2, about 1 at b = 1000)."""

MIN_RELATIVE_RISH = 1e-6
"""RISH_l / RISH_0 below which order l is treated as absent in a voxel when fitting."""


def pair_rish_samples(pair: RishPair, min_rish0: float = MIN_RISH0) -> tuple[np.ndarray, np.ndarray]:
    """RISH of one pair's voxels inside both brains, on the target grid: ``(source, target)``,
    each ``(n_voxels, n_orders)`` float32.

    The source RISH maps and mask are resampled onto the target (7T) grid through the affines
    (cubic B-spline for RISH, linear + threshold for the mask); voxels inside both masks whose
    RISH_0 exceeds ``min_rish0`` in both scans count (voxels without signal in either scan,
    background inside a loose mask, carry no information about the 3T -> 7T change).
    """
    shape = pair.rish_target.shape[:3]
    source = resample(pair.rish_source, pair.affine_source, pair.affine_target, shape, order=3)
    mask_source = resample_mask(pair.mask_source, pair.affine_source, pair.affine_target, shape)
    both = mask_source & np.asarray(pair.mask_target, dtype=bool)
    both &= (source[..., 0] > min_rish0) & (pair.rish_target[..., 0] > min_rish0)
    return source[both].astype(np.float32), np.asarray(pair.rish_target[both], np.float32)


def voxel_scales(source: np.ndarray, target: np.ndarray, tau: float = DEFAULT_TAU,
                 min_relative: float = MIN_RELATIVE_RISH) -> np.ndarray:
    """Voxel-wise lambda (Eq. 2) of paired RISH samples ``(n_voxels, n_orders)``.

    Where the source has no order-l content (``RISH_l <= min_relative * RISH_0``, e.g. l > 0 in a
    noiseless isotropic voxel) lambda_l is 0/0, not a measurement: it is NaN.
    """
    lam = scale_maps(target, source, tau)
    defined = source > min_relative * source[:, :1]
    defined[:, 0] = True
    return np.where(defined, lam, np.nan).astype(np.float32)


def pair_scale_samples(pair: RishPair, tau: float = DEFAULT_TAU, min_rish0: float = MIN_RISH0,
                       min_relative: float = MIN_RELATIVE_RISH) -> np.ndarray:
    """Voxel-wise lambda (Eq. 2) of one pair on the target grid, shape (n_voxels, n_orders)
    (:func:`pair_rish_samples`, :func:`voxel_scales`)."""
    source, target = pair_rish_samples(pair, min_rish0)
    return voxel_scales(source, target, tau, min_relative)


STATISTIC = ("ratio of brain means: lambda_l = sqrt(sum RISH_l^7T / sum RISH_l^3T) over the voxels inside "
             "both brains with signal in both scans, all pairs pooled")
"""How :func:`fit_rish_global` turns the voxels into one factor per order (recorded in the model)."""


def ratio_of_means(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """One factor per order: sqrt of the ratio of the summed target and source RISH.

    The factor that makes the mean RISH_l of the scaled source equal the target's over the brain
    (the scale of pnlbwh's RISH harmonisation, sqrt(mean_ref / mean_tar), taken brain-wide
    instead of per template voxel). The median of the voxel-wise lambda_l, used before
    2026-12-02, is set by the many voxels where RISH_l is small and noisy (grey matter, CSF, for
    l > 0) and missed the brain-wide level of L2 by 5 % on the simulator (measured:
    docs/evaluation_results.md, "rish-global's estimator"); here each voxel weighs by its RISH.
    One voxel's weight is bounded, since S/S0 is clipped to [0, 1] before the fit
    (:mod:`bids_dmri_ldm.core.signal`): RISH_l is at most about 4 pi (the energy of a unit signal).

    Parameters
    ----------
    source, target : ndarray, (n_voxels, n_orders)
        Paired RISH samples (:func:`pair_rish_samples`).

    Returns
    -------
    ndarray, (n_orders,)
    """
    # unclipped: the cubic resampling's undershoots and overshoots at edges cancel in the sum
    return ratio_of_sums(np.sum(source, axis=0, dtype=np.float64), np.sum(target, axis=0, dtype=np.float64))


def ratio_of_sums(total_source: np.ndarray, total_target: np.ndarray) -> np.ndarray:
    """sqrt(total_target / total_source) per order, from RISH already summed over brains
    ``(n_orders,)``: the factor of :func:`ratio_of_means` (also the learned methods' brain-wide
    gain, :data:`bids_dmri_ldm.ml.scalemaps.BRAIN_WIDE_GAIN`)."""
    total_source = np.asarray(total_source, np.float64)
    return np.sqrt(np.asarray(total_target, np.float64) / np.maximum(total_source, np.finfo(np.float64).tiny))


def fit_rish_global(pairs: Iterable[RishPair], orders: Sequence[int] = RISH_ORDERS, tau: float = DEFAULT_TAU,
                    shell: float | None = None, sh_order_max: int | None = None,
                    extra_training: Mapping[str, Any] | None = None) -> RishGlobalModel:
    """Learn one scale factor per RISH order from paired participants.

    factor_l = sqrt(sum RISH_l^7T / sum RISH_l^3T) over the brain voxels of all pairs, pooled,
    on the target grid (:func:`pair_rish_samples`, :func:`ratio_of_means`). A pair without any
    voxel where an order's lambda_l is defined (:func:`voxel_scales`) is refused.

    Returns
    -------
    RishGlobalModel
        With a training summary (pairs, voxel counts, per-pair factors and medians of lambda,
        pooled quartiles of lambda).
    """
    sources, targets, samples, per_pair = [], [], [], []
    for pair in pairs:
        source, target = pair_rish_samples(pair)
        lam = voxel_scales(source, target, tau)
        if lam.shape[0] == 0 or np.all(np.isnan(lam), axis=0).any():
            raise ValueError(f"pair {pair.label or '?'}: no brain voxel with signal in both scans "
                             "(masks do not overlap, or an order is absent everywhere)")
        sources.append(source)
        targets.append(target)
        samples.append(lam)
        per_pair.append({"label": pair.label, "n_voxels": int(lam.shape[0]),
                         "factors": [float(v) for v in ratio_of_means(source, target)],
                         "median": [float(v) for v in np.nanmedian(lam, axis=0)],
                         "n_defined": [int(v) for v in np.sum(np.isfinite(lam), axis=0)]})
    if not samples:
        raise ValueError("fit_rish_global needs at least one source/target pair")
    pooled = np.concatenate(samples, axis=0)
    factors = tuple(float(v) for v in ratio_of_means(np.concatenate(sources), np.concatenate(targets)))
    q25, q50, q75 = np.nanpercentile(pooled, [25, 50, 75], axis=0)
    training = {
        "statistic": STATISTIC,
        "n_pairs": len(samples),
        "n_voxels": int(pooled.shape[0]),
        "n_defined": [int(v) for v in np.sum(np.isfinite(pooled), axis=0)],
        "quartiles": {"q25": [float(v) for v in q25], "median": [float(v) for v in q50],
                      "q75": [float(v) for v in q75]},
        "pairs": per_pair,
        "created": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
    }
    training.update(extra_training or {})
    return RishGlobalModel(factors=factors, orders=tuple(orders), tau=tau, training=training,
                           shell=shell, sh_order_max=sh_order_max)


def fit_rish_global_shells(pairs_by_shell: Mapping[float, Sequence[RishPair]], orders: Sequence[int] = RISH_ORDERS,
                           tau: float = DEFAULT_TAU, sh_order_max: int | None = None,
                           extra_training: Mapping[str, Any] | None = None) -> RishGlobalModel:
    """:func:`fit_rish_global` on each shell's pairs: one model holding the factors of every shell.

    Parameters
    ----------
    pairs_by_shell : mapping
        ``{b-value (s/mm²): pairs of that shell's RISH maps}``.

    Returns
    -------
    RishGlobalModel
        ``shell_factors`` of every shell; ``training`` is that of the lowest shell (for readers
        of single-shell models) with every shell's under ``per_shell`` (``{"1000": {...}}``).
    """
    if not pairs_by_shell:
        raise ValueError("fit_rish_global_shells needs at least one shell")
    fitted = {float(b): fit_rish_global(pairs, orders, tau, shell=float(b), sh_order_max=sh_order_max)
              for b, pairs in sorted(pairs_by_shell.items())}
    first = fitted[min(fitted)]
    training = dict(first.training)
    training["per_shell"] = {f"{b:g}": {k: v for k, v in m.training.items() if k != "created"} for b, m in fitted.items()}
    training.update(extra_training or {})
    return RishGlobalModel(factors=first.factors, orders=tuple(orders), tau=tau, training=training,
                           sh_order_max=sh_order_max,
                           shell_factors={b: m.factors for b, m in fitted.items()})
