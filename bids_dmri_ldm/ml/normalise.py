"""Per-order intensity normalisation of RISH maps (stored in the model bundle).

RISH_l (paper Eq. 1) spans orders of magnitude between orders and is skewed
within an order, so each order is mapped by

    y = (log(RISH_l + eps_l) - low_l) / (high_l - low_l)

inside the brain, with ``low_l``/``high_l`` the 0.5th/99.5th percentiles of the
log values over the training brains (y is then about 0..1) and eps_l = 1e-3 x the
median RISH_l.  Outside the brain y = ``background`` (-1), well apart from
brain values.  The inverse is exact inside the brain (clipped at 0, since RISH
is non-negative) and 0 outside.  Arrays: orders on the last axis.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BACKGROUND = -1.0
_PERCENTILES = (0.5, 99.5)
_MAX_SAMPLES_PER_VOLUME = 200_000  # bounded memory when pooling many volumes


def fit_normalisation(volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                      orders: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """Learn the per-order parameters from training volumes.

    Parameters
    ----------
    volumes : sequence of (X, Y, Z, n_orders) float arrays, RISH features (attenuation^2).
    masks : sequence of (X, Y, Z) bool brain masks (same grids as ``volumes``).
    orders : SH orders of the last axis, e.g. (0, 2, 4).

    Returns
    -------
    dict
        ``{"method", "orders", "eps", "low", "high", "background"}`` (JSON-ready).
    """
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
    eps = np.maximum(1e-3 * np.median(vals, axis=0), 1e-12)
    logs = np.log(vals + eps)
    low, high = np.percentile(logs, _PERCENTILES, axis=0)
    high = np.maximum(high, low + 1e-6)
    return {"method": "log-percentile", "orders": [int(o) for o in orders],
            "eps": eps.tolist(), "low": low.tolist(), "high": high.tolist(),
            "background": BACKGROUND}


def _params(norm: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if norm.get("method") != "log-percentile":
        raise ValueError(f"unknown normalisation method {norm.get('method')!r}")
    return (np.asarray(norm["eps"], np.float64), np.asarray(norm["low"], np.float64),
            np.asarray(norm["high"], np.float64))


def normalise(rish: np.ndarray, mask: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """RISH (X, Y, Z, n) -> normalised float32 (X, Y, Z, n); background outside ``mask``."""
    eps, low, high = _params(norm)
    y = (np.log(np.clip(rish, 0, None).astype(np.float64) + eps) - low) / (high - low)
    y[~np.asarray(mask, bool)] = norm["background"]
    return y.astype(np.float32)


def denormalise(y: np.ndarray, mask: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`normalise`: float32 RISH (X, Y, Z, n), >= 0, zero outside ``mask``."""
    eps, low, high = _params(norm)
    rish = np.exp(np.asarray(y, np.float64) * (high - low) + low) - eps
    rish = np.clip(rish, 0, None)
    rish[~np.asarray(mask, bool)] = 0.0
    return rish.astype(np.float32)
