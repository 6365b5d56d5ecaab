"""Plotting primitives shared by the report figures: arrays -> colours, strips, PNG bytes.

Display ranges (percentiles inside a mask), slices in the neurological view,
colour maps, montages of panels, and :func:`to_png`. The figures themselves
are in :mod:`bids_dmri_ldm.reports.figures` (brain slices) and
:mod:`bids_dmri_ldm.reports.training_figures` (training curves, examples); the
conventions are stated in :mod:`bids_dmri_ldm.reports.figures`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

#: Colour maps: intensities, scale maps (diverging, centred at 1) and
#: uncertainty (sequential).
CMAP_INTENSITY = "gray"
CMAP_SCALE = "RdBu_r"
CMAP_DIFFERENCE = "RdBu_r"
CMAP_UNCERTAINTY = "magma"
#: Outline / fill colour of the brain mask overlay (RGB).
MASK_COLOUR = (1.0, 0.23, 0.19)
#: Resolution of the embedded PNGs (dots per inch).
DPI = 100


def to_png(fig: Figure, dpi: int = DPI) -> bytes:
    """Render a figure on the Agg canvas and return the PNG bytes.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        Figure built by one of the functions of this module.
    dpi : int
        Dots per inch of the PNG.

    Returns
    -------
    bytes
        The PNG file content (starts with ``b"\\x89PNG"``).
    """
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    return buffer.getvalue()


# --------------------------------------------------------------------------
# slice selection and intensity ranges
# --------------------------------------------------------------------------
#: Display ranges are percentiles of at most this many voxels (an evenly
#: strided subset; exact percentiles of 2e6 HCP brain voxels cost ~0.1 s each).
MAX_RANGE_SAMPLES = 200_000


def _inside(volume: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Values in the mask (all values without one), strided to MAX_RANGE_SAMPLES, float64."""
    volume = np.asarray(volume)
    if mask is None or mask.shape != volume.shape:
        mask = np.ones(volume.shape, bool)
    mask = np.asarray(mask, bool)
    # a regular lattice (basic slicing: views, no copy of the volume) thins the voxels first
    step = max(1, int(np.ceil((mask.sum() / MAX_RANGE_SAMPLES) ** (1 / 3)))) if mask.ndim == 3 else 1
    lattice = (slice(None, None, step),) * mask.ndim
    return volume[lattice][mask[lattice]].astype(np.float64)


def robust_range(
    arrays: Sequence[np.ndarray], mask: np.ndarray | None = None, percentiles=(1.0, 99.0)
) -> tuple[float, float]:
    """Common display range of several volumes from percentiles inside a mask.

    Parameters
    ----------
    arrays : sequence of ndarray, each (X, Y, Z)
        Volumes shown with one colour scale (e.g. source and predicted RISH).
    mask : ndarray of bool, shape (X, Y, Z), optional
        Voxels used for the percentiles (all finite voxels when None).
    percentiles : (float, float)
        Lower and upper percentiles.

    Returns
    -------
    (vmin, vmax) : tuple of float
        ``vmax > vmin`` always (a constant image gets a unit-width range).
    """
    values = []
    for arr in arrays:
        sel = _inside(arr, mask)
        values.append(sel[np.isfinite(sel)])
    values = np.concatenate(values) if values else np.zeros(0)
    if values.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(values, percentiles)
    if not vmax > vmin:
        vmin, vmax = float(vmin) - 0.5, float(vmin) + 0.5
    return float(vmin), float(vmax)


def centred_range(
    volume: np.ndarray, centre: float, mask: np.ndarray | None = None, percentile: float = 99.0,
    min_half_width: float = 0.05,
) -> tuple[float, float]:
    """Display range symmetric around ``centre`` for a diverging colour map.

    Parameters
    ----------
    volume : ndarray, shape (X, Y, Z)
        Map to show (e.g. a scale map lambda_l, centre 1; a difference, centre 0).
    centre : float
        Value drawn white.
    mask : ndarray of bool, optional
        Voxels used to find the half width.
    percentile : float
        Percentile of ``|volume - centre|`` used as half width.
    min_half_width : float
        Lower bound of the half width, so that a map equal to its centre
        is not stretched to noise.

    Returns
    -------
    (vmin, vmax) : tuple of float
    """
    sel = _inside(volume, mask)
    sel = sel[np.isfinite(sel)]
    half = float(np.percentile(np.abs(sel - centre), percentile)) if sel.size else 0.0
    half = max(half, min_half_width)
    return centre - half, centre + half



def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """2D slice for display, top row first (``imshow`` default origin).

    Parameters
    ----------
    volume : ndarray, shape (X, Y, Z) or (X, Y, Z, C)
        Volume in (approximately) RAS voxel axes.
    axis, index : int
        Slicing axis (0 sagittal, 1 coronal, 2 axial) and slice index.

    Returns
    -------
    ndarray, shape (rows, cols) or (rows, cols, C)
        Neurological view: patient right on the image right, anterior
        (axial) or superior (coronal, sagittal) at the top.
    """
    where = [slice(None)] * volume.ndim
    where[axis] = index  # basic indexing: a view (np.take would copy a strided volume whole)
    return np.swapaxes(volume[tuple(where)], 0, 1)[::-1]



def colormap(name: str):
    return matplotlib.colormaps[name].with_extremes(bad="black")


def to_rgba(plane: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """Colour-map a 2D array to RGBA floats ``(rows, cols, 4)``; NaN is black."""
    norm = Normalize(vmin=vmin, vmax=vmax, clip=True)
    return colormap(cmap)(norm(np.ma.masked_invalid(plane)))


def montage(planes: Sequence[np.ndarray], gap: int = 2) -> tuple[np.ndarray, list[float]]:
    """Place RGBA panels side by side on a white strip, vertically centred.

    Parameters
    ----------
    planes : sequence of ndarray, each (rows_i, cols_i, 4)
    gap : int
        White pixels between panels.

    Returns
    -------
    strip : ndarray, shape (max rows, sum cols + gaps, 4)
    centres : list of float
        Column centre of each panel (for titles).
    """
    height = max(p.shape[0] for p in planes)
    width = sum(p.shape[1] for p in planes) + gap * (len(planes) - 1)
    strip = np.ones((height, width, 4))
    centres, x = [], 0
    for plane in planes:
        top = (height - plane.shape[0]) // 2
        strip[top: top + plane.shape[0], x: x + plane.shape[1]] = plane
        centres.append(x + (plane.shape[1] - 1) / 2)
        x += plane.shape[1] + gap
    return strip, centres



__all__ = [
    "CMAP_DIFFERENCE",
    "CMAP_INTENSITY",
    "CMAP_SCALE",
    "CMAP_UNCERTAINTY",
    "DPI",
    "MASK_COLOUR",
    "centred_range",
    "colormap",
    "montage",
    "robust_range",
    "take_slice",
    "to_png",
    "to_rgba",
]
