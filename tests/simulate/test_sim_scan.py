"""One simulated scan: SNR, Rician floor, spatial fields, ground truth consistency, bvec convention,
shared anatomy, partial volume at tissue boundaries."""
import dataclasses

import numpy as np
import pytest
from scipy.special import i0e, i1e

from bids_dmri_ldm.core.sh import SHModel, rish_features
from bids_dmri_ldm.simulate import acquisition as acq
from bids_dmri_ldm.simulate import anatomy, fields, scan
from bids_dmri_ldm.simulate import signal as sg
from bids_dmri_ldm.simulate.noise import SCANNER_GAIN, measure_b0_snr
from bids_dmri_ldm.simulate.physics import DEFAULT, build_scan_physics


def _sh_rish(attenuation, bvecs, orders=(0, 2, 4)):
    """RISH (Eq. 1) of S/S0 ``(..., N)`` by the pipeline's unregularised least-squares SH fit
    (order 4): ``rish_features(att @ F.T)`` with the fit matrix ``F`` of :class:`SHModel`."""
    model = SHModel(bvecs, sh_order_max=4)
    return rish_features(np.asarray(attenuation, np.float32) @ model.fit_matrix.T.astype(np.float32),
                         model.l_values, orders)


SCALE = 8.0


def physics(session, gradient=0.0, b1=0.0, snr=None, disorder=0.0, tract=0.0):
    """Default-preset physics with the spatial effects off unless asked for (T2/TE tests at isocentre)."""
    return build_scan_physics(DEFAULT, session, gradient_drop=gradient, b1_strength=b1, snr=snr,
                              disorder_amplitude_um2=disorder, tract_variation=tract)


FLAT_3T, FLAT_7T = physics("3T"), physics("7T")
MODEL_3T, MODEL_7T = FLAT_3T.model, FLAT_7T.model


def uniform_lattice(tissue):
    """The same tissue mixture everywhere in (and around) the field of view."""
    axes = tuple(np.arange(-140.0, 141.0, 20.0) for _ in range(3))
    values = np.broadcast_to(np.asarray(tissue, np.float32), (axes[0].size,) * 3 + (3,)).copy()
    return anatomy.TissueLattice(axes=axes, tissue=values)


def rician_mean(nu, sigma):
    x = nu**2 / (2 * sigma**2)
    return sigma * np.sqrt(np.pi / 2) * ((1 + x) * i0e(x / 2) + x * i1e(x / 2))


@pytest.fixture(scope="module")
def subject():
    return anatomy.random_subject(11)


def test_measured_b0_snr_in_white_matter_matches_the_request_at_3t(subject):
    result = scan.simulate_scan(subject, uniform_lattice([1, 0, 0]), physics("3T", snr=25.0), SCALE, noise_seed=1)
    b0 = result.dwi[..., result.bvals <= 50]
    assert b0.shape[-1] == 18
    assert measure_b0_snr(b0, result.tissue[..., 0] > 0.99) == pytest.approx(25.0, rel=0.10)


def test_7t_local_snr_follows_the_b1_pattern_not_the_intensity_gain(subject):
    """Repeated b0 volumes of pure WM: in each group of voxels (drop-out, periphery, bright centre,
    g-factor peak) the mean is S0 x gain and the pooled SD is the written noise SD (sigma0 x g),
    so the local SNR is SNR0 x gain / g, not the intensity gain alone."""
    result = scan.simulate_scan(subject, uniform_lattice([1, 0, 0]), physics("7T", b1=1.0, snr=23.0), SCALE, noise_seed=2)
    b0 = result.dwi[..., result.bvals <= 50].astype(np.float64)
    snr_factor = result.gain * result.sigma / result.noise_sd
    assert result.gain.min() < 0.6 and result.gain.max() > 1.2 and result.noise_sd.max() > 1.1 * result.sigma
    amplified = result.noise_sd > np.percentile(result.noise_sd, 90)
    groups = {"drop-out": snr_factor < 0.7, "periphery": (snr_factor >= 0.7) & (snr_factor < 1.0),
              "centre": snr_factor >= 1.05, "g-factor peak": amplified}
    s0 = SCANNER_GAIN * MODEL_7T.white_matter_b0
    for name, group in groups.items():
        assert group.sum() > 30, name
        assert b0[group].mean() == pytest.approx(s0 * result.gain[group].mean(), rel=0.01), name
        pooled_sd = np.sqrt(b0[group].var(axis=-1, ddof=1).mean())
        assert pooled_sd == pytest.approx(np.sqrt(np.mean(result.noise_sd[group] ** 2)), rel=0.05), name
    snr = b0[amplified].mean() / np.sqrt(b0[amplified].var(axis=-1, ddof=1).mean())
    assert snr < 0.92 * 23.0 * result.gain[amplified].mean()  # the g-factor costs SNR, not intensity


