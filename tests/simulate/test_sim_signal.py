"""Compartment signal model: analytic values and the 7T/3T RISH ratios of science.md."""
import numpy as np
import pytest

from bids_dmri_ldm.core.sh import SHModel, rish_features
from bids_dmri_ldm.simulate import acquisition as acq
from bids_dmri_ldm.simulate import signal as sg


def _sh_rish(attenuation, bvecs, orders=(0, 2, 4)):
    """RISH (Eq. 1) of S/S0 ``(..., N)`` by the pipeline's unregularised least-squares SH fit
    (order 4): ``rish_features(att @ F.T)`` with the fit matrix ``F`` of :class:`SHModel`."""
    model = SHModel(bvecs, sh_order_max=4)
    return rish_features(np.asarray(attenuation, np.float32) @ model.fit_matrix.T.astype(np.float32),
                         model.l_values, orders)


MODEL_3T = sg.SignalModel(89.5, sg.T2_3T)
MODEL_7T = sg.SignalModel(71.2, sg.T2_7T)


def _shell(protocol, shell=1000.0):
    bvals, dirs = protocol.gradient_table()
    return bvals[bvals == shell], dirs[bvals == shell]


def _rish(protocol, model, tissue, fractions, directions):
    """Noiseless b=1000 RISH of S/S0 fitted with the project's SH core (unregularised)."""
    bvals, dirs = _shell(protocol)
    signal = sg.mixture_signal(model, bvals, dirs, tissue, fractions, directions)
    s0 = sg.mixture_signal(model, np.zeros(1), np.zeros((1, 3)), tissue, fractions, directions)
    return _sh_rish(signal / s0, dirs)


def _voxels(n, tissue, seed=0, n_fibres=1):
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n, n_fibres, 3))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    return np.tile(np.asarray(tissue, np.float32), (n, 1)), np.full((n, n_fibres), 1.0 / n_fibres), dirs


def test_fibre_signal_analytic_values():
    w = MODEL_3T.weights
    d = MODEL_3T.diffusivities
    b = np.array([0.0, 1000.0, 1000.0])
    cos2 = np.array([0.3, 1.0, 0.0])
    expected = [
        w["intra"] + w["extra"],
        w["intra"] * np.exp(-1000 * d.intra) + w["extra"] * np.exp(-1000 * d.extra_parallel),
        w["intra"] + w["extra"] * np.exp(-1000 * d.extra_perpendicular),
    ]
    np.testing.assert_allclose(sg.fibre_signal(MODEL_3T, b, cos2), expected, rtol=1e-6)
    assert w["intra"] == pytest.approx(0.55 * np.exp(-89.5 / 80.0))
    assert MODEL_7T.weights["csf"] == pytest.approx(np.exp(-71.2 / 1000.0))


def test_b0_volumes_are_not_diffusion_weighted():
    np.testing.assert_array_equal(sg.physical_bvals(np.array([5.0, 50.0, 1000.0])), [0.0, 0.0, 1000.0])


def test_pure_white_matter_7t_3t_rish_ratios_match_science_notes():
    tissue, fractions, dirs = _voxels(50, [1.0, 0.0, 0.0])
    ratio = _rish(acq.PROTOCOL_7T, MODEL_7T, tissue, fractions, dirs) / _rish(acq.PROTOCOL_3T, MODEL_3T, tissue, fractions, dirs)
    np.testing.assert_allclose(ratio, np.tile([0.89, 0.83, 0.77], (50, 1)), atol=0.05)


def test_csf_partial_volume_lowers_the_ratios_further():
    pure = _voxels(20, [1.0, 0.0, 0.0])
    mixed = _voxels(20, [0.85, 0.0, 0.15])
    ratio_pure = _rish(acq.PROTOCOL_7T, MODEL_7T, *pure) / _rish(acq.PROTOCOL_3T, MODEL_3T, *pure)
    ratio_mixed = _rish(acq.PROTOCOL_7T, MODEL_7T, *mixed) / _rish(acq.PROTOCOL_3T, MODEL_3T, *mixed)
    assert np.all(ratio_mixed < ratio_pure - 0.05)
    np.testing.assert_allclose(ratio_mixed[:, :2], np.tile([0.80, 0.72], (20, 1)), atol=0.05)
    gm_csf = _voxels(5, [0.0, 0.9, 0.1])
    ratio_gm = _rish(acq.PROTOCOL_7T, MODEL_7T, *gm_csf) / _rish(acq.PROTOCOL_3T, MODEL_3T, *gm_csf)
    np.testing.assert_allclose(ratio_gm[:, 0], 0.86, atol=0.05)


