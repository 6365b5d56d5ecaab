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

from bids_dmri_ldm.simulate import is_shifted_dataset
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
        # physics values out of range
        ["--physics", "fancy"],
        ["--grad-nonlin-3t", "0.9"],
        ["--grad-nonlin-7t", "-0.1"],
        ["--b1-field-7t", "2"],
        ["--receive-field", "-1"],
        ["--te-7t", "0.0712"],  # seconds instead of ms
        ["--timing-3t", "10.6,43.1"],  # delta > Delta
        ["--timing-7t", "50,30"],  # longer than the echo time
        ["--te-3t", "40"],  # shorter than the default 3T gradient timing
        ["--time-dependence", "9"],
        ["--diffusivities", "2.2,2.0,0.7,0.9,3000"],  # a unit mistake (um^2/s)
        ["--t2-3t", "80,55,76,-1"],
        ["--snr-7t", "0"],
        ["--intra-fraction", "1.5"],
        ["--tract-variation", "3"],
        ["--physics", "shifted", "--snr-3t", "nan"],
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


def test_package_import_leaves_numpy_unloaded():
    """``python -m bids_dmri_ldm.simulate`` imports the package before ``__main__`` limits BLAS
    threads: the package (and its is_shifted_dataset) must not import numpy (measured: +70 % CPU)."""
    code = "import sys, bids_dmri_ldm.simulate as s; assert callable(s.is_shifted_dataset); print('numpy' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


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


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    out = tmp_path_factory.mktemp("shifted") / "bids"
    assert main([str(out), "--subjects", "1", "--voxel-scale", "12", "--seed", "5", "--physics", "shifted", "--nprocs", "1"]) == 0
    return out


def test_shifted_physics_dataset_is_marked_for_held_out_evaluation_only(dataset, shifted):
    """--physics shifted: both dataset_description.json files say so; the helper finds it from any path."""
    for root in (shifted, shifted / "derivatives" / "simulation"):
        description = json.loads((root / "dataset_description.json").read_text())
        assert description["SimulationPhysicsPreset"] == "shifted"
        assert "held-out" in description["Name"] and "do not train" in description["Name"]
        assert is_shifted_dataset(root)
    assert is_shifted_dataset(shifted / "sub-01" / "ses-3T" / "dwi" / "sub-01_ses-3T_dwi.nii.gz")
    assert is_shifted_dataset(shifted / "derivatives" / "simulation" / "sub-01")
    assert "HELD-OUT EVALUATION ONLY" in (shifted / "README").read_text()
    assert json.loads((dataset / "dataset_description.json").read_text())["SimulationPhysicsPreset"] == "default"
    assert not is_shifted_dataset(dataset) and not is_shifted_dataset(dataset / "derivatives" / "simulation")
    assert not is_shifted_dataset(dataset.parent / "no-such-folder")


def test_shifted_physics_changes_voxel_size_echo_time_and_fields(dataset, shifted):
    default_3t = nib.load(dataset / "sub-01/ses-3T/dwi/sub-01_ses-3T_dwi.nii.gz")
    shifted_3t = nib.load(shifted / "sub-01/ses-3T/dwi/sub-01_ses-3T_dwi.nii.gz")
    assert default_3t.header.get_zooms()[:3] == pytest.approx((1.25 * 8,) * 3)
    assert shifted_3t.header.get_zooms()[:3] == pytest.approx((1.5 * 12,) * 3)
    assert json.loads((shifted / "sub-01/ses-3T/dwi/sub-01_ses-3T_dwi.json").read_text())["EchoTime"] == pytest.approx(0.080)
    assert json.loads((shifted / "sub-01/ses-7T/dwi/sub-01_ses-7T_dwi.json").read_text())["EchoTime"] == pytest.approx(0.060)
    truth = shifted / "derivatives/simulation/sub-01/ses-7T/dwi/sub-01_ses-7T_model-truth_param-rish_dwimap.json"
    provenance = json.loads(truth.read_text())["Simulation"]
    assert provenance["PhysicsPreset"] == "shifted" and provenance["T2Ms"]["csf"] == 800.0


def test_echo_time_option_reaches_the_sidecar(tmp_path):
    out = tmp_path / "te"
    assert main([str(out), "--voxel-scale", "12", "--te-3t", "95", "--nprocs", "1"]) == 0
    assert json.loads((out / "sub-01/ses-3T/dwi/sub-01_ses-3T_dwi.json").read_text())["EchoTime"] == pytest.approx(0.095)


def test_grad_dev_is_written_beside_the_truth(dataset):
    """Both sessions had gradient non-linearity (default: 3T strong, 7T weak): HCP-style grad_dev maps."""
    sizes = {}
    for session in ("3T", "7T"):
        name = dataset / f"derivatives/simulation/sub-01/ses-{session}/dwi/sub-01_ses-{session}_model-truth_param-graddev_dwimap"
        image = nib.load(f"{name}.nii.gz")
        assert image.shape[-1] == 9
        mask = nib.load(dataset / f"derivatives/simulation/sub-01/ses-{session}/dwi/sub-01_ses-{session}_desc-brain_mask.nii.gz").get_fdata() > 0
        sizes[session] = np.abs(np.asarray(image.dataobj)[mask]).max()
        assert "grad_dev" in json.loads(Path(f"{name}.json").read_text())["Description"]
    assert 0.02 < sizes["7T"] < sizes["3T"] < 0.3


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


def test_official_validator_passes_on_raw_and_derivative(dataset, shifted, tmp_path):
    validator = shutil.which("bids-validator-deno", path=str(Path(sys.executable).parent)) or shutil.which("bids-validator-deno")
    assert validator, "bids-validator-deno (test extra) is not installed"
    env = {**os.environ, "DENO_DIR": str(tmp_path / "deno")}
    for root in (dataset, dataset / "derivatives" / "simulation", shifted, shifted / "derivatives" / "simulation"):
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