def test_7t_noise_floor_of_csf_l2_l4_rises_where_snr_drops(subject):
    """Isotropic CSF has no L2/L4; its noisy L2/L4 is the noise of the SH fit, E[RISH_l] =
    Var(magnitude)/S0^2 x sum over order l of the squared fit-matrix rows (Rician variance at
    the local SNR): over twice as large in the temporal/cerebellar drop-out as in the centre."""
    result = scan.simulate_scan(subject, uniform_lattice([0, 0, 1]), physics("7T", b1=1.0), SCALE, noise_seed=9)
    shell = result.bvals == 1000
    dwi = result.dwi.astype(np.float64)
    s0 = dwi[..., result.bvals <= 50].mean(axis=-1)
    fit, l_values = scan.rish_fit_matrix(acq.PROTOCOL_7T.gradient_table()[1][shell])
    measured = rish_features(((dwi[..., shell] / s0[..., None]) @ fit.T.astype(np.float64)), l_values, (0, 2, 4))
    nu = SCANNER_GAIN * result.gain * MODEL_7T.weights["csf"] * np.exp(-1000 * MODEL_7T.diffusivities.csf)
    sigma = result.noise_sd
    variance = 2 * sigma**2 + nu**2 - rician_mean(nu, sigma) ** 2
    s0_true = SCANNER_GAIN * result.gain * MODEL_7T.weights["csf"]
    snr = result.gain * result.sigma / result.noise_sd
    low, high = snr < 0.7, snr > 1.05
    assert low.sum() > 20 and high.sum() > 100
    for order, column in ((2, 1), (4, 2)):
        rows = np.sum(fit[l_values == order].astype(np.float64) ** 2)
        expected = variance / s0_true**2 * rows
        for group in (low, high):
            assert measured[..., column][group].mean() == pytest.approx(expected[group].mean(), rel=0.15)
        assert measured[..., column][low].mean() > 2 * measured[..., column][high].mean()


def test_rician_floor_is_visible_in_csf_at_3t(subject):
    lattice = uniform_lattice([0, 0, 1])
    noisy = scan.simulate_scan(subject, lattice, physics("3T", snr=25.0), SCALE, noise_seed=3)
    clean = scan.simulate_scan(subject, lattice, physics("3T", snr=25.0), SCALE, noise_seed=3, noise=False)
    nu = SCANNER_GAIN * MODEL_3T.weights["csf"] * np.exp(-1000 * MODEL_3T.diffusivities.csf)
    b1000 = noisy.bvals == 1000
    np.testing.assert_allclose(clean.dwi[..., b1000], np.rint(nu), atol=1)
    measured = noisy.dwi[..., b1000].astype(np.float64).mean()
    expected = rician_mean(nu, noisy.sigma)
    assert measured == pytest.approx(expected, rel=0.01)
    assert measured > nu + 0.5 * (expected - nu) > nu  # biased upwards by the floor
    b3000 = noisy.dwi[..., noisy.bvals == 3000].astype(np.float64).mean()
    assert b3000 == pytest.approx(noisy.sigma * np.sqrt(np.pi / 2), rel=0.03)  # pure Rayleigh floor


@pytest.fixture(scope="module")
def lattice_6(subject):
    return anatomy.subject_tissue_lattice(subject, anatomy.lattice_spacing(6.0))


