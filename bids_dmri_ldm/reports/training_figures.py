"""Figures of the group training report: loss curves, validation metrics, example reconstructions.

Pure plotting functions from numpy arrays to :class:`matplotlib.figure.Figure`
(see :mod:`bids_dmri_ldm.reports.figures` for the conventions);
:func:`bids_dmri_ldm.reports.plotting.to_png` turns one into PNG bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from bids_dmri_ldm.reports.plotting import CMAP_INTENSITY, robust_range, take_slice


def loss_curves_figure(curves: Mapping[str, Mapping[str, np.ndarray]], x_key: str = "epoch") -> Figure:
    """Loss curves, one panel per training stage.

    Parameters
    ----------
    curves : dict
        ``{stage: {column: values (n,)}}``; ``column == x_key`` is the x axis
        (the row number when absent), every other numeric column is a curve.
    x_key : str
        Name of the x column.

    Returns
    -------
    matplotlib.figure.Figure
        Log y axis when all values are positive.
    """
    if not curves:
        raise ValueError("no loss curves to plot")
    n = len(curves)
    fig = Figure(figsize=(4.2 * min(n, 3), 3.0 * int(np.ceil(n / 3))), facecolor="white")
    axes = fig.subplots(int(np.ceil(n / 3)), min(n, 3), squeeze=False).ravel()
    for ax, (stage, columns) in zip(axes, curves.items()):
        _plot_columns(ax, columns, x_key)
        ax.set_title(stage, fontsize=10)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9, wspace=0.25, hspace=0.45)
    return fig


def metrics_figure(metrics: Mapping[str, np.ndarray], x_key: str = "epoch") -> Figure:
    """Validation metrics per epoch, one small panel per metric.

    Parameters
    ----------
    metrics : dict
        ``{column: values (n,)}``; ``x_key`` is the x axis, every other
        column one panel (e.g. NMSE and SSIM per RISH order).

    Returns
    -------
    matplotlib.figure.Figure
    """
    names = [k for k in metrics if k != x_key]
    if not names:
        raise ValueError("no validation metric columns")
    n_cols = min(len(names), 4)
    n_rows = int(np.ceil(len(names) / n_cols))
    fig = Figure(figsize=(3.2 * n_cols, 2.4 * n_rows), facecolor="white")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    x = _x_values(metrics, x_key)
    for ax, name in zip(axes, names):
        y = np.asarray(metrics[name], float)
        ax.plot(x[: y.size], y, marker="o", markersize=3, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(x_key, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.9, wspace=0.3, hspace=0.6)
    return fig


def _x_values(columns: Mapping[str, np.ndarray], x_key: str) -> np.ndarray:
    if x_key in columns:
        return np.asarray(columns[x_key], float)
    n = max(np.size(v) for v in columns.values())
    return np.arange(n, dtype=float)


def _plot_columns(ax, columns: Mapping[str, np.ndarray], x_key: str) -> None:
    x = _x_values(columns, x_key)
    positive = True
    for name, values in columns.items():
        if name == x_key:
            continue
        y = np.asarray(values, float)
        ax.plot(x[: y.size], y, label=name, linewidth=1.2)
        finite = y[np.isfinite(y)]
        positive &= bool(finite.size) and bool((finite > 0).all())
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel(x_key, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def reconstruction_figure(examples: Sequence[Mapping[str, np.ndarray]], orders=(0, 2, 4)) -> Figure:
    """Example reconstructions: mid-axial slices of input, prediction, target.

    Parameters
    ----------
    examples : sequence of dict
        Each ``{"label": str, "source": (X,Y,Z,n_orders), "prediction": ...,
        "target": ...}`` (any of the three volumes may be missing; all given
        volumes of one example on the same grid). Optionally ``"mask"``.
    orders : sequence of int
        SH orders on the last axis.

    Returns
    -------
    matplotlib.figure.Figure
        One row per (example, order); columns source / prediction / target,
        one grey scale per row.
    """
    kinds = ("source", "prediction", "target")
    rows = []
    for example in examples:
        vols = {k: np.asarray(example[k], np.float32) for k in kinds if example.get(k) is not None}
        if not vols:
            continue
        first = next(iter(vols.values()))
        n_orders = first.shape[-1] if first.ndim == 4 else 1
        for o in range(n_orders):
            rows.append((example.get("label", "example"), list(orders)[o] if o < len(orders) else o,
                         {k: (v[..., o] if v.ndim == 4 else v) for k, v in vols.items()}))
    if not rows:
        raise ValueError("no example volumes to show")
    fig = Figure(figsize=(3 * 1.9 + 1.2, len(rows) * 1.9 + 0.3), facecolor="white")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, (label, order, vols) in enumerate(rows):
        vmin, vmax = robust_range(list(vols.values()))
        for c, kind in enumerate(kinds):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("black")
            if kind in vols:
                vol = vols[kind]
                ax.imshow(take_slice(vol, 2, vol.shape[2] // 2), cmap=CMAP_INTENSITY,
                          vmin=vmin, vmax=vmax, interpolation="nearest")
            if r == 0:
                ax.set_title(kind, fontsize=9)
        axes[r, 0].set_ylabel(f"{label}\nL{order}", fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.02, top=1 - 0.3 / fig.get_figheight(),
                        wspace=0.04, hspace=0.06)
    return fig



__all__ = ["loss_curves_figure", "metrics_figure", "reconstruction_figure"]
