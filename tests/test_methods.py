"""Method registry: identity, rish-global (model file, checksum, fitting with known answers), ldm slot."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from bids_dmri_ldm import methods
from bids_dmri_ldm.bundles import MODELS_ENV, resolve_model_dir
from bids_dmri_ldm.core.resample import output_grid
from bids_dmri_ldm.methods import (
    LOADERS,
    Method,
    MethodError,
    ModelNotFoundError,
    RishGlobalModel,
    load_method,
    load_rish_global_model,
    save_rish_global_model,
)
from bids_dmri_ldm.ml.rish_global import RishPair, fit_rish_global, pair_scale_samples

RNG = np.random.default_rng(7)


def _rish(shape=(6, 5, 4)):
    return RNG.uniform(0.1, 2.0, shape + (3,)).astype(np.float32)


def test_every_method_has_a_loader():
    assert set(LOADERS) == set(Method)
    assert [m.value for m in Method] == ["identity", "rish-global", "ldm", "cnn"]


def test_identity_scale_is_one():
    rish, mask = _rish(), np.ones((6, 5, 4), bool)
    pred = load_method("identity").predict_scale_maps(rish, mask, np.eye(4))
    np.testing.assert_array_equal(pred.scale, 1.0)
    assert pred.scale.dtype == np.float32 and pred.scale.shape == rish.shape
    assert pred.provenance["Method"] == "identity" and pred.provenance["Model"] is None


def test_identity_rejects_bad_shapes():
    with pytest.raises(ValueError, match="RISH maps"):
        load_method("identity").predict_scale_maps(np.ones((4, 4, 4, 2)), np.ones((4, 4, 4), bool), np.eye(4))
    with pytest.raises(ValueError, match="mask shape"):
        load_method("identity").predict_scale_maps(np.ones((4, 4, 4, 3)), np.ones((4, 4, 3), bool), np.eye(4))


def test_rish_global_roundtrip_and_apply(tmp_path):
    model = RishGlobalModel(factors=(0.9, 0.8, 0.7), training={"n_pairs": 1}, shell=1000.0, sh_order_max=4)
    save_rish_global_model(model, tmp_path / "m")
    loaded = load_rish_global_model(tmp_path / "m")
    assert loaded.factors == (0.9, 0.8, 0.7) and loaded.orders == (0, 2, 4)
    # the model's SHA-256 is that of its checksum list, which covers every file of the model
    assert loaded.sha256 == methods.sha256_file(tmp_path / "m" / "SHA256SUMS")
    assert loaded.trained_for == {"shells": [1000.0], "sh_order_max": 4, "rish_orders": [0, 2, 4],
                                  "signal_normalisation": "S/S0"}
    rish = _rish()
    mask = np.zeros((6, 5, 4), bool)
    mask[1:4, 1:4, 1:3] = True
    pred = load_method("rish-global", tmp_path / "m").predict_scale_maps(rish, mask, np.eye(4))
    np.testing.assert_allclose(pred.scale[mask], np.broadcast_to([0.9, 0.8, 0.7], (mask.sum(), 3)), rtol=1e-6)
    np.testing.assert_array_equal(pred.scale[~mask], 1.0)
    assert pred.provenance["Model"] == {"Name": "rish-global", "Version": "1", "SHA256": loaded.sha256}


def test_rish_global_checksum_and_content_checked(tmp_path):
    model_file = save_rish_global_model(RishGlobalModel(factors=(1.0, 1.0, 1.0)), tmp_path)
    doc = json.loads(model_file.read_text())
    doc["factors"] = [1.1, 1.0, 1.0]
    model_file.write_text(json.dumps(doc))
    with pytest.raises(MethodError, match="checksum mismatch"):
        load_rish_global_model(tmp_path)
    (tmp_path / "SHA256SUMS").unlink()
    with pytest.raises(MethodError, match="SHA256SUMS"):
        load_rish_global_model(tmp_path)
    with pytest.raises(MethodError, match="no rish-global model"):
        load_rish_global_model(tmp_path / "missing")
    bad = save_rish_global_model(RishGlobalModel(factors=(1.0, -1.0, 1.0)), tmp_path / "neg")
    assert bad.is_file()
    with pytest.raises(MethodError, match="positive finite"):
        load_rish_global_model(tmp_path / "neg")


def test_ldm_and_unknown_methods(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no ldm model bundle"):
        load_method("ldm", tmp_path)  # a folder without a bundle
    with pytest.raises(MethodError, match="unknown method 'gan'"):
        load_method("gan")


def test_resolve_model_dir(tmp_path, monkeypatch):
    (tmp_path / "rish-global").mkdir()
    assert resolve_model_dir("rish-global", tmp_path) == tmp_path / "rish-global"  # a folder of models
    assert resolve_model_dir("rish-global", tmp_path / "rish-global") == tmp_path / "rish-global"
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    (tmp_path / "rish-global" / "rish_global.json").write_text("{}")
    assert resolve_model_dir(Method.RISH_GLOBAL, None) == tmp_path / "rish-global"  # searched first


def test_shipped_default_model_loads(monkeypatch):
    monkeypatch.delenv(MODELS_ENV, raising=False)
    model = load_rish_global_model(resolve_model_dir("rish-global", None))
    assert len(model.factors) == 3 and all(0.5 < f < 1.5 for f in model.factors)
    assert model.training["n_pairs"] >= 2


def test_shipped_ldm_bundle_loads_and_translates(monkeypatch):
    """models/demo: checksums verify, the config is a valid bundle, and a translation of a
    smooth synthetic brain gives finite, positive scale maps near 1 (the demo model was trained
    on simulated 3T/7T pairs whose RISH ratios are 0.7-1.0)."""
    monkeypatch.delenv(MODELS_ENV, raising=False)
    method = load_method("ldm", None, {"seed": 0, "ddim_steps": 5})
    assert method.bundle.config["training_data"]["n_paired"] >= 2
    shape = (30, 36, 30)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = sum(g ** 2 for g in grids) < 0.8
    wave = 1 + 0.2 * np.sin(3 * grids[0]) * np.cos(2 * grids[1])
    rish = np.stack([1.9 * wave, 0.04 * wave, 0.004 * wave], -1)  # typical simulated 3T values
    rish = rish.astype(np.float32) * mask[..., None]
    out = method.predict_scale_maps(rish, mask, np.diag([5.0, 5.0, 5.0, 1.0]))
    assert out.scale.shape == rish.shape and np.isfinite(out.scale).all()
    assert np.all(out.scale[~mask] == 1.0)
    assert 0.3 < np.median(out.scale[mask][:, 0]) < 3.0


def _linear_field(world: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Smooth positive RISH-like field: base_l * (1 + 0.01 * (x + 2y - z)) in world mm."""
    ramp = 1.0 + 0.01 * (world[..., 0] + 2 * world[..., 1] - world[..., 2])
    return (ramp[..., None] * base).astype(np.float32)