@pytest.fixture(scope="module")
def noiseless_pair(subject, lattice_6):
    """Default physics: gradient non-linearity, B1 fields and diffusion-time effects all on."""
    run = lambda session: scan.simulate_scan(subject, lattice_6, build_scan_physics(DEFAULT, session), 6.0, noise_seed=4, noise=False)
    return run("3T"), run("7T")


def test_truth_rish_match_a_fit_of_the_written_noiseless_data(noiseless_pair):
    for result in noiseless_pair:
        bvals, bvecs = result.bvals, result.bvecs.T
        shell = bvals == 1000
        s0 = result.dwi[..., bvals <= 50].astype(np.float32).mean(axis=-1)
        brain = s0 > 1500  # tissue-dominated voxels (int16 rounding matters at the brain edge)
        attenuation = result.dwi[brain][:, shell].astype(np.float32) / s0[brain][:, None]
        rish = _sh_rish(attenuation, bvecs[shell])
        assert brain.sum() > 500
        np.testing.assert_allclose(rish[:, 0], result.rish[brain][:, 0], rtol=5e-3)
        np.testing.assert_allclose(rish[:, 1:], result.rish[brain][:, 1:], rtol=0.02, atol=2e-4)


def test_3t_and_7t_share_the_same_anatomy_in_world_space(noiseless_pair):
    volumes, centres = [], []
    for result in noiseless_pair:
        voxel_volume = abs(np.linalg.det(result.affine[:3, :3]))
        wm = result.tissue[..., 0].astype(np.float64)
        volumes.append(wm.sum() * voxel_volume)
        index = np.stack(np.meshgrid(*(np.arange(n) for n in wm.shape), indexing="ij"), -1)
        world = index @ result.affine[:3, :3].T + result.affine[:3, 3]
        centres.append((world * wm[..., None]).sum(axis=(0, 1, 2)) / wm.sum())
        covered = result.peak_fractions.sum(axis=-1)
        assert np.all(covered <= result.tissue[..., 0] + 2e-3)
        white = result.tissue[..., 0] > 0.5
        assert np.mean(covered[white] / result.tissue[..., 0][white]) > 0.95
    assert volumes[0] == pytest.approx(volumes[1], rel=0.02)
    np.testing.assert_allclose(centres[0], centres[1], atol=1.0)


