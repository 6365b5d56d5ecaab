"""Per-order intensity normalisation of RISH maps (stored in the model bundle).

RISH_l (paper Eq. 1) spans orders of magnitude between orders and is skewed within an order.
Two invertible maps are offered (``training.normalisation`` of a config, recorded in the bundle):

``sqrt-percentile`` (the default of new configs): the SH *amplitude* of each order,

    y = sqrt(RISH_l / s_l),   s_l = 99.5th percentile of RISH_l over the training brains,

so y is about 0..1 inside the brain and ``background`` = 0 outside.  Zero is a physical value
(no signal), so a model-grid voxel that straddles the brain's edge averages amplitudes the way
partial volume does, and a squared error on y weights voxels as the NMSE of RISH does (large
RISH counts most).  Its inverse squares: the linear bias of a noisy estimate is its variance, not
the exponential of it.

``log-percentile`` (bundles trained before 2026-12):

    y = (log(RISH_l + eps_l) - low_l) / (high_l - low_l)

inside the brain, ``low_l``/``high_l`` the 0.5th/99.5th percentiles of the log values over the
training brains, eps_l = 1e-3 x the median RISH_l, ``background`` = -1 outside.  Measured
problems (docs/evaluation_results.md): voxels of near-zero RISH (CSF L2/L4) dominate a squared
error in the log domain, a model-grid voxel at the brain's edge mixes -1 with brain values, and
exponentiating a log-domain estimate is biased (post-hoc gains were needed).

The inverse is exact inside the brain (clipped at 0, since RISH is non-negative) and 0 outside.
Arrays: orders on the last axis.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

METHODS = ("sqrt-percentile", "log-percentile")
"""Normalisations a config may name (``training.normalisation``); the first is the default of new
configs, the last the one assumed for bundles that name none."""

LEGACY_METHOD = "log-percentile"

BACKGROUND = -1.0
"""Outside-brain value of ``log-percentile`` (``sqrt-percentile`` uses 0)."""
_PERCENTILES = (0.5, 99.5)
_MAX_SAMPLES_PER_VOLUME = 200_000  # bounded memory when pooling many volumes


def fit_normalisation(volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                      orders: Sequence[int], seed: int = 0, method: str = LEGACY_METHOD) -> dict[str, Any]:
    """Learn the per-order parameters from training volumes.

    Parameters
    ----------
    volumes : sequence of (X, Y, Z, n_orders) float arrays, RISH features (attenuation^2).
    masks : sequence of (X, Y, Z) bool brain masks (same grids as ``volumes``).
    orders : SH orders of the last axis, e.g. (0, 2, 4).
    method : one of :data:`METHODS`.

    Returns
    -------
    dict
        JSON-ready: ``{"method", "orders", "scale", "background"}`` (sqrt-percentile) or
        ``{"method", "orders", "eps", "low", "high", "background"}`` (log-percentile).
    """
    if method not in METHODS:
        raise ValueError(f"unknown normalisation {method!r} (choose from {list(METHODS)})")
    rng = np.random.default_rng(seed)
    pooled = []
    for vol, mask in zip(volumes, masks):
        vals = np.asarray(vol, dtype=np.float64)[np.asarray(mask, bool)]
        if len(vals) > _MAX_SAMPLES_PER_VOLUME:
            vals = vals[rng.choice(len(vals), _MAX_SAMPLES_PER_VOLUME, replace=False)]
        pooled.append(np.clip(vals, 0, None))
    if not pooled or sum(len(p) for p in pooled) == 0:
        raise ValueError("cannot fit the normalisation: no brain voxels in the training volumes")
    vals = np.concatenate(pooled)
    if method == "sqrt-percentile":
        scale = np.maximum(np.percentile(vals, _PERCENTILES[1], axis=0), 1e-12)
        return {"method": method, "orders": [int(o) for o in orders], "scale": scale.tolist(), "background": 0.0}
    eps = np.maximum(1e-3 * np.median(vals, axis=0), 1e-12)
    logs = np.log(vals + eps)
    low, high = np.percentile(logs, _PERCENTILES, axis=0)
    high = np.maximum(high, low + 1e-6)
    return {"method": method, "orders": [int(o) for o in orders],
            "eps": eps.tolist(), "low": low.tolist(), "high": high.tolist(),
            "background": BACKGROUND}


def parameter_keys(method: str) -> set[str]:
    """Keys of a fitted normalisation of ``method`` (checked when a bundle is loaded)."""
    if method == "sqrt-percentile":
        return {"method", "orders", "scale", "background"}
    if method == "log-percentile":
        return {"method", "orders", "eps", "low", "high", "background"}
    raise ValueError(f"unknown normalisation method {method!r}")


#: Voxels per slab of :func:`normalise` / :func:`denormalise`: their float64 temporaries (a few MB)
#: stay in the cache and are reused, instead of grid-sized fresh arrays.
_SLAB_VOXELS = 1 << 18


def _slabs(shape: tuple[int, ...]) -> list[slice]:
    """Slices of the first axis holding about :data:`_SLAB_VOXELS` voxels each."""
    step = max(1, _SLAB_VOXELS // max(1, int(np.prod(shape[1:3]))))
    return [slice(start, start + step) for start in range(0, shape[0], step)]


def normalise(rish: np.ndarray, mask: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """RISH (X, Y, Z, n) -> normalised float32 (X, Y, Z, n); background outside ``mask``.

    Computed in float64 and rounded once, slab by slab along X (``_SLAB_VOXELS``): elementwise
    over a slab and then chosen by the mask, which gives each voxel the value the mask's voxels
    alone would (the same float64 operations) without gathering and scattering them, and without
    grid-sized temporaries (the ldm's three calls at HCP size: 0.34-0.71 s against 0.62-0.97 s
    with a boolean gather, 2026-12-01)."""
    mask = np.asarray(mask, bool)
    rish = np.asarray(rish)
    out = np.empty(rish.shape, dtype=np.float32)
    background = np.float32(norm["background"])
    for slab in _slabs(rish.shape):
        values = _normalised(np.clip(rish[slab], 0, None).astype(np.float64), norm)
        out[slab] = np.where(mask[slab][..., None], values, background)
    return out


def _normalised(rish: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    if norm.get("method") == "sqrt-percentile":
        return np.sqrt(rish / np.asarray(norm["scale"], np.float64))
    if norm.get("method") == "log-percentile":
        eps, low, high = (np.asarray(norm[k], np.float64) for k in ("eps", "low", "high"))
        return (np.log(rish + eps) - low) / (high - low)
    raise ValueError(f"unknown normalisation method {norm.get('method')!r}")


def denormalise(y: np.ndarray, mask: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`normalise`: float32 RISH (X, Y, Z, n), >= 0, zero outside ``mask``
    (computed in float64, slab by slab, as :func:`normalise` is)."""
    mask = np.asarray(mask, bool)
    y = np.asarray(y)
    out = np.empty(y.shape, dtype=np.float32)
    for slab in _slabs(y.shape):
        values = _denormalised(y[slab].astype(np.float64), norm)
        out[slab] = np.where(mask[slab][..., None], values, 0.0)
    return out


def _denormalised(y: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    if norm.get("method") == "sqrt-percentile":
        return np.asarray(norm["scale"], np.float64) * np.clip(y, 0, None) ** 2
    if norm.get("method") == "log-percentile":
        eps, low, high = (np.asarray(norm[k], np.float64) for k in ("eps", "low", "high"))
        return np.clip(np.exp(y * (high - low) + low) - eps, 0, None)
    raise ValueError(f"unknown normalisation method {norm.get('method')!r}")
