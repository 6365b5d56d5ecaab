"""``python -m bids_dmri_ldm.hcp2bids`` on a small fake HCP tree made here.

The tree mimics the HCP Young Adult "Diffusion Preprocessed" packages: ``<id>/T1w/Diffusion``
(3T) and ``<id>/T1w/Diffusion_7T`` (7T) with ``data.nii.gz``, ``bvals``, ``bvecs`` (3 rows, FSL),
``nodif_brain_mask.nii.gz`` and ``grad_dev.nii.gz``. Subjects 100307 and 100408 have both
sessions, 200109 only 3T. The data are the conftest single-tensor phantom (toy 3T/7T tensors),
so the group level has a known answer; the HCP mask is the phantom brain eroded by one voxel,
so the mask the participant level used can be told from one it computed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.cli.run import main as app_main
from bids_dmri_ldm.hcp2bids import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import dwi_signal, gradient_table  # noqa: E402

SHAPE = (12, 12, 10)
AFFINE = np.diag([-2.0, 2.0, 2.0, 1.0])  # LAS like HCP's T1w space; FSL bvecs = voxel axes
FIBRE = (1.0, 1.0, 0.0)
SUBJECTS = {"100307": ("3T", "7T"), "100408": ("3T", "7T"), "200109": ("3T",)}


def _save(path: Path, data: np.ndarray) -> None:
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def write_fake_hcp(root: Path, subjects=SUBJECTS) -> Path:
    """The fake HCP tree (see the module docstring); returns ``root``."""
    from scipy.ndimage import binary_erosion

    bvals, bvecs = gradient_table()
    for subject, sessions in subjects.items():
        for session in sessions:
            folder = root / subject / "T1w" / ("Diffusion" if session == "3T" else "Diffusion_7T")
            folder.mkdir(parents=True)
            data, brain, _ = dwi_signal(SHAPE, bvals, bvecs, FIBRE, 3.0 if session == "3T" else 7.0)
            _save(folder / "data.nii.gz", data)
            (folder / "bvals").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
            (folder / "bvecs").write_text(
                "\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs.T) + "\n")
            _save(folder / "nodif_brain_mask.nii.gz", binary_erosion(brain).astype(np.uint8))
            _save(folder / "grad_dev.nii.gz", np.zeros(SHAPE + (9,), np.float32))
        (root / subject / "T1w" / "T1w_acpc_dc_restore.nii.gz").write_bytes(b"")  # not read
    (root / "README.txt").write_text("not a subject\n")
    return root


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if ": error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _validate(validator: str, root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DENO_DIR=str(tmp_path / "deno"))
    return subprocess.run([validator, "--format", "json", str(root)], capture_output=True, text=True,
                          env=env, check=False)


# --------------------------------------------------------------------------- conversion
def test_hcp2bids_layout_links_and_sidecars(tmp_path, validator, capsys):
    hcp = write_fake_hcp(tmp_path / "HCP")
    bids = tmp_path / "bids"
    assert main([str(hcp), str(bids)]) == 0
    err = capsys.readouterr().err
    assert "no 7T data (folder absent) for 1 subject(s): 200109" in err  # reported, not fatal

    for subject, sessions in SUBJECTS.items():
        for session in ("3T", "7T"):
            folder = bids / f"sub-{subject}" / f"ses-{session}" / "dwi"
            stem = folder / f"sub-{subject}_ses-{session}_space-T1w"
            assert folder.is_dir() == (session in sessions)
            if session not in sessions:
                continue
            hcp_folder = hcp / subject / "T1w" / ("Diffusion" if session == "3T" else "Diffusion_7T")
            dwi = Path(f"{stem}_desc-preproc_dwi.nii.gz")
            # relative symbolic links to the HCP files, nothing copied
            for link, target in ((dwi, "data.nii.gz"), (Path(f"{stem}_desc-brain_mask.nii.gz"),
                                                        "nodif_brain_mask.nii.gz"),
                                 (Path(f"{stem}_graddev.nii.gz"), "grad_dev.nii.gz")):
                assert link.is_symlink() and not os.path.isabs(os.readlink(link)), link
                assert link.resolve() == (hcp_folder / target).resolve()
            # bvecs are FSL already: copied unchanged
            assert Path(f"{stem}_desc-preproc_dwi.bvec").read_text() == (hcp_folder / "bvecs").read_text()
            sidecar = json.loads(Path(f"{stem}_desc-preproc_dwi.json").read_text())
            expected = {"3T": (3.0, 0.0895, 5.52), "7T": (7.0, 0.0712, 7.0)}[session]
            assert (sidecar["MagneticFieldStrength"], sidecar["EchoTime"], sidecar["RepetitionTime"]) == expected
            assert sidecar["SkullStripped"] is False and sidecar["SpatialReference"].startswith("bids:hcp:")
            assert sidecar["GradientNonlinearity"]["File"] == (
                f"bids::sub-{subject}/ses-{session}/dwi/{stem.name}_graddev.nii.gz")
            mask_sidecar = json.loads(Path(f"{stem}_desc-brain_mask.json").read_text())
            assert mask_sidecar["Type"] == "Brain"

    description = json.loads((bids / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["DatasetLinks"] == {"hcp": "../HCP"}  # relative, no mount point
    assert "no 7T data (folder absent) for 1 subject(s): 200109" in (bids / "README").read_text()
    assert "sub-200109\t3T" in (bids / "participants.tsv").read_text()
    assert not list(tmp_path.glob(".bids.tmp-*"))  # the staging folder was renamed

    report = json.loads(_validate(validator, bids, tmp_path).stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert errors == []  # validator-clean as it is, no leniency needed


def test_hcp2bids_copy_and_subject_selection(tmp_path):
    hcp = write_fake_hcp(tmp_path / "HCP", {"100307": ("3T", "7T"), "100408": ("3T",)})
    bids = tmp_path / "bids"
    bids.mkdir()  # an empty folder is fine
    assert main([str(hcp), str(bids), "--subjects", "sub-100307", "--copy"]) == 0
    assert sorted(p.name for p in bids.glob("sub-*")) == ["sub-100307"]
    dwi = bids / "sub-100307" / "ses-7T" / "dwi" / "sub-100307_ses-7T_space-T1w_desc-preproc_dwi.nii.gz"
    assert not dwi.is_symlink()
    assert dwi.read_bytes() == (hcp / "100307" / "T1w" / "Diffusion_7T" / "data.nii.gz").read_bytes()


# --------------------------------------------------------------------------- bad input
def _break(hcp: Path, subject: str, folder: str, name: str, text: str | None) -> None:
    path = hcp / subject / "T1w" / folder / name
    if text is None:
        path.unlink()
    else:
        path.write_text(text)


@pytest.mark.parametrize("case, code, words", [
    ("mismatched-bvecs", 65, "b-values in bvals but"),
    ("volumes-vs-bvals", 65, "but bvals lists"),
    ("two-row-bvecs", 65, "3 rows"),
    ("unreadable-data", 65, "cannot be read"),
])
def test_hcp2bids_bad_data_exits_65_and_writes_nothing(tmp_path, capsys, case, code, words):
    hcp = write_fake_hcp(tmp_path / "HCP", {"100307": ("3T", "7T")})
    bvals = (hcp / "100307" / "T1w" / "Diffusion_7T" / "bvals").read_text().split()
    if case == "mismatched-bvecs":
        _break(hcp, "100307", "Diffusion_7T", "bvals", " ".join(bvals + ["1000"]) + "\n")
    elif case == "volumes-vs-bvals":
        rows = (hcp / "100307" / "T1w" / "Diffusion_7T" / "bvecs").read_text().splitlines()
        _break(hcp, "100307", "Diffusion_7T", "bvals", " ".join(bvals[:-1]) + "\n")
        _break(hcp, "100307", "Diffusion_7T", "bvecs", "\n".join(" ".join(r.split()[:-1]) for r in rows))
    elif case == "two-row-bvecs":
        rows = (hcp / "100307" / "T1w" / "Diffusion_7T" / "bvecs").read_text().splitlines()
        _break(hcp, "100307", "Diffusion_7T", "bvecs", "\n".join(rows[:2]) + "\n")
    else:
        (hcp / "100307" / "T1w" / "Diffusion_7T" / "data.nii.gz").write_bytes(b"\x1f\x8b truncated")
    bids = tmp_path / "bids"
    assert main([str(hcp), str(bids)]) == code
    line = _error_line(capsys.readouterr().err)
    assert words in line and "Diffusion_7T" in line
    assert not bids.exists() and not list(tmp_path.glob(".bids*"))  # nothing half-written


def test_hcp2bids_missing_parts(tmp_path, capsys):
    """A missing data.nii.gz skips that session (reported); with nothing left it is an error."""
    hcp = write_fake_hcp(tmp_path / "HCP", {"100307": ("3T", "7T")})
    _break(hcp, "100307", "Diffusion_7T", "data.nii.gz", None)
    assert main([str(hcp), str(tmp_path / "bids")]) == 0
    assert "7T skipped, 100307/T1w/Diffusion_7T has no data.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "bids" / "sub-100307" / "ses-7T").exists()
    _break(hcp, "100307", "Diffusion", "data.nii.gz", None)
    assert main([str(hcp), str(tmp_path / "bids2")]) == 66
    assert "no HCP diffusion run to convert" in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "bids2").exists()


def test_hcp2bids_usage_and_missing_input(tmp_path, capsys):
    hcp = write_fake_hcp(tmp_path / "HCP", {"100307": ("3T",)})
    assert main([]) == 64
    _error_line(capsys.readouterr().err)
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "b")]) == 66
    assert "does not exist" in _error_line(capsys.readouterr().err)
    assert main([str(hcp / "README.txt"), str(tmp_path / "b")]) == 66  # a file, not a folder
    assert "not a readable folder" in _error_line(capsys.readouterr().err)
    assert main([str(hcp), str(tmp_path / "b"), "--subjects", "999999"]) == 66
    assert "999999" in _error_line(capsys.readouterr().err)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert main([str(hcp), str(full)]) == 64
    assert "not an empty folder" in _error_line(capsys.readouterr().err)
    assert main([str(hcp), str(tmp_path / "b"), "--no-such-option"]) == 64
    assert not (tmp_path / "b").exists()


def test_hcp2bids_unwritable_parent_exits_73(tmp_path, capsys):
    hcp = write_fake_hcp(tmp_path / "HCP", {"100307": ("3T",)})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([str(hcp), str(blocker / "bids")]) == 73
    assert "cannot create" in _error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- into the app
def _wm_rish_factors(bvals, bvecs) -> np.ndarray:
    """sqrt(RISH 7T / RISH 3T) of the phantom's two white-matter tensors (the known answer)."""
    from bids_dmri_ldm.core.sh import SHModel, rish_features

    model = SHModel(bvecs[np.abs(bvals - 1000) <= 100], 4)
    shell, b0 = np.abs(bvals - 1000) <= 100, bvals <= 50
    rish = []
    for strength in (3.0, 7.0):
        data, _, wm = dwi_signal(SHAPE, bvals, bvecs, FIBRE, strength)
        voxel = data[wm][0]
        rish.append(rish_features((voxel[shell] / voxel[b0].mean()) @ model.fit_matrix.T, model.l_values))
    return np.sqrt(rish[1] / rish[0])


