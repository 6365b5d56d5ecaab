"""Per-order normalisation (invertible) and the model-grid round trip."""
import numpy as np
import pytest
import torch

from bids_dmri_ldm.ml.data import (
    brain_crop,
    denormalised_from_model_grid,
    from_model_grid,
    resize,
    to_model_grid,
)
from bids_dmri_ldm.ml.normalise import denormalise, fit_normalisation, normalise


@pytest.mark.parametrize("method", ["sqrt-percentile", "log-percentile"])
def test_normalisation_round_trip_and_range(rish_pairs, method):
    r3, _ = rish_pairs
    vols, masks, _ = zip(*r3.values())
    norm = fit_normalisation(vols, masks, (0, 2, 4), method=method)
    assert norm["method"] == method and norm["background"] == (0.0 if method == "sqrt-percentile" else -1.0)
    rish, mask = vols[0], masks[0]
    y = normalise(rish, mask, norm)
    inside = y[mask]
    assert np.all(y[~mask] == norm["background"])
    assert inside.min() > -0.2 and inside.max() < 1.2           # ~0..1 inside the brain
    assert abs(np.median(inside[:, 0]) - np.median(inside[:, 2])) < 0.5  # orders on one scale
    back = denormalise(y, mask, norm)
    np.testing.assert_allclose(back[mask], rish[mask], rtol=1e-5, atol=1e-7)
    assert np.all(back[~mask] == 0)


@pytest.mark.parametrize("method", ["sqrt-percentile", "log-percentile"])
def test_normalisation_of_the_mask_only_equals_the_formula_on_the_whole_grid(method):
    """Computed on the mask's voxels only, the values are bit for bit those of the formula on
    every voxel (float64, then float32), background / zero elsewhere; negative RISH clipped."""
    rng = np.random.default_rng(3)
    rish = rng.uniform(-0.1, 2.0, (9, 8, 7, 3)).astype(np.float32)
    mask = rng.random((9, 8, 7)) > 0.4
    norm = fit_normalisation([np.abs(rish)], [mask], (0, 2, 4), method=method)
    r = np.clip(rish, 0, None).astype(np.float64)
    if method == "sqrt-percentile":
        expected = np.sqrt(r / np.asarray(norm["scale"]))
    else:
        eps, low, high = (np.asarray(norm[k]) for k in ("eps", "low", "high"))
        expected = (np.log(r + eps) - low) / (high - low)
    expected[~mask] = norm["background"]
    y = normalise(rish, mask, norm)
    assert y.dtype == np.float32 and np.array_equal(y, expected.astype(np.float32))
    z = rng.uniform(-0.3, 1.3, y.shape).astype(np.float32)
    z64 = z.astype(np.float64)
    if method == "sqrt-percentile":
        back = np.asarray(norm["scale"]) * np.clip(z64, 0, None) ** 2
    else:
        back = np.clip(np.exp(z64 * (high - low) + low) - eps, 0, None)
    back[~mask] = 0.0
    out = denormalise(z, mask, norm)
    assert out.dtype == np.float32 and np.array_equal(out, back.astype(np.float32))


