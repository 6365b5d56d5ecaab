"""Every shell of the input, and ``--output-gradients``, through the participant level (issue 14).

Data: the conftest phantom with two full shells (3 b0 + 30 x b=1000 + 30 x b=2000, noiseless single
tensor in a white-matter core, known fibre direction) and the project's simulator (3T: b = 1000,
2000, 3000 interleaved, 18 b0s interleaved).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.cli.exitcodes import EX_DATAERR
from bids_dmri_ldm.cli.run import main
from bids_dmri_ldm.core.gradients import load_gradients
from bids_dmri_ldm.core.metrics import angular_error_deg, tensor_fit
from bids_dmri_ldm.core.sh import sh_basis
from bids_dmri_ldm.interfaces import steps
from bids_dmri_ldm.methods import RishGlobalModel, save_rish_global_model

pytestmark = pytest.mark.slow

SHELLS = (1000.0, 2000.0)


def _run(bids: Path, out: Path, work: Path, *extra: str) -> int:
    return main([str(bids), str(out), "participant", "-w", str(work), "--skip-bids-validation", "--nprocs", "1",
                 "--output-resolution", "native", *extra])


def _outputs(out: Path, stem: str = "sub-01") -> dict:
    folder = out / "sub-01" / "dwi"
    dwi = folder / f"{stem}_desc-7Tlike_dwi.nii.gz"
    bvals, bvecs = load_gradients(str(dwi).replace(".nii.gz", ".bval"), str(dwi).replace(".nii.gz", ".bvec"))
    maps = {key: np.asanyarray(nib.load(folder / f"{stem}_model-rish_desc-{desc}_dwimap.nii.gz").dataobj)
            for key, desc in (("source", "source"), ("predicted", "7Tlike"), ("scale", "scale"))}
    return {"dwi": np.asanyarray(nib.load(dwi).dataobj, dtype=np.float32), "bvals": bvals, "bvecs": bvecs,
            "sidecar": json.loads(dwi.with_name(dwi.name.replace(".nii.gz", ".json")).read_text()),
            "scale_sidecar": json.loads((folder / f"{stem}_model-rish_desc-scale_dwimap.json").read_text()),
            "mask": np.asanyarray(nib.load(folder / f"{stem}_desc-brain_mask.nii.gz").dataobj) > 0, **maps}


@pytest.fixture
def two_shells(make_bids_dataset):
    return make_bids_dataset(n_b2000=30)


def _source(ds) -> np.ndarray:
    return np.asanyarray(nib.load(ds.dwi_files[0]).dataobj, dtype=np.float32)


def test_identity_keeps_every_volume_and_reproduces_every_shell(two_shells, tmp_path):
    """Every input volume comes back in the input's order (b0s, b=1000, b=2000); lambda = 1
    reproduces each shell within the order-4 truncation of a tensor signal; the RISH and scale
    maps hold three volumes per shell, which their sidecars name."""
    ds = two_shells
    assert _run(ds.root, tmp_path / "out", tmp_path / "work", "--method", "identity") == 0
    got = _outputs(tmp_path / "out")
    np.testing.assert_allclose(got["bvals"], ds.bvals)
    np.testing.assert_allclose(got["bvecs"], ds.bvecs, atol=1e-6)
    source, data, brain = _source(ds), got["dwi"], ds.brain_mask
    b0 = ds.bvals <= 50
    np.testing.assert_array_equal(data[..., b0], source[..., b0])
    for shell, tolerance in zip(SHELLS, (1e-4, 1e-3)):
        sel = np.abs(ds.bvals - shell) <= 100
        nmse = np.sum((data[brain][:, sel] - source[brain][:, sel]) ** 2) / np.sum(source[brain][:, sel] ** 2)
        assert nmse < tolerance, (shell, nmse)
    assert got["source"].shape[-1] == got["scale"].shape[-1] == 6
    assert got["scale_sidecar"]["VolumeShells"] == [1000.0] * 3 + [2000.0] * 3
    assert got["scale_sidecar"]["VolumeRISHOrders"] == [0, 2, 4, 0, 2, 4]
    np.testing.assert_array_equal(got["scale"], 1.0)
    # each shell has its own RISH: at b=2000 the tensor's attenuation, and its anisotropy, differ
    wm = ds.wm_mask
    assert np.median(got["source"][wm][:, 3]) < 0.5 * np.median(got["source"][wm][:, 0])
    shells = got["sidecar"]["Shells"]
    assert [(r["BValue"], r["Translated"], r["MapShellIndex"]) for r in shells] == [(1000.0, True, 0),
                                                                                  (2000.0, True, 1)]
    assert "RunWarnings" not in got["sidecar"]
    assert got["sidecar"]["Settings"]["Shells"] is None and got["sidecar"]["Settings"]["OutputGradients"] is None


def _model(tmp_path: Path, name: str, shell_factors: dict) -> Path:
    first = shell_factors[min(shell_factors)]
    save_rish_global_model(RishGlobalModel(factors=first, sh_order_max=4, shell_factors=shell_factors,
                                           training={"note": "test model"}), tmp_path / name / "rish-global")
    return tmp_path / name


def test_rish_global_translates_the_shells_it_covers(two_shells, tmp_path, capsys):
    """A model trained for b=1000 scales that shell and passes b=2000 through (lambda = 1, one
    warning in the log and the sidecar); a two-shell model applies each shell's own factors, and
    --shell restricts what is translated (the rest passed through and said so); a model trained
    for none of the run's shells is refused (65) naming both."""
    ds = two_shells
    f1000, f2000 = (0.9, 0.8, 0.7), (0.6, 0.5, 0.4)
    one = _model(tmp_path, "one", {1000.0: f1000})
    assert _run(ds.root, tmp_path / "a", tmp_path / "work", "--method", "rish-global", "--model-dir", str(one)) == 0
    got = _outputs(tmp_path / "a")
    mask = got["mask"]
    np.testing.assert_allclose(got["scale"][mask][:, :3], np.broadcast_to(f1000, (mask.sum(), 3)), rtol=1e-6)
    np.testing.assert_array_equal(got["scale"][..., 3:], 1.0)
    np.testing.assert_allclose(got["predicted"][..., 3:], got["source"][..., 3:], rtol=1e-6)  # passed through
    warning = "the b=2000 shell (30 volumes) is passed through unscaled (lambda = 1): the rish-global model was " \
              "trained for b=1000 s/mm²"
    assert [w for w in got["sidecar"]["RunWarnings"] if "passed through" in w] == [f"sub-01_dwi.nii.gz: {warning}"]
    assert warning in capsys.readouterr().err
    assert [r["Translated"] for r in got["sidecar"]["Shells"]] == [True, False]
    assert got["sidecar"]["Shells"][0]["ScaleFactors"] == list(f1000)

    two = _model(tmp_path, "two", {1000.0: f1000, 2000.0: f2000})
    assert _run(ds.root, tmp_path / "b", tmp_path / "work", "--method", "rish-global", "--model-dir", str(two),
                "--shell", "2000") == 0
    got = _outputs(tmp_path / "b")
    np.testing.assert_array_equal(got["scale"][..., :3], 1.0)  # b=1000 not selected
    np.testing.assert_allclose(got["scale"][mask][:, 3:], np.broadcast_to(f2000, (mask.sum(), 3)), rtol=1e-6)
    np.testing.assert_allclose(got["predicted"][mask][:, 3:], got["source"][mask][:, 3:] * np.square(f2000),
                               rtol=1e-4, atol=1e-7)
    record = got["sidecar"]["Shells"][0]
    assert not record["Translated"] and "not selected by --shell" in record["Note"]
    # the user's choice is a note, not a warning (RunWarnings holds only the model's standing one)
    assert not [w for w in got["sidecar"].get("RunWarnings", []) if "passed through" in w]
    assert got["sidecar"]["Settings"]["Shells"] == [2000.0]

    other = _model(tmp_path, "other", {3000.0: f1000})
    capsys.readouterr()
    assert _run(ds.root, tmp_path / "c", tmp_path / "work", "--method", "rish-global", "--model-dir",
                str(other)) == EX_DATAERR
    err = capsys.readouterr().err
    assert ("the rish-global model was trained for b=3000 s/mm², and no shell this run translates matches it "
            "(shells available: 1000 (30 directions), 2000 (30))") in err
    assert not (tmp_path / "c" / "sub-01").exists()  # nothing written for the refused run
    assert _run(ds.root, tmp_path / "d", tmp_path / "work", "--method", "rish-global", "--model-dir", str(other),
                "--shell", "1000") == EX_DATAERR
    assert "shell: model b=3000 s/mm², this run --shell 1000" in capsys.readouterr().err