@pytest.mark.parametrize("n_fibres", [1, 2, 3])
def test_rish_agree_between_3t_and_7t_gradient_sets_when_t2_and_te_are_equal(n_fibres):
    """Rotation/direction-count invariance of model + fit: only the gradient set changes."""
    voxels = _voxels(30, [0.8, 0.1, 0.1], seed=n_fibres, n_fibres=n_fibres)
    rish_3t = _rish(acq.PROTOCOL_3T, MODEL_3T, *voxels)
    rish_7t = _rish(acq.PROTOCOL_7T, MODEL_3T, *voxels)
    np.testing.assert_allclose(rish_7t[:, :2], rish_3t[:, :2], rtol=0.01)
    np.testing.assert_allclose(rish_7t[:, 2], rish_3t[:, 2], rtol=0.02, atol=1e-5)


def test_rish_of_a_single_fibre_do_not_depend_on_its_orientation():
    rish = _rish(acq.PROTOCOL_3T, MODEL_3T, *_voxels(40, [1.0, 0.0, 0.0], seed=3))
    assert np.all(rish.std(axis=0) / rish.mean(axis=0) < 0.01)


def test_extra_axonal_perpendicular_diffusivity_follows_the_structural_disorder_law():
    """D_perp(Delta, delta) = D_inf + A (ln(Delta/delta) + 3/2) / (Delta - delta/3) (Burcaw et al. 2015)."""
    hcp_3t, hcp_7t = (acq.PROTOCOL_3T.big_delta_ms, acq.PROTOCOL_3T.small_delta_ms), (acq.PROTOCOL_7T.big_delta_ms, acq.PROTOCOL_7T.small_delta_ms)
    assert hcp_3t == sg.REFERENCE_TIMING_MS
    assert sg.extra_perpendicular_at(0.7e-3, 1.0, hcp_3t) == pytest.approx(0.7e-3, rel=1e-12)
    assert sg.extra_perpendicular_at(0.7e-3, 0.0, hcp_7t) == pytest.approx(0.7e-3, rel=1e-12)
    factor = lambda big, small: (np.log(big / small) + 1.5) / (big - small / 3)
    expected = 0.7e-3 + 2.0e-3 * (factor(*hcp_7t) - factor(*hcp_3t))
    assert sg.extra_perpendicular_at(0.7e-3, 2.0, hcp_7t) == pytest.approx(expected, rel=1e-12)
    # Shorter diffusion time -> less time to feel the disorder -> higher perpendicular diffusivity.
    assert sg.extra_perpendicular_at(0.7e-3, 1.0, (20.0, 10.0)) > 0.7e-3 > sg.extra_perpendicular_at(0.7e-3, 1.0, (80.0, 10.0))
    # HCP 3T vs 7T timings: a small (~1 %) difference, the literature order of magnitude.
    assert 0.0 < sg.extra_perpendicular_at(0.7e-3, sg.DEFAULT_DISORDER_AMPLITUDE_UM2, hcp_7t) / 0.7e-3 - 1 < 0.03


def test_gradient_deviation_acts_as_local_b_value_and_direction():
    """With deviation L, a volume (b, g) is the same as a linear acquisition at b |(I+L) g|^2 along
    (I+L) g / |(I+L) g|: for every compartment, checked against the linear model."""
    rng = np.random.default_rng(5)
    n = 6
    tissue, fractions, dirs = _voxels(n, [0.6, 0.25, 0.15], seed=5, n_fibres=2)
    deviation = rng.normal(0.0, 0.06, (n, 3, 3))
    bvals, g = _shell(acq.PROTOCOL_3T)
    warped = sg.mixture_signal(MODEL_3T, bvals, g, tissue, fractions, dirs, deviation=deviation)
    for v in range(n):
        actual = g @ (np.eye(3) + deviation[v]).T
        norm = np.linalg.norm(actual, axis=1)
        for i in range(0, bvals.size, 9):
            linear = sg.mixture_signal(MODEL_3T, np.array([bvals[i] * norm[i] ** 2]), (actual[i] / norm[i])[None],
                                       tissue[v : v + 1], fractions[v : v + 1], dirs[v : v + 1])
            assert warped[v, i] == pytest.approx(linear[0, 0], rel=2e-5)
    np.testing.assert_allclose(sg.mixture_signal(MODEL_3T, bvals, g, tissue, fractions, dirs, deviation=np.zeros((n, 3, 3))),
                               sg.mixture_signal(MODEL_3T, bvals, g, tissue, fractions, dirs), rtol=1e-6)


