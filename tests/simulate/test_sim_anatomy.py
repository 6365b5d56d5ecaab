"""MNI152 templates, subject deformation, jitter and the separable partial-volume averages."""
import numpy as np
import pytest

from bids_dmri_ldm.simulate import anatomy


def _template_value(world):
    templates = anatomy.load_templates()
    index = np.rint(np.linalg.inv(templates.affine) @ np.r_[world, 1.0])[:3].astype(int)
    return np.array([c[tuple(index)] for c in templates.channels])


def test_templates_come_from_the_nilearn_wheel_and_are_fractions():
    templates = anatomy.load_templates()
    assert anatomy.nilearn_template_dir().endswith("datasets/data")
    wm, gm, csf = templates.channels
    total = wm + gm + csf
    assert wm.min() >= 0 and gm.min() >= 0 and csf.min() >= 0
    assert total.max() <= 1.0 + 1e-6
    assert 1.5e6 < np.sum(total) < 2.2e6  # about 1.9 litres of brain at 1 mm
    assert _template_value([6.0, 0.0, 20.0])[2] > 0.8  # lateral ventricle: CSF
    assert _template_value([25.0, -10.0, 30.0])[0] > 0.9  # centrum semiovale: WM


def test_linear_interpolation_and_box_average_reproduce_linear_functions():
    lattice = np.arange(-10.0, 10.5, 1.0)
    targets = np.array([-9.3, 0.0, 4.75])
    np.testing.assert_allclose(anatomy.linear_interpolation_matrix(lattice, targets) @ (2 * lattice + 1), 2 * targets + 1)
    lower, upper = np.array([-5.0, 0.2]), np.array([-3.0, 3.7])
    weights = anatomy.box_average_matrix(lattice, lower, upper)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(weights @ lattice, (lower + upper) / 2, atol=1e-12)


def test_box_average_of_a_step_is_its_covered_fraction():
    lattice = np.arange(0.0, 20.0, 0.25)
    step = (lattice >= 10.0).astype(float)  # linear interpolant ramps over [9.75, 10]
    weights = anatomy.box_average_matrix(lattice, np.array([8.0]), np.array([12.0]), n_quadrature=400)
    assert (weights @ step)[0] == pytest.approx((2.0 + 0.125) / 4.0, abs=2e-3)


def test_subjects_are_reproducible_and_differ():
    a, b, c = anatomy.random_subject(3), anatomy.random_subject(3), anatomy.random_subject(4)
    np.testing.assert_array_equal(a.coarse_fields, b.coarse_fields)
    np.testing.assert_array_equal(a.linear, b.linear)
    assert not np.allclose(a.coarse_fields, c.coarse_fields)
    assert np.allclose(a.linear, np.eye(3), atol=0.25)
    rms = np.sqrt(np.mean(a.coarse_fields[..., :3] ** 2))
    assert 1.5 < rms < 4.0


def test_jitter_keeps_fractions_valid():
    rng = np.random.default_rng(0)
    tissue = rng.dirichlet([1, 1, 1], size=1000).astype(np.float32) * rng.uniform(0, 1, (1000, 1)).astype(np.float32)
    jittered = anatomy.jitter_tissue(tissue, rng.normal(0, 0.3, (1000, 2)))
    assert jittered.min() >= 0
    np.testing.assert_allclose(jittered.sum(axis=1), tissue.sum(axis=1), atol=1e-5)


def test_subject_lattice_keeps_tissue_volumes_plausible():
    lattice = anatomy.subject_tissue_lattice(anatomy.random_subject(1), spacing_mm=2.0)
    volumes = lattice.tissue.sum(axis=(0, 1, 2)) * 8.0 / 1e6  # litres
    template = np.array([c.sum() for c in anatomy.load_templates().channels]) / 1e6
    np.testing.assert_allclose(volumes, template, rtol=0.25)
