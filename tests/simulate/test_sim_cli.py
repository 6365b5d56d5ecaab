"""Command line of the simulator: usage errors (exit 64), a valid BIDS dataset, determinism."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.simulate.cli import main

SCALE = "8"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "bids"
    assert main([str(out), "--subjects", "1", "--only-3t", "1", "--voxel-scale", SCALE, "--seed", "5"]) == 0
    return out


@pytest.mark.parametrize(
    "args",
    [
        ["--subjects", "0"],
        ["--subjects", "-2"],
        ["--only-3t", "-1"],
        ["--subjects", "two"],
        ["--voxel-scale", "0"],
        ["--voxel-scale", "100"],
        ["--voxel-scale", "nan"],
        ["--snr-3t", "-5"],
        ["--t2-7t", "47,47"],
        ["--bogus"],
    ],
)
def test_usage_errors_exit_64_in_one_line(tmp_path, capsys, args):
    assert main([str(tmp_path / "out"), *args]) == 64
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err
    assert not (tmp_path / "out").exists()


def test_missing_out_dir_and_real_process_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bids_dmri_ldm.simulate", "--subjects", "1"], capture_output=True, text=True, check=False)
    assert proc.returncode == 64 and proc.stderr.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_non_empty_out_dir_is_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main([str(out), "--voxel-scale", SCALE]) == 64
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_dataset_folder_has_normal_permissions(dataset):
    """Readable by other users like a plain mkdir (not mkdtemp's 0700), for containers run as another UID."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dataset.stat().st_mode) == 0o777 & ~umask


def test_layout_sidecars_and_truth(dataset):
    for session, n_vol, te in (("3T", 288, 0.0895), ("7T", 143, 0.0712)):
        stem = dataset / "sub-01" / f"ses-{session}" / "dwi" / f"sub-01_ses-{session}_dwi"
        image = nib.load(f"{stem}.nii.gz")
        assert image.shape[-1] == n_vol and image.get_data_dtype() == np.int16
        assert np.linalg.det(image.affine[:3, :3]) < 0
        bvals = np.loadtxt(f"{stem}.bval")
        bvecs = np.loadtxt(f"{stem}.bvec")
        assert bvals.shape == (n_vol,) and bvecs.shape == (3, n_vol)
        sidecar = json.loads(Path(f"{stem}.json").read_text())
        assert sidecar["EchoTime"] == pytest.approx(te)
        assert sidecar["MagneticFieldStrength"] == float(session[0])
        truth = dataset / "derivatives" / "simulation" / "sub-01" / f"ses-{session}" / "dwi"
        rish = nib.load(truth / f"sub-01_ses-{session}_model-truth_param-rish_dwimap.nii.gz")
        assert rish.shape == image.shape[:3] + (3,)
        np.testing.assert_allclose(rish.affine, image.affine)
    assert not (dataset / "sub-02" / "ses-7T").exists() and (dataset / "sub-02" / "ses-3T" / "dwi").is_dir()
    participants = (dataset / "participants.tsv").read_text().splitlines()
    assert participants[0].split("\t")[0] == "participant_id" and len(participants) == 3


def test_official_validator_passes_on_raw_and_derivative(dataset, tmp_path):
    validator = shutil.which("bids-validator-deno", path=str(Path(sys.executable).parent)) or shutil.which("bids-validator-deno")
    assert validator, "bids-validator-deno (test extra) is not installed"
    env = {**os.environ, "DENO_DIR": str(tmp_path / "deno")}
    for root in (dataset, dataset / "derivatives" / "simulation"):
        proc = subprocess.run([validator, "--format", "json", str(root)], capture_output=True, text=True, env=env, timeout=300, check=False)
        errors = [i for i in json.loads(proc.stdout)["issues"]["issues"] if i.get("severity") == "error"]
        assert proc.returncode == 0 and not errors, errors[:3]


def test_pybids_loads_raw_and_derivatives(dataset, tmp_path):
    import bids

    layout = bids.BIDSLayout(dataset, validate=False, derivatives=True, database_path=tmp_path / "db")
    runs = layout.get(suffix="dwi", extension=[".nii", ".nii.gz"])
    assert len(runs) == 3
    assert {r.entities["session"] for r in runs} == {"3T", "7T"}
    assert layout.get_metadata(runs[0].path)["RepetitionTime"] > 0
    assert layout.get_bval(runs[0].path).endswith(".bval")
    assert len(layout.get(scope="derivatives", suffix="probseg", extension=".nii.gz")) == 9


def test_same_seed_gives_identical_data_whatever_nprocs(dataset, tmp_path):
    again = tmp_path / "again"
    assert main([str(again), "--subjects", "1", "--voxel-scale", SCALE, "--seed", "5", "--nprocs", "2"]) == 0
    for session in ("3T", "7T"):
        name = f"sub-01/ses-{session}/dwi/sub-01_ses-{session}_dwi.nii.gz"
        np.testing.assert_array_equal(np.asarray(nib.load(dataset / name).dataobj), np.asarray(nib.load(again / name).dataobj))


def test_overwrite_replaces_an_existing_dataset(dataset, tmp_path):
    out = tmp_path / "over"
    shutil.copytree(dataset / "derivatives", out / "derivatives")
    (out / "stale.txt").write_text("old")
    assert main([str(out), "--subjects", "1", "--voxel-scale", "12", "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "dataset_description.json").is_file()
    assert not list(tmp_path.glob(".over*"))  # no staging or old folders left behind
