"""Report figures: pure plotting functions from numpy arrays to PNG bytes.

Every function here takes arrays (and plain numbers/strings) and returns a
:class:`matplotlib.figure.Figure`; :func:`to_png` turns one into PNG bytes.
The brain-slice figures of the participant report are here; the shared
primitives (ranges, slices, colour maps, montages, :func:`to_png`) are in
:mod:`bids_dmri_ldm.reports.plotting`, the training report's figures in
:mod:`bids_dmri_ldm.reports.training_figures`.
Nothing reads files and nothing touches ``matplotlib.pyplot``: figures are
built with the object-oriented API on the Agg canvas, so they work without a
display, in worker processes and in threads, and leave no global state behind.

Conventions
-----------
- Volumes are ``(X, Y, Z)`` arrays whose voxel axes point (approximately) to
  Right, Anterior, Superior (the loader reorients to the closest canonical
  orientation first). Slices are shown in the neurological convention:
  patient right on the image right, anterior / superior up.
- Vector fields (principal eigenvectors) are ``(X, Y, Z, 3)`` with components
  in the same voxel axes; colour-FA maps |e_x|, |e_y|, |e_z| to red, green,
  blue (left-right red, anterior-posterior green, superior-inferior blue).
- Maps with several RISH orders carry the orders on the last axis
  ``(X, Y, Z, n_orders)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage

from bids_dmri_ldm.core.display import bounding_box, select_slices
from bids_dmri_ldm.reports.plotting import (
    CMAP_DIFFERENCE,
    CMAP_INTENSITY,
    CMAP_SCALE,
    CMAP_UNCERTAINTY,
    DPI,
    MASK_COLOUR,
    centred_range,
    colormap,
    montage,
    robust_range,
    take_slice,
    to_png,
    to_rgba,
)

#: Orientation names of the three slicing axes, in array-axis order.
VIEW_NAMES = {2: "axial", 1: "coronal", 0: "sagittal"}
#: Display order of the views in mosaics.
VIEW_ORDER = (2, 1, 0)


def _slice_panels(slices: Mapping[int, Sequence[int]]) -> list[tuple[int, int]]:
    return [(axis, idx) for axis in VIEW_ORDER for idx in slices.get(axis, [])]



def _planes(volume, panels, box, mask=None):
    """The panels' 2D slices of the cropped volume; outside ``mask`` set to NaN."""
    cropped = volume[box]
    cropped_mask = None if mask is None else mask[box]
    offsets = [b.start for b in box]
    for axis, idx in panels:
        plane = take_slice(cropped, axis, idx - offsets[axis]).astype(np.float32)
        if cropped_mask is not None:
            plane[~take_slice(cropped_mask, axis, idx - offsets[axis])] = np.nan
        yield plane


def _row(volume, panels, box, *, cmap, vmin, vmax, mask=None):
    """RGBA montage of the chosen slices of one volume (cropped to ``box``)."""
    return montage([to_rgba(p, cmap, vmin, vmax) for p in _planes(volume, panels, box, mask)])


def _colour_fa_row(fa, evec, panels, box):
    """Montage of colour FA computed on the displayed slices only."""
    planes = []
    for fa_plane, axis_idx in zip(_planes(fa, panels, box), panels):
        (ev_plane,) = _planes(evec, [axis_idx], box)
        rgb = colour_fa(fa_plane, ev_plane)
        planes.append(np.concatenate([rgb, np.ones(rgb.shape[:2] + (1,), np.float32)], axis=-1))
    return montage(planes)


@dataclass
class _Bar:
    first_row: int
    last_row: int
    cmap: str
    vmin: float
    vmax: float
    label: str


