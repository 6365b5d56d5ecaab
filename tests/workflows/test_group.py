"""Group level (rish-global) through the command line, with a known answer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.cli.exitcodes import EX_DATAERR, EX_USAGE
from bids_dmri_ldm.cli.run import main
from bids_dmri_ldm.core.sh import SHModel, rish_features
from bids_dmri_ldm.methods import load_rish_global_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import GM_MD, WM_EIGENVALUES, dwi_signal


def _sh_rish(attenuation, bvecs, orders=(0, 2, 4)):
    """RISH (Eq. 1) of S/S0 ``(..., N)`` by the pipeline's unregularised least-squares SH fit
    (order 4): ``rish_features(att @ F.T)`` with the fit matrix ``F`` of :class:`SHModel`."""
    model = SHModel(bvecs, sh_order_max=4)
    return rish_features(np.asarray(attenuation, np.float32) @ model.fit_matrix.T.astype(np.float32),
                         model.l_values, orders)


def _wm_rish(ds, strength: float, b: float = 1000.0) -> np.ndarray:
    """RISH (Eq. 1) of the noiseless white-matter signal of the conftest phantom, fitted directly."""
    data, _, wm = dwi_signal((12, 12, 10), ds.bvals, ds.bvecs, ds.principal_direction, strength)
    shell = np.abs(ds.bvals - b) <= 100
    b0 = ds.bvals <= 50
    voxel = data[wm][0]
    att = voxel[shell] / voxel[b0].mean()
    return _sh_rish(att[None], ds.bvecs[shell])[0]


def test_group_rish_global_known_factors(make_bids_dataset, tmp_path):
    """Paired 3T/7T phantoms: grey matter has the same S/S0 at both fields, orders 2 and 4 exist
    only in the white-matter core. The factor of each order is the ratio of the brain means,
    sqrt(sum RISH_l^7T / sum RISH_l^3T): for l = 2, 4 that of the two known tensors; for l = 0 the
    grey and white voxels' RISH_0 weighted by their numbers."""
    assert WM_EIGENVALUES[3.0] != WM_EIGENVALUES[7.0] and GM_MD
    ds = make_bids_dataset(subjects=("01", "02"), field_strengths=(3.0, 7.0))
    out = tmp_path / "out"
    rc = main([str(ds.root), str(out), "group", "-w", str(tmp_path / "work"), "--skip-bids-validation",
               "--method", "rish-global"])
    assert rc == 0
    model = load_rish_global_model(out / "models" / "rish-global")
    wm_3t, wm_7t = _wm_rish(ds, 3.0), _wm_rish(ds, 7.0)
    expected = np.sqrt(wm_7t / wm_3t)
    np.testing.assert_allclose(model.factors[1:], expected[1:], rtol=1e-3)
    gm_rish0 = 4 * np.pi * np.exp(-1000.0 * GM_MD) ** 2  # isotropic: C_00 = sqrt(4 pi) S/S0
    n_wm, n_gm = ds.wm_mask.sum(), ds.brain_mask.sum() - ds.wm_mask.sum()
    expected_0 = np.sqrt((n_gm * gm_rish0 + n_wm * wm_7t[0]) / (n_gm * gm_rish0 + n_wm * wm_3t[0]))
    assert abs(expected_0 - 1.0) > 0.01 and abs(expected_0 - expected[0]) > 0.01  # neither tissue's own
    np.testing.assert_allclose(model.factors[0], expected_0, rtol=2e-3)
    # one participant trains, the other is held out for the validation gate (identity, rish-global,
    # untouched 3T against its real 7T, the paper's 8 columns)
    train, held_out = model.training["participants"], model.training["validation_participants"]
    assert model.training["n_pairs"] == 1 and sorted(train + held_out) == ["01", "02"] and len(held_out) == 1
    table = model.validation
    assert table["n_participants"] == 1 and set(table["mean"]) == {"untouched 3T", "identity", "rish-global"}
    assert all(len(v) == 8 for v in table["mean"].values())
    html = (out / "group_training.html").read_text()
    assert "Validation gate" in html and "untouched 3T" in html
    assert "models/" in (out / ".bidsignore").read_text().splitlines()
    # The trained model is usable at the participant level.
    rc = main([str(ds.root), str(out), "participant", "-w", str(tmp_path / "work"), "--skip-bids-validation",
               "--nprocs", "1", "--participant-label", "01", "--method", "rish-global",
               "--model-dir", str(out / "models"), "--output-resolution", "native"])
    assert rc == 0
    assert (out / "sub-01" / "dwi" / "sub-01_acq-3T_desc-7Tlike_dwi.nii.gz").is_file()