def _world(affine, shape):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def test_fit_rish_global_known_factors_across_grids():
    """3T on a 2.5 mm oblique grid, 7T on the 1.05 mm grid of the same field of view, 7T RISH =
    k_l^2 x 3T RISH at every world position: the fitted factors are k_l."""
    k = np.array([0.92, 0.81, 0.73])
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    aff_3t = np.eye(4)
    aff_3t[:3, :3] = rot @ np.diag([-2.5, 2.5, 2.5])
    aff_3t[:3, 3] = [20.0, -10.0, 5.0]
    shape_3t = (14, 12, 10)
    aff_7t, shape_7t = output_grid(aff_3t, shape_3t, 1.05)
    base = np.array([1.2, 0.3, 0.05])
    rish_3t = _linear_field(_world(aff_3t, shape_3t), base)
    rish_7t = _linear_field(_world(aff_7t, shape_7t), base * k**2)
    mask_3t = np.zeros(shape_3t, bool)
    mask_3t[3:-3, 3:-3, 3:-3] = True  # away from the edges (spline boundary)
    mask_7t = np.ones(shape_7t, bool)
    pair = RishPair(rish_3t, mask_3t, aff_3t, rish_7t, mask_7t, aff_7t, label="p1")
    lam = pair_scale_samples(pair)
    assert lam.shape[0] > 100
    np.testing.assert_allclose(np.median(lam, axis=0), k, rtol=1e-3)
    # A second pair of another head size (RISH x 1.5) pooled with the first: still k.
    model = fit_rish_global([pair, RishPair(1.5 * rish_3t, mask_3t, aff_3t, 1.5 * rish_7t, mask_7t, aff_7t, label="p2")])
    np.testing.assert_allclose(model.factors, k, rtol=2e-3)
    np.testing.assert_allclose(model.training["pairs"][1]["factors"], k, rtol=2e-3)
    assert model.training["n_pairs"] == 2 and [p["label"] for p in model.training["pairs"]] == ["p1", "p2"]


