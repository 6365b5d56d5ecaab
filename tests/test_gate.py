"""Validation gate (known answers): a model that reproduces the 3T -> 7T change beats identity, a
wrong one loses and is named; the in-memory translation is the participant level's Eq. 3."""
from __future__ import annotations

import numpy as np
import pytest
from test_evaluate import SEVEN_T_GRID, gradient_table, save_dwi, tensor_field_dwi

from bids_dmri_ldm.core.sh import RISH_ORDERS, SHModel, rish_features
from bids_dmri_ldm.core.signal import fit_shell_sh
from bids_dmri_ldm.evaluation import gate
from bids_dmri_ldm.evaluation.pipeline import ShellData
from bids_dmri_ldm.methods import IdentityMethod, RishGlobalMethod, RishGlobalModel

THREE_T_GRID = (np.diag([1.9, 1.9, 1.9, 1.0]), (12, 12, 12))
THREE_T_GRID[0][:3, 3] = [-10.6, -10.1, -10.4]


def _pair(tmp_path, dw_scale_7t: float) -> gate.ValidationPair:
    """A participant whose 7T diffusion-weighted signal is ``dw_scale_7t`` x the 3T one (same world
    content on two grids): RISH_7T = dw_scale^2 RISH_3T, i.e. lambda = dw_scale in every order."""
    bvals, bvecs = gradient_table(3, 40, 0.3)
    a3, s3 = THREE_T_GRID
    a7, s7 = SEVEN_T_GRID
    src = save_dwi(tmp_path / "sub-01/ses-3T/dwi/sub-01_ses-3T_dwi", tensor_field_dwi(a3, s3, bvals, bvecs), a3, bvals,
                   bvecs, {"MagneticFieldStrength": 3})
    tgt = save_dwi(tmp_path / "sub-01/ses-7T/dwi/sub-01_ses-7T_dwi",
                   tensor_field_dwi(a7, s7, bvals, bvecs, dw_scale=dw_scale_7t), a7, bvals, bvecs,
                   {"MagneticFieldStrength": 7})
    data = tensor_field_dwi(a3, s3, bvals, bvecs)
    model = SHModel(bvecs[3:], sh_order_max=4)
    mask = np.ones(s3, bool)
    _, coeffs = fit_shell_sh(data, np.arange(3), np.arange(3, 43), mask, model.fit_matrix)
    rish = rish_features(coeffs, model.l_values, RISH_ORDERS)
    stem = lambda p: str(p).removesuffix(".nii.gz")
    return gate.ValidationPair("01", "3T", src, tmp_path / f"{stem(src)}.bval", tmp_path / f"{stem(src)}.bvec",
                               tgt, tmp_path / f"{stem(tgt)}.bval", tmp_path / f"{stem(tgt)}.bvec",
                               rish, mask, a3)


def _global(factor: float) -> RishGlobalMethod:
    return RishGlobalMethod(RishGlobalModel(factors=(factor,) * 3))


def test_translate_dwi_with_lambda_one_is_the_sh_projection_and_lambda_scales_rish():
    bvals, bvecs = gradient_table(2, 30, 0.7)
    affine, shape = THREE_T_GRID
    data = tensor_field_dwi(affine, shape, bvals, bvecs)
    src = ShellData(data, bvals, bvecs, affine, 2)
    region = np.ones(shape, bool)
    brain = np.zeros(shape, bool)
    brain[3:9, 3:9, 3:9] = True
    same = gate.translate_dwi(src, region, np.ones(shape + (3,)), brain)
    np.testing.assert_array_equal(same.data[..., :2], data[..., :2])  # b0 volumes kept
    np.testing.assert_allclose(same.data, data, rtol=0.03)  # a single tensor: order 4 holds it closely
    lam = np.full(shape + (3,), 0.8, np.float32)
    out = gate.translate_dwi(src, region, lam, brain)
    model = SHModel(bvecs[2:], sh_order_max=4)

    def rish(d):
        return rish_features(fit_shell_sh(d, np.arange(2), np.arange(2, 32), region, model.fit_matrix)[1],
                             model.l_values, RISH_ORDERS)

    ratio = rish(out.data)[brain] / rish(same.data)[brain]
    np.testing.assert_allclose(ratio, 0.64, rtol=1e-3)  # lambda^2 inside the brain mask ...
    np.testing.assert_allclose(out.data[~brain], same.data[~brain], rtol=1e-6)  # ... lambda = 1 outside


