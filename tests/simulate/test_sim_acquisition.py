"""Protocols, gradient tables, grids and the FSL bvec convention of the simulator."""
import numpy as np
import pytest

from bids_dmri_ldm.simulate import acquisition as acq


def _min_angle_deg(directions):
    cos = np.abs(directions @ directions.T)
    np.fill_diagonal(cos, 0.0)
    return np.degrees(np.arccos(cos.max()))


@pytest.mark.parametrize(
    "protocol, n_b0, shells, n_dirs",
    [(acq.PROTOCOL_3T, 18, (1000, 2000, 3000), 90), (acq.PROTOCOL_7T, 15, (1000, 2000), 64)],
)
def test_gradient_table_is_hcp_like(protocol, n_b0, shells, n_dirs):
    bvals, dirs = protocol.gradient_table()
    assert bvals.size == n_b0 + len(shells) * n_dirs
    assert np.sum(bvals <= 50) == n_b0 and bvals[0] == acq.B0_WRITTEN
    for shell in shells:
        shell_dirs = dirs[bvals == shell]
        assert shell_dirs.shape == (n_dirs, 3)
        np.testing.assert_allclose(np.linalg.norm(shell_dirs, axis=1), 1.0, atol=1e-12)
        # Electrostatic repulsion spreads them: a random set of 90 has pairs ~2-4 degrees apart.
        assert _min_angle_deg(shell_dirs) > 12.0
    np.testing.assert_array_equal(dirs[bvals <= 50], 0.0)


def test_direction_sets_differ_between_protocols_and_shells_and_are_deterministic():
    b3, g3 = acq.PROTOCOL_3T.gradient_table()
    b7, g7 = acq.PROTOCOL_7T.gradient_table()
    d3, d7 = g3[b3 == 1000], g7[b7 == 1000]
    assert np.abs(d3[:64] @ d7.T).max(axis=1).min() < 0.999  # not the same set
    assert not np.allclose(g3[b3 == 1000], g3[b3 == 2000])
    np.testing.assert_array_equal(acq.electrostatic_directions(30, 5), acq.electrostatic_directions(30, 5))


def test_electrostatic_repulsion_beats_random_directions():
    rng = np.random.default_rng(5)
    random = rng.standard_normal((40, 3))
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    assert _min_angle_deg(acq.electrostatic_directions(40, 5)) > 2 * _min_angle_deg(random)


def test_grids_scale_and_are_las_centred():
    assert acq.PROTOCOL_3T.grid(1.0)[0] == (145, 174, 145)
    assert acq.PROTOCOL_7T.grid(1.0)[0] == (173, 207, 173)
    shape, affine = acq.PROTOCOL_3T.grid(4.0)
    assert shape == (36, 44, 36)
    np.testing.assert_allclose(np.diag(affine)[:3], [-5.0, 5.0, 5.0])
    assert np.linalg.det(affine[:3, :3]) < 0
    centre = affine @ np.r_[(np.array(shape) - 1) / 2.0, 1.0]
    np.testing.assert_allclose(centre[:3], acq.WORLD_CENTRE_MM)


@pytest.mark.parametrize("scale", [0.0, -1.0, 0.3, float("nan"), float("inf"), 30.0])
def test_impossible_voxel_scales_are_refused(scale):
    with pytest.raises(ValueError):
        acq.check_voxel_scale(scale, (acq.PROTOCOL_3T, acq.PROTOCOL_7T))


def test_fsl_bvecs_do_not_depend_on_las_or_ras_storage():
    """FSL bvecs live in a radiological voxel frame: LAS and RAS storage give the same table."""
    g = np.array([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    np.testing.assert_allclose(acq.world_to_voxel_directions(g, las), [[-0.6, 0.0], [0.8, 0.6], [0.0, 0.8]])
    np.testing.assert_allclose(acq.world_to_voxel_directions(g, las), acq.world_to_voxel_directions(g, ras))


def test_sidecar_times_are_in_seconds():
    sidecar = acq.PROTOCOL_3T.sidecar((145, 174, 145))
    assert sidecar["EchoTime"] == pytest.approx(0.0895)
    assert sidecar["MagneticFieldStrength"] == 3.0
    assert sidecar["TotalReadoutTime"] == pytest.approx(0.00078 * 144)
    assert acq.PROTOCOL_7T.sidecar((173, 207, 173))["EchoTime"] == pytest.approx(0.0712)