def test_written_bvecs_follow_fsl_convention_for_dipy(noiseless_pair):
    """dipy's tensor fit of the written data recovers the true fibre direction in voxel axes."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    result = noiseless_pair[0]
    single = (result.tissue[..., 0] > 0.9) & (result.peak_fractions[..., 0] > 0.85 * result.tissue[..., 0])
    assert single.sum() > 20
    keep = result.bvals <= 1000
    gtab = gradient_table(result.bvals[keep], bvecs=result.bvecs[:, keep].T, b0_threshold=50)
    fit = TensorModel(gtab).fit(result.dwi[single][:, keep].astype(np.float64))
    evec = fit.evecs[..., 0]
    truth_world = result.peak_directions[single][:, 0]
    truth_voxel = truth_world * np.sign(np.diag(result.affine)[:3])  # world RAS -> voxel axes (LAS)
    angle = np.degrees(np.arccos(np.clip(np.abs(np.sum(evec * truth_voxel, axis=1)), 0, 1)))
    assert np.median(angle) < 10.0


def test_white_matter_truth_l0_ratio_end_to_end(subject, lattice_6):
    """The spherical mean of pure WM does not depend on the fibre configuration, so the L0 of
    WM voxels is the analytic value on both grids and their ratio is the science-notes 0.89
    (gradient non-linearity and diffusion-time dependence off: T2/TE only)."""
    pair = [scan.simulate_scan(subject, lattice_6, flat, 7.0, noise_seed=4, noise=False) for flat in (FLAT_3T, FLAT_7T)]
    l0 = [np.median(r.rish[..., 0][r.tissue[..., 0] > 0.97]) for r in pair]
    assert min((r.tissue[..., 0] > 0.97).sum() for r in pair) > 20
    assert l0[1] / l0[0] == pytest.approx(0.89, abs=0.05)


def test_isotropic_signal_follows_the_local_b_values_of_the_written_grad_dev(subject):
    """Uniform GM, default 3T field: every volume of every voxel is S0 exp(-b_eff D_GM) with
    b_eff = |(I + L) v|^2 b from the written FSL bvecs v and grad_dev tensor L (HCP convention), and
    the truth L0 is the fit of that: L0 varies with the local b as exp(-b D) predicts."""
    result = scan.simulate_scan(subject, uniform_lattice([0, 1, 0]), physics("3T", gradient=0.2), SCALE, noise_seed=6, noise=False)
    brain = result.gain > 0  # uniform tissue everywhere in the field of view
    l_vox = result.grad_dev[brain].reshape(-1, 3, 3).transpose(0, 2, 1)  # L[i, j] = volume 3 j + i
    b_eff = np.sum(np.einsum("pij,nj->pni", np.eye(3) + l_vox, result.bvecs.T) ** 2, axis=-1) * result.bvals
    b_eff[:, result.bvals <= 50] = 0.0
    s0 = SCANNER_GAIN * result.gain[brain] * MODEL_3T.weights["grey_matter"]
    expected = s0[:, None] * np.exp(-b_eff * MODEL_3T.diffusivities.grey_matter)
    np.testing.assert_allclose(result.dwi[brain], expected, rtol=2e-3, atol=0.6)
    shell = result.bvals == 1000
    fit, l_values = scan.rish_fit_matrix(result.bvecs.T[shell])
    expected_rish = rish_features((expected[:, shell] / s0[:, None]) @ fit.T.astype(np.float64), l_values, (0, 2, 4))
    np.testing.assert_allclose(result.rish[brain][:, 0], expected_rish[:, 0], rtol=2e-3)
    assert np.ptp(result.rish[brain][:, 0]) / np.median(result.rish[brain][:, 0]) > 0.05  # it varies in space


def test_gradient_non_linearity_in_white_matter_equals_a_linear_scan_with_the_warped_table(subject, monkeypatch):
    """A constant deviation L everywhere must give exactly the signal of linear gradients with the
    table (b |(I+L) g|^2, (I+L) g / |(I+L) g|): checks the per-voxel fibre transform of the scan."""
    deviation = np.array([[0.06, 0.02, -0.01], [0.0, -0.05, 0.03], [0.02, 0.01, 0.04]])
    monkeypatch.setattr(fields.GradientNonlinearity, "deviation",
                        lambda self, points, isocentre: np.broadcast_to(deviation, np.shape(points)[:-1] + (3, 3)).copy())
    lattice = uniform_lattice([0.8, 0.1, 0.1])
    coarse = 12.0
    warped = scan.simulate_scan(subject, lattice, physics("3T", gradient=0.2), coarse, noise_seed=7, noise=False)
    bvals, g = acq.PROTOCOL_3T.gradient_table()
    actual = g @ (np.eye(3) + deviation).T
    norm = np.linalg.norm(actual, axis=1)
    table = (bvals * np.where(bvals > 50, norm**2, 1.0), np.where(norm[:, None] > 0, actual / np.maximum(norm[:, None], 1e-12), 0.0))

    @dataclasses.dataclass(frozen=True)
    class TableProtocol(acq.Protocol):
        table: tuple = ()

        def gradient_table(self):
            return self.table

    flat = physics("3T")
    protocol = TableProtocol(**{f.name: getattr(flat.protocol, f.name) for f in dataclasses.fields(acq.Protocol)}, table=table)
    linear = scan.simulate_scan(subject, lattice, dataclasses.replace(flat, protocol=protocol), coarse, noise_seed=7, noise=False)
    tissue = warped.tissue.sum(axis=-1) > 0.99
    assert tissue.sum() > 1000 and warped.peak_fractions[tissue][:, 1].max() > 0.2  # crossings present
    np.testing.assert_allclose(warped.dwi[tissue].astype(float), linear.dwi[tissue].astype(float), atol=1.01)
    nominal = scan.simulate_scan(subject, lattice, flat, coarse, noise_seed=7, noise=False)
    assert np.abs(warped.dwi[tissue].astype(float) - nominal.dwi[tissue]).max() > 50  # the field matters


def test_tract_specific_intra_axonal_fractions_reach_every_population(subject, monkeypatch):
    """With every tract offset set to +0.1, a tract-varying scan equals a uniform one at
    intra_fraction + 0.1: the per-population fractions are applied (and nothing else changes)."""
    monkeypatch.setattr(sg, "TRACT_INTRA_FRACTION_OFFSETS", {key: 0.1 for key in sg.TRACT_INTRA_FRACTION_OFFSETS})
    lattice = uniform_lattice([0.9, 0.05, 0.05])
    varying = scan.simulate_scan(subject, lattice, physics("7T", tract=1.0), 12.0, noise_seed=8, noise=False)
    uniform_physics = physics("7T")
    uniform_physics = dataclasses.replace(uniform_physics, model=dataclasses.replace(
        uniform_physics.model, diffusivities=dataclasses.replace(uniform_physics.model.diffusivities, intra_fraction=0.65)))
    uniform = scan.simulate_scan(subject, lattice, uniform_physics, 12.0, noise_seed=8, noise=False)
    default = scan.simulate_scan(subject, lattice, physics("7T"), 12.0, noise_seed=8, noise=False)
    np.testing.assert_allclose(varying.dwi.astype(float), uniform.dwi.astype(float), atol=1.01)
    assert np.abs(varying.dwi.astype(float) - default.dwi).max() > 50


def test_partial_volume_at_a_tissue_boundary_on_both_grids(subject):
    """A planar WM/CSF boundary: each voxel's WM fraction on the 3T and the 7T grid is the part of
    its box on the WM side (exact box average), and its truth L0 is that of the fraction-weighted
    signal mixture (partial volume in the signal, not only in the labels)."""
    # Fine along x (0.25 mm), coarse along y and z where nothing changes: the box averages are separable.
    axes = (np.arange(-140.0, 140.01, 0.25), np.arange(-140.0, 141.0, 20.0), np.arange(-140.0, 141.0, 20.0))
    boundary = 3.3
    wm = (axes[0] < boundary).astype(np.float32)[:, None, None] * np.ones((1, axes[1].size, axes[2].size), np.float32)
    lattice = anatomy.TissueLattice(axes=axes, tissue=np.stack([wm, np.zeros_like(wm), 1.0 - wm], axis=-1))
    for flat, protocol in ((FLAT_3T, acq.PROTOCOL_3T), (FLAT_7T, acq.PROTOCOL_7T)):
        result = scan.simulate_scan(subject, lattice, flat, SCALE, noise_seed=5, noise=False)
        affine = result.affine
        x_centres = affine[0, 0] * np.arange(result.tissue.shape[0]) + affine[0, 3]
        half = abs(affine[0, 0]) / 2
        covered = np.clip((boundary - (x_centres - half)) / (2 * half), 0.0, 1.0)
        # The lattice interpolant ramps over one 0.25 mm cell: up to 0.125 mm of a 8-10 mm voxel.
        np.testing.assert_allclose(result.tissue[:, 20, 15, 0], covered, atol=0.125 / (2 * half) + 1e-3)
        mixed = np.flatnonzero((covered > 0.05) & (covered < 0.95))
        assert mixed.size >= 1
        bvals, g = protocol.gradient_table()
        shell = bvals == 1000
        for i in mixed:
            fraction = result.tissue[i, 20, 15]
            voxel = (fraction[None], np.ones((1, 1)), result.peak_directions[i, 20, 15, :1][None])
            expected = sg.mixture_signal(flat.model, bvals, g, *voxel)
            expected_rish = _sh_rish(expected[:, shell] / expected[:, bvals <= 50].mean(), g[shell])
            assert result.rish[i, 20, 15, 0] == pytest.approx(expected_rish[0, 0], rel=0.01)