def test_pair_samples_skip_background_and_undefined_orders():
    shape = (6, 6, 6)
    rish_s = np.zeros(shape + (3,), np.float32)
    rish_t = np.zeros(shape + (3,), np.float32)
    rish_s[1:5, 1:5, 1:5] = [1.0, 0.2, 0.0]  # isotropic: no order-4 content
    rish_t[1:5, 1:5, 1:5] = [0.81, 0.2 * 0.64, 1e-9]
    mask = np.ones(shape, bool)
    lam = pair_scale_samples(RishPair(rish_s, mask, np.eye(4), rish_t, mask, np.eye(4)))
    assert lam.shape == (64, 3)  # background (RISH_0 = 0) left out
    np.testing.assert_allclose(lam[:, :2], np.broadcast_to([0.9, 0.8], (64, 2)), rtol=1e-5)
    assert np.all(np.isnan(lam[:, 2]))
    with pytest.raises(ValueError, match="no brain voxel"):
        fit_rish_global([RishPair(rish_s, mask, np.eye(4), rish_t, mask, np.eye(4))])


def test_fit_needs_pairs():
    with pytest.raises(ValueError, match="at least one"):
        fit_rish_global([])


@pytest.mark.parametrize("missing", ["torch", "monai"])
def test_a_learned_method_without_its_libraries_is_unavailable(monkeypatch, missing):
    """Inspecting the ldm's model looks PyTorch and MONAI up without importing them; either one
    missing is a one-line MethodUnavailableError naming it."""
    from bids_dmri_ldm.errors import MethodUnavailableError
    from bids_dmri_ldm.methods.registry import inspect_model

    assert inspect_model("ldm", None, {"device": "cpu"}).name  # installed: the shipped bundle
    monkeypatch.setitem(sys.modules, missing, None)  # what an installation without it looks like
    with pytest.raises(MethodUnavailableError, match=f"needs PyTorch and MONAI: no module named '{missing}'"):
        inspect_model("ldm", None, {"device": "cpu"})


def test_rish_global_factor_is_the_ratio_of_brain_means():
    """Many weak voxels (grey-matter-like, small RISH_2, lambda 0.5) and fewer strong ones
    (white-matter-like, lambda 0.9): the factor is sqrt(sum 7T / sum 3T), which the strong
    voxels dominate, not the median of the voxel-wise lambda (0.5)."""
    n_weak, n_strong = 700, 300
    source = np.concatenate([np.full((n_weak, 3), [1.0, 0.01, 0.001]), np.full((n_strong, 3), [1.0, 0.3, 0.05])])
    lam_true = np.concatenate([np.full((n_weak, 3), [0.95, 0.5, 0.5]), np.full((n_strong, 3), [0.95, 0.9, 0.8])])
    target = source * lam_true**2
    pair = RishPair(source.reshape(10, 10, 10, 3), np.ones((10, 10, 10), bool), np.eye(4),
                    target.reshape(10, 10, 10, 3), np.ones((10, 10, 10), bool), np.eye(4), label="p")
    model = fit_rish_global([pair])
    expected = np.sqrt(target.sum(0) / source.sum(0))
    np.testing.assert_allclose(model.factors, expected, rtol=1e-5)
    assert model.factors[1] > 0.85  # set by the strong voxels (0.9); the median would give 0.5
    np.testing.assert_allclose(model.training["quartiles"]["median"], [0.95, 0.5, 0.5], rtol=1e-5)
    assert "ratio of brain means" in model.training["statistic"]


def test_rish_global_ratio_counts_voxels_without_order_content_and_pools_pairs():
    """Voxels where the 3T has no order-4 content (lambda_4 undefined, e.g. isotropic) still add
    their 7T RISH_4 to the brain mean; two pairs pool their voxels, not their factors."""
    rng = np.random.default_rng(3)
    shape = (20, 10, 10)
    mask = np.ones(shape, bool)
    pairs, sources, targets = [], [], []
    for level in (1.0, 2.0):
        source = rng.uniform(0.5, 1.5, shape + (3,)) * [1.0, 0.2, 0.05] * level
        target = source * rng.normal([0.94, 0.9, 0.85], 0.03, shape + (3,)) ** 2
        source[:2, ..., 2] = 0.0
        pairs.append(RishPair(source, mask, np.eye(4), target, mask, np.eye(4)))
        sources.append(source.reshape(-1, 3))
        targets.append(target.reshape(-1, 3))
    model = fit_rish_global(pairs)
    expected = np.sqrt(np.concatenate(targets).sum(0) / np.concatenate(sources).sum(0))
    np.testing.assert_allclose(model.factors, expected, rtol=1e-5)
    assert model.training["n_defined"][2] == 2 * (2000 - 200)