def test_sqrt_normalisation_is_the_amplitude_and_scales_linearly():
    """y = sqrt(RISH / s): doubling RISH multiplies y by sqrt(2); s is the 99.5th percentile."""
    rng = np.random.default_rng(0)
    rish = rng.uniform(0.1, 2.0, (10, 10, 10, 3)).astype(np.float32)
    mask = np.ones((10, 10, 10), bool)
    norm = fit_normalisation([rish], [mask], (0, 2, 4), method="sqrt-percentile")
    np.testing.assert_allclose(norm["scale"], np.percentile(rish.reshape(-1, 3), 99.5, axis=0), rtol=1e-6)
    np.testing.assert_allclose(normalise(2 * rish, mask, norm), np.sqrt(2) * normalise(rish, mask, norm), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown normalisation"):
        fit_normalisation([rish], [mask], (0, 2, 4), method="zscore")


def test_normalisation_needs_brain_voxels():
    with pytest.raises(ValueError, match="no brain voxels"):
        fit_normalisation([np.ones((2, 2, 2, 3))], [np.zeros((2, 2, 2), bool)], (0, 2, 4))


def test_crop_and_resize_round_trip_of_a_smooth_volume():
    shape = (30, 26, 22)
    mask = np.zeros(shape, bool)
    mask[5:25, 4:22, 3:19] = True
    crop = brain_crop(mask, margin=2)
    assert crop.as_list() == [[3, 27], [2, 24], [1, 21]]
    g = np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij")
    vol = np.stack([np.sin(2 * g[0]) + g[1], g[2] ** 2, g[0] * g[1]], -1).astype(np.float32)
    x, mask_m, crop = to_model_grid(vol, mask, (16, 16, 16), margin=2)
    assert x.shape == (3, 1, 16, 16, 16) and mask_m.shape == (16, 16, 16)
    assert 0.3 < mask_m.float().mean() < 1.0
    back = from_model_grid(x, crop, fill=-1.0)
    assert back.shape == (*shape, 3)
    assert np.all(back[0] == -1.0)                          # outside the crop box
    inner = mask.copy()
    inner[[5, 24], :, :] = inner[:, [4, 21], :] = inner[:, :, [3, 18]] = False
    assert np.abs(back[inner] - vol[inner]).max() < 0.06    # smooth data survives down/up sampling


def test_resize_uses_area_when_shrinking():
    x = torch.zeros(1, 1, 4, 4, 4)
    x[..., ::2] = 1.0     # alternating planes: box averaging gives exactly 0.5
    np.testing.assert_allclose(resize(x, (2, 2, 2)).numpy(), 0.5)


@pytest.mark.parametrize("method", ["sqrt-percentile", "log-percentile"])
def test_slabs_give_each_masked_voxel_its_own_float64_value(monkeypatch, method):
    """Slab by slab (several slabs here), each brain voxel gets exactly the value of the formula
    applied to that voxel alone; outside the mask, background, whatever the input holds there."""
    from bids_dmri_ldm.ml import normalise as module

    rng = np.random.default_rng(3)
    mask = rng.random((9, 7, 5)) < 0.6
    rish = (rng.random((9, 7, 5, 3)) * [0.3, 0.01, 0.002]).astype(np.float32)
    rish[~mask] = np.nan
    norm = fit_normalisation([rish], [mask], (0, 2, 4), method=method)
    monkeypatch.setattr(module, "_SLAB_VOXELS", 7 * 5 * 2)  # 2 x-slices per slab: 5 slabs
    y = normalise(rish, mask, norm)
    assert np.array_equal(y[~mask], np.full((int((~mask).sum()), 3), norm["background"], np.float32))
    expected = module._normalised(np.clip(rish[mask], 0, None).astype(np.float64), norm).astype(np.float32)
    assert np.array_equal(y[mask].view(np.uint32), expected.view(np.uint32))
    back = denormalise(y, mask, norm)
    assert not back[~mask].any()
    expected_back = module._denormalised(y[mask].astype(np.float64), norm).astype(np.float32)
    assert np.array_equal(back[mask].view(np.uint32), expected_back.view(np.uint32))
    np.testing.assert_allclose(back[mask], rish[mask], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("method", ["sqrt-percentile", "log-percentile"])
def test_denormalised_from_model_grid_is_the_long_way_bit_for_bit(rish_pairs, method):
    """On the crop box only (the brain box holds the whole mask), and the long way when the box is
    another mask's; both equal denormalise(from_model_grid(...)) exactly."""
    r3, _ = rish_pairs
    vols, masks, _ = zip(*r3.values())
    norm = fit_normalisation(vols, masks, (0, 2, 4), method=method)
    rish, mask = vols[0], masks[0]
    x, _, crop = to_model_grid(normalise(rish, mask, norm), mask, (16, 16, 16), margin=2)
    x = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))  # a network's output
    long_way = denormalise(from_model_grid(x, crop, norm["background"]), mask, norm)
    short = denormalised_from_model_grid(x, crop, mask, norm)
    assert short.dtype == np.float32 and np.array_equal(short, long_way) and long_way[mask].min() >= 0
    small = np.zeros_like(mask)  # a box that leaves part of the mask outside it
    small[tuple(slice(s // 3, 2 * s // 3) for s in mask.shape)] = True
    _, _, box = to_model_grid(normalise(rish, mask, norm), mask, (16, 16, 16), margin=0, box_mask=small & mask)
    assert np.count_nonzero(mask[box.slices]) < np.count_nonzero(mask)
    np.testing.assert_array_equal(denormalised_from_model_grid(x, box, mask, norm),
                                  denormalise(from_model_grid(x, box, norm["background"]), mask, norm))