def test_gradient_non_linearity_gives_csf_apparent_anisotropy():
    """Isotropic CSF acquired with a direction-dependent b-value shows L2 > 0 (an artefact real HCP
    3T data carry), and its L0 is 4 pi (mean over directions of exp(-b D |(I+L) g|^2))^2."""
    bvals, g = _shell(acq.PROTOCOL_3T)
    deviation = np.array([[[0.05, 0.01, 0.0], [0.01, -0.04, 0.02], [0.0, 0.02, -0.06]]])
    csf = (np.array([[0.0, 0.0, 1.0]]), np.ones((1, 1)), np.array([[[0.0, 0.0, 1.0]]]))
    s0 = sg.mixture_signal(MODEL_3T, np.zeros(1), np.zeros((1, 3)), *csf)
    rish = [_sh_rish(sg.mixture_signal(MODEL_3T, bvals, g, *csf, deviation=d) / s0, g)[0]
            for d in (None, deviation)]
    assert rish[0][1] < 1e-8 and rish[1][1] > 1e-4
    bscale = np.sum((g @ (np.eye(3) + deviation[0]).T) ** 2, axis=1)
    expected_l0 = 4 * np.pi * np.mean(np.exp(-1000 * MODEL_3T.diffusivities.csf * bscale)) ** 2
    assert rish[1][0] == pytest.approx(expected_l0, rel=0.005)
    assert rish[1][0] / rish[0][0] == pytest.approx(np.exp(-2 * 3.0 * (bscale.mean() - 1)), rel=0.05)  # exp(-b D) at the mean b


def test_tract_specific_intra_axonal_fractions():
    """Per-tract fractions around the mean (CC and CST highest, peripheral 'background' lowest),
    scaled by tract_variation and clipped; the 7T/3T ratios then differ between tracts."""
    from dataclasses import replace

    from bids_dmri_ldm.simulate import fibres

    names = fibres.BUNDLE_NAMES
    base = sg.Diffusivities()
    np.testing.assert_allclose(sg.tract_intra_fractions(base), 0.55)
    varied = sg.tract_intra_fractions(replace(base, tract_variation=1.0))
    assert varied[names.index("CC")] == pytest.approx(0.62) and varied[names.index("background")] == pytest.approx(0.49)
    assert varied[names.index("CSTL")] == varied[names.index("CSTR")] == pytest.approx(0.60)
    assert sg.tract_intra_fractions(replace(base, intra_fraction=0.93, tract_variation=2.0)).max() == pytest.approx(0.95)
    # Row-wise fractions in fibre_signal equal a model with that fraction.
    cos2 = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 1.0]])
    b = np.array([0.0, 1000.0, 1000.0])
    rows = sg.fibre_signal(MODEL_7T, b, cos2, intra_fraction=np.array([0.62, 0.49]))
    for i, f in enumerate((0.62, 0.49)):
        model = sg.SignalModel(71.2, sg.T2_7T, replace(base, intra_fraction=f))
        np.testing.assert_allclose(rows[i], sg.fibre_signal(model, b, cos2[i]), rtol=1e-6)
    ratio = {}
    for f in (0.62, 0.49):
        voxels = _voxels(10, [1.0, 0.0, 0.0], seed=4)
        models = [sg.SignalModel(m.echo_time_ms, m.relaxation, replace(base, intra_fraction=f)) for m in (MODEL_3T, MODEL_7T)]
        ratio[f] = _rish(acq.PROTOCOL_7T, models[1], *voxels) / _rish(acq.PROTOCOL_3T, models[0], *voxels)
    assert np.all(ratio[0.62].mean(0)[1:] > ratio[0.49].mean(0)[1:] + 0.02)  # L2, L4: tract-dependent
