"""Synthetic bundles: analytic weights/tangents and real crossings."""
import numpy as np
import pytest

from bids_dmri_ldm.simulate import fibres


def test_segment_weight_profile_and_tangent():
    bundle = fibres.Segment("t", start=(0.0, 0.0, 0.0), end=(0.0, 0.0, 40.0), radius=4.0)
    points = np.array([[0.0, 0.0, 20.0], [4.0, 0.0, 20.0], [0.0, 0.0, 48.0]], np.float32)
    weight, tangent = bundle.weight_and_tangent(points)
    np.testing.assert_allclose(weight, [1.0, np.exp(-0.5), np.exp(-2.0)], rtol=1e-5)
    np.testing.assert_allclose(tangent, np.tile([0.0, 0.0, 1.0], (3, 1)))


def test_arc_tangent_is_perpendicular_to_the_radius():
    arc = fibres.Arc("a", centre=(0.0, 0.0, 0.0), normal=(0.0, 0.0, 1.0), e1=(1.0, 0.0, 0.0),
                     arc_radius=20.0, t_start=0.0, t_end=180.0, radius=3.0)
    angles = np.radians([10.0, 90.0, 170.0])
    points = np.stack([20 * np.cos(angles), 20 * np.sin(angles), np.zeros(3)], axis=1).astype(np.float32)
    weight, tangent = arc.weight_and_tangent(points)
    np.testing.assert_allclose(weight, 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.sum(tangent * points, axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(tangent, axis=1), 1.0, rtol=1e-5)


def test_populations_sum_to_one_and_background_fills_the_rest():
    rng = np.random.default_rng(0)
    points = rng.uniform(-70, 70, (2000, 3)).astype(np.float32)
    fractions, directions = fibres.all_populations(points)
    np.testing.assert_allclose(fractions.sum(axis=1), 1.0, rtol=1e-5)
    far = fibres.all_populations(np.array([[0.0, 60.0, -60.0]], np.float32))[0]
    assert far[0, -1] == pytest.approx(1.0)
    present = fractions > 0
    np.testing.assert_allclose(np.linalg.norm(directions, axis=-1)[present], 1.0, rtol=1e-4)


def test_bundles_cross_in_the_centrum_semiovale():
    """Corpus callosum x corticospinal tract (x SLF) crossings exist, with distinct directions."""
    axes = [np.arange(15.0, 40.0, 1.0), np.arange(-30.0, -14.0, 1.0), np.arange(22.0, 45.0, 1.0)]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3).astype(np.float32)
    labels, fractions, directions = fibres.strongest_populations(*fibres.all_populations(points))
    two_way = fractions[:, 1] > 0.3
    three_way = fractions[:, 2] > 0.2
    assert two_way.sum() > 50 and three_way.sum() > 5
    names = {fibres.BUNDLE_NAMES[i] for i in np.unique(labels[two_way, :2])}
    assert {"CC", "CSTL"} <= names
    angle = np.degrees(np.arccos(np.abs(np.sum(directions[two_way, 0] * directions[two_way, 1], axis=1))))
    assert np.median(angle) > 45.0
