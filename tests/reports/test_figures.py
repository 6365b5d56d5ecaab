"""Pure figure functions on small arrays with known answers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bids_dmri_ldm.reports import figures, training_figures


def _ball(shape=(16, 18, 14), radius=5.0):
    idx = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1)[:, None, None, None] / 2
    return np.sqrt(((idx - centre) ** 2).sum(0)) <= radius


def test_select_slices_lie_inside_the_mask_extent():
    mask = np.zeros((20, 20, 20), bool)
    mask[5:15, 8:12, 2:18] = True
    slices = figures.select_slices(mask, n_per_view=3)
    assert slices[0] == [7, 10, 12]
    assert all(8 <= i < 12 for i in slices[1])
    assert slices[2] == [6, 10, 14]


def test_bounding_box_of_empty_mask_is_whole_volume():
    assert figures.bounding_box(np.zeros((4, 5, 6))) == (slice(0, 4), slice(0, 5), slice(0, 6))


def test_centred_range_is_symmetric_about_the_centre():
    lam = np.full((6, 6, 6), 1.0)
    lam[0] = 1.3
    lam[1] = 0.9
    vmin, vmax = figures.centred_range(lam, 1.0, percentile=100)
    assert vmin == pytest.approx(0.7) and vmax == pytest.approx(1.3)
    # a map equal to its centre keeps a minimum half width instead of a zero range
    assert figures.centred_range(np.ones((3, 3, 3)), 1.0) == (0.95, 1.05)


def test_colour_fa_maps_direction_to_rgb():
    fa = np.array([[[0.5, 1.0]]])
    evec = np.zeros((1, 1, 2, 3))
    evec[0, 0, 0] = [0, -1, 0]  # anterior-posterior -> green, sign ignored
    evec[0, 0, 1] = [0, 0, 1]   # superior-inferior -> blue
    rgb = figures.colour_fa(fa, evec)
    np.testing.assert_allclose(rgb[0, 0, 0], [0, 0.5, 0])
    np.testing.assert_allclose(rgb[0, 0, 1], [0, 0, 1])


def test_take_slice_gives_neurological_view():
    vol = np.zeros((4, 5, 3))
    vol[3, 4, 1] = 1  # right (x max), anterior (y max)
    plane = figures.take_slice(vol, 2, 1)
    assert plane.shape == (5, 4)
    assert plane[0, -1] == 1  # top right: anterior on top, right on the right


def test_rish_mosaic_renders_png_with_diverging_scale():
    mask = _ball()
    rng = np.random.default_rng(0)
    source = rng.uniform(1, 2, mask.shape) * mask
    lam = np.where(mask, 0.8, 1.0)
    png = figures.to_png(figures.rish_mosaic(source, source * lam**2, lam, mask, 2))
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size[0] > 600
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    # lambda < 1 inside the brain is drawn blue by the diverging map (centred at 1)
    blue = pixels[:, 2] > pixels[:, 0] + 50
    red = pixels[:, 0] > pixels[:, 2] + 50
    assert blue.sum() > 10 * red.sum()  # red only in the colour bar


def test_figures_refuse_volumes_on_different_grids():
    mask = _ball()
    with pytest.raises(ValueError, match="different grids"):
        figures.rish_mosaic(np.ones(mask.shape), np.ones((3, 3, 3)), np.ones(mask.shape), mask, 0)


def test_fa_mask_and_uncertainty_figures_render():
    mask = _ball()
    fa = np.where(mask, 0.6, np.nan)
    evec = np.zeros(mask.shape + (3,))
    evec[..., 0] = 1
    for fig in (figures.fa_figure(fa, fa * 0.9, evec, evec, mask),
                figures.mask_overlay_figure(mask * 100.0, mask),
                figures.uncertainty_figure(np.stack([mask * 0.1] * 3, -1), mask)):
        assert figures.to_png(fig).startswith(b"\x89PNG")


def test_training_figures_render():
    epochs = np.arange(5)
    curves = {"vqvae3t": {"epoch": epochs, "train_loss": 1 / (epochs + 1)},
              "ldm": {"epoch": epochs, "train_loss": np.linspace(1, 0.5, 5)}}
    assert figures.to_png(training_figures.loss_curves_figure(curves)).startswith(b"\x89PNG")
    metrics = {"epoch": epochs, "nmse_l0": np.linspace(0.3, 0.1, 5)}
    assert figures.to_png(training_figures.metrics_figure(metrics)).startswith(b"\x89PNG")
    vol = np.random.default_rng(1).uniform(size=(8, 8, 6, 3))
    fig = training_figures.reconstruction_figure([{"label": "sub-09", "source": vol, "prediction": vol,
                                          "target": vol}])
    assert figures.to_png(fig).startswith(b"\x89PNG")
    with pytest.raises(ValueError):
        training_figures.loss_curves_figure({})