def mosaic_figure(
    rows: Sequence[tuple[str, np.ndarray]],
    titles: Sequence[tuple[float, str]] = (),
    bars: Sequence[_Bar] = (),
    max_width_px: int = 1080,
) -> Figure:
    """Figure of stacked RGBA strips with row labels, column titles and colour bars.

    The strips are placed as raw pixels (``Figure.figimage``, magnified by an
    integer factor with ``np.repeat``) and the colour bars are drawn as
    gradient images with text ticks: no axes at all. Creating and drawing a
    matplotlib axes costs tens of milliseconds and a mosaic has dozens of
    panels; this keeps a figure well under a second.

    Parameters
    ----------
    rows : sequence of (label, strip)
        Strips of equal width, from :func:`montage`, RGBA floats in [0, 1].
    titles : sequence of (x, text)
        Titles above the first row at strip column ``x``.
    bars : sequence of _Bar
        Colour bars, each beside a range of rows.
    max_width_px : int
        Width of a strip in the PNG: small volumes are magnified by an
        integer factor (1-8) to approach it, wider strips reduced to it.
    """
    width = rows[0][1].shape[1]
    zoom = float(np.clip(max_width_px // width, 1, 8)) if width <= max_width_px else max_width_px / width
    strips = [_zoom(strip, zoom) for _, strip in rows]
    label_px, bar_px, gap_px = 110, (120 if bars else 10), 4
    top_px = 20 if titles else 4
    heights = [strip.shape[0] for strip in strips]
    strip_w = strips[0].shape[1]
    fig_w = label_px + strip_w + bar_px
    fig_h = top_px + sum(heights) + gap_px * len(rows)
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, facecolor="white")
    tops = []
    y_top = top_px
    for (label, _), pixels, h in zip(rows, strips, heights):
        fig.figimage(pixels, xo=label_px, yo=fig_h - y_top - h, origin="upper")
        fig.text((label_px - 8) / fig_w, 1 - (y_top + h / 2) / fig_h, label, ha="right",
                 va="center", fontsize=9)
        tops.append(y_top)
        y_top += h + gap_px
    for x, text in titles:
        fig.text((label_px + (x + 0.5) * zoom) / fig_w, 1 - (top_px - 3) / fig_h, text,
                 ha="center", va="bottom", fontsize=8)
    for bar in bars:
        top = tops[bar.first_row] + 6
        bottom = tops[bar.last_row] + heights[bar.last_row] - 6
        _draw_bar(fig, bar, x_px=label_px + strip_w + 14, top_px=top,
                  height_px=max(bottom - top, 20), fig_w=fig_w, fig_h=fig_h)
    return fig


def _zoom(strip: np.ndarray, zoom: float) -> np.ndarray:
    """uint8 RGBA strip magnified by an integer factor (crisp voxels) or reduced (box filter)."""
    pixels = _to_uint8(strip)
    if zoom >= 1:
        z = int(zoom)
        return np.repeat(np.repeat(pixels, z, axis=0), z, axis=1)
    size = (max(1, round(pixels.shape[1] * zoom)), max(1, round(pixels.shape[0] * zoom)))
    return np.asarray(Image.fromarray(pixels, "RGBA").resize(size, Image.Resampling.BOX))


def _to_uint8(rgba: np.ndarray) -> np.ndarray:
    return np.round(np.clip(rgba, 0, 1) * 255).astype(np.uint8)


def _draw_bar(fig: Figure, bar: _Bar, x_px: int, top_px: int, height_px: int, fig_w: int,
              fig_h: int) -> None:
    """Vertical colour bar as a gradient image, three tick labels and a title."""
    levels = np.linspace(1.0, 0.0, height_px)[:, None] * np.ones((1, 12))
    gradient = _to_uint8(colormap(bar.cmap)(levels))
    fig.figimage(gradient, xo=x_px, yo=fig_h - top_px - height_px, origin="upper")
    for frac, value in zip((0.0, 0.5, 1.0), (bar.vmax, (bar.vmin + bar.vmax) / 2, bar.vmin)):
        fig.text((x_px + 16) / fig_w, 1 - (top_px + frac * (height_px - 1)) / fig_h,
                 f"{value:.3g}", ha="left", va="center", fontsize=7)
    fig.text((x_px + 78) / fig_w, 1 - (top_px + height_px / 2) / fig_h, bar.label,
             ha="center", va="center", rotation=90, fontsize=8)


def _titles(panels, centres) -> list[tuple[float, str]]:
    return [(c, f"{VIEW_NAMES[axis]} {idx}") for (axis, idx), c in zip(panels, centres)]


def _check_same_shape(**volumes):
    shapes = {name: np.shape(v) for name, v in volumes.items() if v is not None}
    first = next(iter(shapes.values()))
    if any(len(s) < 3 or s[:3] != first[:3] for s in shapes.values()):
        raise ValueError("volumes are on different grids: "
                         + ", ".join(f"{k} {v}" for k, v in shapes.items()))


def _layout(mask, slices):
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D, got shape {mask.shape}")
    slices = slices or select_slices(mask)
    return mask, _slice_panels(slices), bounding_box(mask, margin=2)


# --------------------------------------------------------------------------
# participant figures
# --------------------------------------------------------------------------
def rish_mosaic(
    source: np.ndarray,
    predicted: np.ndarray,
    scale: np.ndarray,
    mask: np.ndarray,
    order: int,
    slices: Mapping[int, Sequence[int]] | None = None,
) -> Figure:
    """Mosaic of one RISH order: source 3T, predicted 7T-like and lambda_l.

    Parameters
    ----------
    source, predicted : ndarray, shape (X, Y, Z)
        RISH_l of the 3T input and of the prediction (paper Eq. 1), same grid.
        Shown with one shared grey scale (1st-99th percentile in the mask).
    scale : ndarray, shape (X, Y, Z)
        Scale map lambda_l = sqrt(RISH_l^7T / (RISH_l^3T + tau)) (paper Eq. 2);
        diverging colour map centred at 1 (red > 1, blue < 1), masked.
    mask : ndarray of bool, shape (X, Y, Z)
        Brain mask (selects slices, crops, and ranges).
    order : int
        SH order l, for the labels.
    slices : dict, optional
        ``{axis: [indices]}``; :func:`select_slices` of the mask when None.

    Returns
    -------
    matplotlib.figure.Figure
    """
    _check_same_shape(source=source, predicted=predicted, scale=scale, mask=mask)
    mask, panels, box = _layout(mask, slices)
    vmin, vmax = robust_range([source, predicted], mask)
    smin, smax = centred_range(scale, 1.0, mask)
    strip_s, centres = _row(source, panels, box, cmap=CMAP_INTENSITY, vmin=vmin, vmax=vmax)
    strip_p, _ = _row(predicted, panels, box, cmap=CMAP_INTENSITY, vmin=vmin, vmax=vmax)
    strip_l, _ = _row(scale, panels, box, cmap=CMAP_SCALE, vmin=smin, vmax=smax, mask=mask)
    rows = [("3T source", strip_s), ("7T-like\npredicted", strip_p), (f"scale λ{order}", strip_l)]
    bars = [_Bar(0, 1, CMAP_INTENSITY, vmin, vmax, f"RISH L{order}"),
            _Bar(2, 2, CMAP_SCALE, smin, smax, f"λ{order}")]
    return mosaic_figure(rows, _titles(panels, centres), bars)


def colour_fa(fa: np.ndarray, evec: np.ndarray) -> np.ndarray:
    """Directionally encoded colour FA: RGB = FA * |e1|.

    Parameters
    ----------
    fa : ndarray, shape (X, Y, Z)
        Fractional anisotropy in [0, 1].
    evec : ndarray, shape (X, Y, Z, 3)
        Principal eigenvector (unit norm) in voxel axes.

    Returns
    -------
    ndarray, shape (X, Y, Z, 3), float32 in [0, 1]
        Red = x (left-right), green = y (anterior-posterior), blue = z.
    """
    fa = np.nan_to_num(np.clip(np.asarray(fa, np.float32), 0, 1))
    evec = np.nan_to_num(np.asarray(evec, np.float32))
    if evec.shape != fa.shape + (3,):
        raise ValueError(f"evec shape {evec.shape} does not match FA shape {fa.shape} + (3,)")
    return np.clip(np.abs(evec) * fa[..., None], 0, 1)


def fa_figure(
    fa_in: np.ndarray,
    fa_out: np.ndarray,
    evec_in: np.ndarray | None,
    evec_out: np.ndarray | None,
    mask: np.ndarray,
    slices: Mapping[int, Sequence[int]] | None = None,
) -> Figure:
    """FA and colour FA of input and output, and the difference FA_out - FA_in.

    Parameters
    ----------
    fa_in, fa_out : ndarray, shape (X, Y, Z)
        FA of the 3T input and of the 7T-like output on the same grid
        (voxels never fitted may be NaN, shown black).
    evec_in, evec_out : ndarray, shape (X, Y, Z, 3), or None
        Principal eigenvectors; the colour-FA rows are left out when None.
    mask : ndarray of bool, shape (X, Y, Z)
    slices : dict, optional
        ``{axis: [indices]}``.

    Returns
    -------
    matplotlib.figure.Figure
        Rows: FA in, FA out, difference (diverging, centred at 0, masked),
        then colour FA in and out when the eigenvectors are given.
    """
    _check_same_shape(fa_in=fa_in, fa_out=fa_out, evec_in=evec_in, evec_out=evec_out, mask=mask)
    mask, panels, box = _layout(mask, slices)
    fa_in = np.asarray(fa_in, np.float32)
    fa_out = np.asarray(fa_out, np.float32)
    diff = fa_out - fa_in
    dmin, dmax = centred_range(diff, 0.0, mask & np.isfinite(diff), min_half_width=0.02)
    strip_in, centres = _row(fa_in, panels, box, cmap=CMAP_INTENSITY, vmin=0, vmax=1)
    rows = [("FA 3T in", strip_in),
            ("FA 7T-like out", _row(fa_out, panels, box, cmap=CMAP_INTENSITY, vmin=0, vmax=1)[0]),
            ("FA out − in", _row(diff, panels, box, cmap=CMAP_DIFFERENCE, vmin=dmin, vmax=dmax,
                                 mask=mask)[0])]
    if evec_in is not None and evec_out is not None:
        rows.append(("colour FA in", _colour_fa_row(fa_in, evec_in, panels, box)[0]))
        rows.append(("colour FA out", _colour_fa_row(fa_out, evec_out, panels, box)[0]))
    bars = [_Bar(0, 1, CMAP_INTENSITY, 0.0, 1.0, "FA"),
            _Bar(2, 2, CMAP_DIFFERENCE, dmin, dmax, "ΔFA")]
    return mosaic_figure(rows, _titles(panels, centres), bars)


def mask_overlay_figure(
    mean_b0: np.ndarray, mask: np.ndarray, slices: Mapping[int, Sequence[int]] | None = None
) -> Figure:
    """Brain mask outline (and a light fill) over the mean b0 image.

    Parameters
    ----------
    mean_b0 : ndarray, shape (X, Y, Z)
        Mean of the b0 volumes (any unit).
    mask : ndarray of bool, shape (X, Y, Z)

    Returns
    -------
    matplotlib.figure.Figure
        One row; the view is not cropped, so a mask cutting off brain shows.
    """
    _check_same_shape(mean_b0=mean_b0, mask=mask)
    mask, panels, _ = _layout(mask, slices)
    vmin, vmax = robust_range([mean_b0], None, percentiles=(0.5, 99.5))
    planes = []
    for axis, idx in panels:
        rgba = to_rgba(take_slice(np.asarray(mean_b0, np.float32), axis, idx), CMAP_INTENSITY,
                       vmin, vmax)
        inside = take_slice(mask, axis, idx)
        edge = inside & ~ndimage.binary_erosion(inside)
        rgba[inside, :3] = 0.92 * rgba[inside, :3] + 0.08 * np.array(MASK_COLOUR)
        rgba[edge, :3] = MASK_COLOUR
        planes.append(rgba)
    strip, centres = montage(planes)
    return mosaic_figure([("mean b0\n+ mask", strip)], _titles(panels, centres))


def uncertainty_figure(
    std: np.ndarray,
    mask: np.ndarray,
    orders: Sequence[int] = (0, 2, 4),
    slices: Mapping[int, Sequence[int]] | None = None,
) -> Figure:
    """Per-voxel standard deviation over the model's samples, per RISH order.

    Parameters
    ----------
    std : ndarray, shape (X, Y, Z) or (X, Y, Z, n_orders)
        Standard deviation of the predicted RISH_l over ``--num-samples``
        samples (same unit as RISH_l).
    mask : ndarray of bool, shape (X, Y, Z)
    orders : sequence of int
        SH orders on the last axis, for the labels.

    Returns
    -------
    matplotlib.figure.Figure
        One row per order, sequential colour map, 0 to the 99th percentile.
    """
    std = np.asarray(std, np.float32)
    if std.ndim == 3:
        std = std[..., None]
    _check_same_shape(std=std, mask=mask)
    mask, panels, box = _layout(mask, slices)
    rows, bars, centres = [], [], []
    for i in range(std.shape[-1]):
        order = orders[i] if i < len(orders) else i
        _, vmax = robust_range([std[..., i]], mask, percentiles=(0, 99))
        vmax = max(vmax, 1e-12)
        strip, centres = _row(std[..., i], panels, box, cmap=CMAP_UNCERTAINTY, vmin=0.0,
                              vmax=vmax, mask=mask)
        rows.append((f"sd RISH L{order}", strip))
        bars.append(_Bar(i, i, CMAP_UNCERTAINTY, 0.0, vmax, f"sd L{order}"))
    return mosaic_figure(rows, _titles(panels, centres), bars)


__all__ = [
    "bounding_box",
    "centred_range",
    "colour_fa",
    "fa_figure",
    "mask_overlay_figure",
    "montage",
    "mosaic_figure",
    "rish_mosaic",
    "robust_range",
    "select_slices",
    "take_slice",
    "to_png",
    "to_rgba",
    "uncertainty_figure",
]