def _table(folder: Path, bvals, bvecs) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    bval, bvec = folder / "hcp7t.bval", folder / "hcp7t.bvec"
    bval.write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    bvec.write_text("\n".join(" ".join(f"{v:.8f}" for v in row) for row in np.asarray(bvecs).T) + "\n")
    return bval, bvec


def _sphere(n: int, twist: float) -> np.ndarray:
    i = np.arange(n) + 0.5
    z = 1 - i / n
    phi = np.pi * (1 + 5**0.5) * i + twist
    return np.stack([np.sqrt(1 - z**2) * np.cos(phi), np.sqrt(1 - z**2) * np.sin(phi), z], axis=1)


def test_output_gradients_writes_the_given_table(two_shells, tmp_path, capsys):
    """3 b0 + 30 x b=1000 + 30 x b=2000 on other directions: exactly those 63 volumes, the b0s
    the input's mean b0, and DTI on the output agrees with DTI on the input (principal direction,
    FA) for the noiseless tensor; a table asking for a shell the input lacks is refused (65)."""
    ds = two_shells
    out_b = np.r_[0, 0, 0, np.full(30, 1000.0), np.full(30, 2000.0)]
    out_g = np.vstack([np.zeros((3, 3)), _sphere(30, 0.9) @ _rotation(0.4).T, _sphere(30, 2.1)])
    bval, bvec = _table(tmp_path / "table", out_b, out_g)
    assert _run(ds.root, tmp_path / "out", tmp_path / "work", "--method", "identity",
                "--output-gradients", str(bval), str(bvec)) == 0
    got = _outputs(tmp_path / "out")
    data = got["dwi"]
    assert data.shape[-1] == 63
    np.testing.assert_allclose(got["bvals"], out_b)
    np.testing.assert_allclose(got["bvecs"], out_g, atol=1e-6)
    source = _source(ds)
    mean_b0 = source[..., ds.bvals <= 50].mean(axis=-1)
    for t in range(3):
        np.testing.assert_allclose(data[..., t], mean_b0, rtol=1e-5, atol=1e-3)
    wm = ds.wm_mask
    fa_in, evec_in = tensor_fit(source, ds.bvals, ds.bvecs, wm)
    fa_out, evec_out = tensor_fit(data, out_b, out_g, wm)
    assert np.max(angular_error_deg(evec_out[wm], evec_in[wm])) < 1.0
    assert np.max(np.abs(fa_out[wm] - fa_in[wm])) < 0.01, np.max(np.abs(fa_out[wm] - fa_in[wm]))
    settings = got["sidecar"]["Settings"]["OutputGradients"]
    assert (settings["BVal"], settings["BVec"]) == ("hcp7t.bval", "hcp7t.bvec") and len(settings["BValSHA256"]) == 64
    assert "given table" in got["sidecar"]["Description"]

    lacking = _table(tmp_path / "lacking", np.r_[0, np.full(30, 3000.0)], np.vstack([np.zeros(3), _sphere(30, 0)]))
    capsys.readouterr()
    assert _run(ds.root, tmp_path / "bad", tmp_path / "work", "--method", "identity",
                "--output-gradients", *map(str, lacking)) == EX_DATAERR
    err = capsys.readouterr().err
    assert ("the --output-gradients table asks for b=3000 s/mm², which this run lacks (shells available: "
            "1000 (30 directions), 2000 (30), within 100 s/mm²)") in err
    assert not (tmp_path / "bad" / "sub-01").exists()


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def test_each_shells_rish_is_rotation_invariant(tmp_path):
    """One band-limited two-shell signal sampled on two direction sets related by a rotation:
    each shell's RISH maps agree between the two runs, and differ between the shells."""
    rng = np.random.default_rng(7)
    shape = (4, 3, 3)
    coeffs = {b: rng.normal(0, 0.03, shape + (15,)) for b in SHELLS}
    coeffs[1000.0][..., 0], coeffs[2000.0][..., 0] = 0.5 * np.sqrt(4 * np.pi), 0.25 * np.sqrt(4 * np.pi)
    s0 = rng.uniform(500, 1500, shape)
    rish = []
    for k, rotation in enumerate((np.eye(3), _rotation(0.7))):
        bvals, bvecs, volumes = [0.0], [np.zeros(3)], [s0]
        dirs = {b: _sphere(30, 0.5 * j) for j, b in enumerate(SHELLS)}
        for g in range(30):  # interleaved shells
            for b in SHELLS:
                direction = dirs[b][g]
                bvals.append(b)
                bvecs.append(rotation @ direction)
                volumes.append(s0 * (coeffs[b] @ sh_basis(direction[None], 4)[0][0]))  # f(g) sampled at R g
        # the signal is the same function f of the (unrotated) direction: rotating the sampling
        # frame is a rotation of the signal, which RISH does not see
        data = np.stack(volumes, axis=-1).astype(np.float32)
        folder = tmp_path / f"run{k}"
        folder.mkdir()
        nib.save(nib.Nifti1Image(data, np.diag([-2.0, 2, 2, 1])), folder / "sub-01_dwi.nii.gz")
        (folder / "sub-01_dwi.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
        (folder / "sub-01_dwi.bvec").write_text("\n".join(" ".join(f"{v:.10f}" for v in row)
                                                          for row in np.asarray(bvecs).T) + "\n")
        files = [str(folder / f"sub-01_dwi.{e}") for e in ("nii.gz", "bval", "bvec")]
        sel = steps.select_shells_step(*files, steps.ShellOptions().to_dict(), folder / "w")
        loaded = steps.load_dwi_step(files[0], sel["plan_file"], folder / "w")
        fitted = steps.fit_rish_step(loaded["dwi_file"], sel["plan_file"], 4, folder / "w")
        rish.append([np.asanyarray(nib.load(f).dataobj) for f in fitted["rish_files"]])
    for shell in range(2):
        np.testing.assert_allclose(rish[1][shell], rish[0][shell], rtol=1e-4, atol=1e-7)
    assert not np.allclose(rish[0][0], rish[0][1], rtol=0.1)


def test_simulated_subject_keeps_every_shell(simulated_dataset, tmp_path, validator):
    """The simulator's 3T scan (b = 1000, 2000, 3000 and the b0s interleaved): every input volume
    is in the output, in the input's order; three RISH volumes per shell; valid BIDS."""
    root = simulated_dataset(4.0)
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant", "-w", str(tmp_path / "work"), "--skip-bids-validation",
                 "--nprocs", "1", "--session-label", "3T", "--method", "identity",
                 "--output-resolution", "native"]) == 0
    folder = out / "sub-01" / "ses-3T" / "dwi"
    dwi = folder / "sub-01_ses-3T_desc-7Tlike_dwi.nii.gz"
    in_stem = root / "sub-01" / "ses-3T" / "dwi" / "sub-01_ses-3T_dwi"
    bvals_in = np.loadtxt(f"{in_stem}.bval")
    np.testing.assert_allclose(np.loadtxt(folder / "sub-01_ses-3T_desc-7Tlike_dwi.bval"), bvals_in)
    assert nib.load(dwi).shape[-1] == nib.load(f"{in_stem}.nii.gz").shape[-1] == bvals_in.size
    assert {round(b, -3) for b in bvals_in} == {0, 1000, 2000, 3000}
    sidecar = json.loads((folder / "sub-01_ses-3T_model-rish_desc-source_dwimap.json").read_text())
    assert sidecar["VolumeShells"] == [1000.0] * 3 + [2000.0] * 3 + [3000.0] * 3
    assert nib.load(folder / "sub-01_ses-3T_model-rish_desc-source_dwimap.nii.gz").shape[-1] == 9
    env = dict(os.environ, DENO_DIR=str(tmp_path / "deno"))
    result = subprocess.run([validator, str(out)], capture_output=True, text=True, env=env, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout[-3000:]