def test_group_identity_is_a_usage_error(make_bids_dataset, tmp_path, capsys):
    ds = make_bids_dataset(field_strengths=(3.0, 7.0))
    rc = main([str(ds.root), str(tmp_path / "out"), "group", "-w", str(tmp_path / "work"),
               "--skip-bids-validation", "--method", "identity"])
    assert rc == EX_USAGE
    assert "nothing to learn" in capsys.readouterr().err


def test_group_rish_global_every_shared_shell(make_bids_dataset, tmp_path, capsys):
    """Two full shells at both field strengths: one model file holds the factors of each shell
    (each the known tensor ratio of that shell), its trained_for lists both; the participant level
    then scales each shell by its own factors. ldm/cnn train one shell per bundle: several
    --shell values are a usage error (64)."""
    ds = make_bids_dataset(subjects=("01", "02"), field_strengths=(3.0, 7.0), n_b2000=30)
    out, work = tmp_path / "out", tmp_path / "work"
    assert main([str(ds.root), str(out), "group", "-w", str(work), "--skip-bids-validation",
                 "--method", "rish-global"]) == 0
    model = load_rish_global_model(out / "models" / "rish-global")
    assert model.shells == [1000.0, 2000.0] and model.trained_for["shells"] == [1000.0, 2000.0]
    for b in (1000.0, 2000.0):
        expected = np.sqrt(_wm_rish(ds, 7.0, b) / _wm_rish(ds, 3.0, b))
        np.testing.assert_allclose(model.shell_factors[b][1:], expected[1:], rtol=1e-3)
    assert set(model.training["per_shell"]) == {"1000", "2000"}
    assert model.validation is not None  # the gate scored the lowest shell
    rc = main([str(ds.root), str(out), "participant", "-w", str(work), "--skip-bids-validation", "--nprocs", "1",
               "--participant-label", "01", "--method", "rish-global", "--model-dir", str(out / "models"),
               "--output-resolution", "native"])
    assert rc == 0
    folder = out / "sub-01" / "dwi"
    scale = np.asanyarray(nib.load(folder / "sub-01_acq-3T_model-rish_desc-scale_dwimap.nii.gz").dataobj)
    mask = np.asanyarray(nib.load(folder / "sub-01_acq-3T_desc-brain_mask.nii.gz").dataobj) > 0
    for k, b in enumerate((1000.0, 2000.0)):
        np.testing.assert_allclose(scale[mask][:, 3 * k:3 * k + 3],
                                   np.broadcast_to(model.shell_factors[b], (mask.sum(), 3)), rtol=1e-6)
    capsys.readouterr()
    assert main([str(ds.root), str(tmp_path / "ldm"), "group", "-w", str(work), "--skip-bids-validation",
                 "--method", "ldm", "--shell", "1000", "2000"]) == EX_USAGE
    assert "trains one shell per bundle" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["rish-global", "cnn", "ldm"])
def test_group_refuses_a_dataset_simulated_for_held_out_evaluation(make_bids_dataset, tmp_path, capsys, method):
    """``--physics shifted`` marks a simulated dataset for evaluation only: no method trains on it."""
    ds = make_bids_dataset(subjects=("01",), field_strengths=(3.0, 7.0))
    description = json.loads((ds.root / "dataset_description.json").read_text())
    (ds.root / "dataset_description.json").write_text(json.dumps({**description, "SimulationPhysicsPreset": "shifted"}))
    out = tmp_path / "out"
    code = main([str(ds.root), str(out), "group", "--method", method, "-w", str(tmp_path / "work"),
                 "--skip-bids-validation", "--nprocs", "1"])
    assert code == EX_DATAERR
    error = capsys.readouterr().err.strip().splitlines()[-1]  # the log lines before it go to stderr too
    assert "error" in error and "held-out" in error and "--physics shifted" in error
    assert not (out / "models").exists() and not (tmp_path / "work" / "ldm_rish_cache").exists()