def test_the_gate_ranks_a_right_model_above_identity_and_names_a_wrong_ones_losses(tmp_path):
    pair = _pair(tmp_path, dw_scale_7t=0.9)
    rows = gate.score_pair(pair, {"identity": IdentityMethod(), "right": _global(0.9), "wrong": _global(1.25)},
                           truth_root=tmp_path)
    table = gate.summarise_rows(rows, model="right")
    mean = table["mean"]
    assert set(mean) == {"untouched 3T", "identity", "right", "wrong"} and table["n_participants"] == 1
    for order in ("L0", "L2", "L4"):
        assert mean["right"][f"nmse_{order}"] < 2e-3  # lambda = 0.9 reproduces the 7T RISH
        assert mean["identity"][f"nmse_{order}"] == pytest.approx(0.81 ** -1 * 0.0361, rel=0.3)
    assert table["loses_to_identity"] == []
    wrong = gate.losing_columns(table, "wrong")
    assert {"nmse_L0", "nmse_L2", "nmse_L4"} <= set(wrong)
    markdown = gate.table_markdown(dict(table, model="wrong", loses_to_identity=wrong))
    assert "wrong loses to identity in" in markdown and "NMSE L0" in markdown
    message = gate.validation_warning("wrong", dict(table, loses_to_identity=wrong))
    assert message.startswith("model wrong loses to identity on its 1 validation participant(s) in NMSE L0")
    assert gate.validation_warning("right", table) is None
    assert "no validation table" in gate.validation_warning("old", None)


def test_a_model_that_lost_is_flagged_in_every_sidecar(make_bids_dataset, tmp_path, caplog):
    """The participant level, given a model whose validation table says it lost to identity, warns
    once and records the warning in every sidecar it writes (RunWarnings)."""
    import json
    import logging

    from bids_dmri_ldm.cli.run import main
    from bids_dmri_ldm.methods import save_rish_global_model

    table = {"model": "rish-global", "n_participants": 2, "columns": list(gate.COLUMNS),
             "mean": {}, "loses_to_identity": ["nmse_L4", "ssim_FA"]}
    save_rish_global_model(RishGlobalModel(factors=(0.9, 0.8, 0.7), validation=table), tmp_path / "model")
    ds = make_bids_dataset(subjects=("01", "02"))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert main([str(ds.root), str(out), "participant", "-w", str(tmp_path / "w"), "--skip-bids-validation",
                     "--nprocs", "1", "--method", "rish-global", "--model-dir", str(tmp_path / "model"),
                     "--output-resolution", "native"]) == 0
    flagged = [r for r in caplog.records if "loses to identity" in r.getMessage()]
    assert len(flagged) == 1 and "NMSE L4, SSIM FA" in flagged[0].getMessage()
    sidecars = sorted(out.glob("sub-*/dwi/*.json"))
    assert len(sidecars) >= 10  # 5 derivatives x 2 participants
    for sidecar in sidecars:
        assert any("loses to identity" in w for w in json.loads(sidecar.read_text())["RunWarnings"]), sidecar


def test_float_rounding_is_a_tie_not_a_loss():
    table = {"columns": ["nmse_L4", "ssim_L4"], "mean": {
        "identity": {"nmse_L4": 0.17732077893961892, "ssim_L4": 0.775556206703186},
        "same": {"nmse_L4": 0.17732077852303893, "ssim_L4": 0.7755561947822571},
        "worse": {"nmse_L4": 0.1775, "ssim_L4": 0.7750}}}
    assert gate.losing_columns(table, "same") == []
    assert gate.losing_columns(table, "worse") == ["nmse_L4", "ssim_L4"]