@pytest.mark.slow
def test_hcp2bids_output_runs_through_both_levels_with_validation(tmp_path):
    """The participant level runs on the hcp2bids output with validation on and uses the HCP
    mask; the group level pairs ses-3T with ses-7T (rish-global: the phantom's known factors)."""
    hcp = write_fake_hcp(tmp_path / "HCP")
    bids, out, work = tmp_path / "bids", tmp_path / "out", tmp_path / "work"
    assert main([str(hcp), str(bids)]) == 0

    assert app_main([str(bids), str(out), "participant", "-w", str(work), "--nprocs", "1",
                     "--participant-label", "100307", "--method", "identity",
                     "--output-resolution", "native"]) == 0
    folder = out / "sub-100307" / "ses-3T" / "dwi"
    stem = "sub-100307_ses-3T_space-T1w"
    assert (folder / f"{stem}_desc-7Tlike_dwi.nii.gz").is_file()
    assert not (out / "sub-100307" / "ses-7T").exists()  # 7T runs are targets, not translated
    used = np.asanyarray(nib.load(folder / f"{stem}_desc-brain_mask.nii.gz").dataobj) > 0
    hcp_mask = np.asanyarray(nib.load(hcp / "100307" / "T1w" / "Diffusion" / "nodif_brain_mask.nii.gz").dataobj) > 0
    np.testing.assert_array_equal(used, hcp_mask)
    sidecar = json.loads((folder / f"{stem}_desc-7Tlike_dwi.json").read_text())
    assert f"bids:raw:sub-100307/ses-3T/dwi/{stem}_desc-brain_mask.nii.gz" in sidecar["Sources"]

    group_out = tmp_path / "group"
    assert app_main([str(bids), str(group_out), "group", "-w", str(tmp_path / "gwork"),
                     "--method", "rish-global"]) == 0
    from bids_dmri_ldm.methods import load_rish_global_model

    model = load_rish_global_model(group_out / "models" / "rish-global")
    training = model.training
    pairs = [(r["source"], r["target"]) for r in training["runs"]]
    assert len(pairs) == 1 and "ses-3T" in pairs[0][0] and "ses-7T" in pairs[0][1]
    assert sorted(training["participants"] + training["validation_participants"]) == ["100307", "100408"]
    assert training["dataset"] == {"Name": "HCP preprocessed diffusion MRI (3T and 7T) as BIDS"}
    bvals, bvecs = gradient_table()
    np.testing.assert_allclose(model.factors[1:], _wm_rish_factors(bvals, bvecs)[1:], rtol=1e-3)
