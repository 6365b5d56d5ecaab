"""End to end: the command line on tiny BIDS datasets, outputs checked for science and BIDS.

Datasets: the conftest synthetic one (two sessions, ``dwi.bval``/``dwi.bvec`` inherited from the
dataset root, a single-tensor white-matter core with a known fibre direction) and dipy's real
``small_64D`` crop (oblique affine, NaN b0 bvec row). Every run goes through
``bids_dmri_ldm.cli.run.main`` with ``--skip-bids-validation`` (the input is validated in the
layout tests); the *outputs* are validated with ``bids-validator-deno``.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.cli.run import main
from bids_dmri_ldm.core.gradients import load_gradients
from bids_dmri_ldm.core.metrics import angular_error_deg, tensor_fit
from bids_dmri_ldm.methods import RishGlobalModel, save_rish_global_model

pytestmark = pytest.mark.slow


def run_cli(bids_dir: Path, out: Path, work: Path, *extra: str) -> int:
    return main([str(bids_dir), str(out), "participant", "-w", str(work), "--skip-bids-validation",
                 "--nprocs", "1", *extra])


def tree_digest(root: Path) -> dict[str, tuple[str, float]]:
    """sha256 and mtime of every file under ``root``."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
            for p in sorted(root.rglob("*")) if p.is_file()}


def validate(validator: str, root: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DENO_DIR=str(tmp_path / "deno"))
    return subprocess.run([validator, str(root)], capture_output=True, text=True, env=env, timeout=120,
                          check=False)


def load_output(dwi: Path):
    img = nib.load(dwi)
    bvals, bvecs = load_gradients(str(dwi).replace(".nii.gz", ".bval"), str(dwi).replace(".nii.gz", ".bvec"))
    return np.asanyarray(img.dataobj, dtype=np.float32), img.affine, bvals, bvecs


def test_identity_native_two_sessions(make_bids_dataset, tmp_path, validator):
    """identity at native resolution: valid outputs, same fibre direction and signal as the input,
    input untouched, rerun skips, --overwrite redoes."""
    ds = make_bids_dataset(sessions=("1", "2"))
    before = tree_digest(ds.root)
    out, work = tmp_path / "out", tmp_path / "work"
    assert run_cli(ds.root, out, work, "--method", "identity", "--output-resolution", "native") == 0

    for ses, dwi_in in zip(("1", "2"), ds.dwi_files):
        folder = out / "sub-01" / f"ses-{ses}" / "dwi"
        stem = f"sub-01_ses-{ses}"
        names = [f"{stem}_desc-7Tlike_dwi.{e}" for e in ("nii.gz", "bval", "bvec", "json")] + [
            f"{stem}_desc-brain_mask.nii.gz", f"{stem}_model-rish_desc-source_dwimap.nii.gz",
            f"{stem}_model-rish_desc-7Tlike_dwimap.nii.gz", f"{stem}_model-rish_desc-scale_dwimap.nii.gz"]
        for name in names:
            assert (folder / name).is_file(), name
        data, affine, bvals, bvecs = load_output(folder / f"{stem}_desc-7Tlike_dwi.nii.gz")
        np.testing.assert_allclose(affine, ds.affine, atol=1e-6)
        # Every input volume, in the input's order: b0s, the b=1000 shell (SH-fitted) and the
        # six b=2000 volumes (too few directions for order 4: carried through unchanged).
        np.testing.assert_allclose(bvals, ds.bvals)
        np.testing.assert_allclose(bvecs, ds.bvecs, atol=1e-6)
        source = np.asanyarray(nib.load(dwi_in).dataobj, dtype=np.float32)
        carried = (ds.bvals <= 50) | (np.abs(ds.bvals - 2000) <= 100)
        np.testing.assert_array_equal(data[..., carried], source[..., carried])
        brain = ds.brain_mask
        # lambda = 1 reproduces the input up to the SH truncation at order 4 (tensor signal), in
        # the whole field of view: nothing outside the brain mask is zeroed or changed.
        err = np.sum((data[brain] - source[brain]) ** 2) / np.sum(source[brain] ** 2)
        assert err < 1e-4
        np.testing.assert_allclose(data[~brain], source[~brain], atol=1e-3)
        mask = np.asanyarray(nib.load(folder / f"{stem}_desc-brain_mask.nii.gz").dataobj) > 0
        np.testing.assert_array_equal(mask, brain)  # the automatic mask finds the phantom's brain
        # Principal diffusion direction unchanged in the white-matter core.
        _, evec_out = tensor_fit(data, bvals, bvecs, ds.wm_mask)
        angles = angular_error_deg(evec_out[ds.wm_mask], ds.principal_direction)
        assert np.max(angles) < 1.0
        scale = np.asanyarray(nib.load(folder / f"{stem}_model-rish_desc-scale_dwimap.nii.gz").dataobj)
        np.testing.assert_array_equal(scale, 1.0)
        sidecar = json.loads((folder / f"{stem}_desc-7Tlike_dwi.json").read_text())
        assert sidecar["Sources"][0] == f"bids:raw:sub-01/ses-{ses}/dwi/{stem}_dwi.nii.gz"
        assert {"bids:raw:dwi.bval", "bids:raw:dwi.bvec"} <= set(sidecar["Sources"])
        assert sidecar["Method"] == "identity" and sidecar["SkullStripped"] is False
        assert [(r["BValue"], r["Translated"], r["SHFitted"]) for r in sidecar["Shells"]] == [
            (1000.0, True, True), (2000.0, False, False)]
        assert any("b=2000 shell (6 volumes) is carried through unchanged" in w for w in sidecar["RunWarnings"])
        assert sidecar["Settings"]["SkullStrip"] is False
        assert "Resolution" not in sidecar and "res-" not in (folder / f"{stem}_desc-7Tlike_dwi.json").name

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["DatasetLinks"]["raw"] == "../" + ds.root.name  # relative: no mount point
    assert (out / description["DatasetLinks"]["raw"]).resolve() == ds.root.resolve()
    result = validate(validator, out, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert tree_digest(ds.root) == before, "the input dataset was modified"

    # Rerun: complete runs are skipped (nothing rewritten); --overwrite rewrites them.
    outputs = sorted((out / "sub-01").rglob("*.*"))
    mtimes = {p: p.stat().st_mtime_ns for p in outputs}
    assert run_cli(ds.root, out, work, "--method", "identity", "--output-resolution", "native") == 0
    assert {p: p.stat().st_mtime_ns for p in outputs} == mtimes
    latest = max((out / "logs").glob("participant_*.tsv"), key=lambda p: p.stat().st_mtime_ns)
    assert "skipped" in latest.read_text()
    # Outputs made with other settings are not silently mixed or replaced.
    assert run_cli(ds.root, out, work, "--method", "rish-global", "--output-resolution", "native") != 0
    assert "other settings" in max((out / "logs").glob("participant_*.tsv"), key=lambda p: p.stat().st_mtime_ns).read_text()
    assert {p: p.stat().st_mtime_ns for p in outputs} == mtimes
    inodes = {p: p.stat().st_ino for p in outputs}
    assert run_cli(ds.root, out, work, "--method", "identity", "--output-resolution", "native",
                   "--overwrite") == 0
    # rewritten: each sidecar and table is a new file (atomic replace: a new inode), whatever the
    # clock did; each image is again a hard link to the work folder's result, which nipype reused
    work_inodes = {p.stat().st_ino for p in work.rglob("*.nii.gz")}
    images = [p for p in outputs if p.name.endswith(".nii.gz")]
    assert images and all(p.stat().st_ino in work_inodes for p in images)
    assert all(p.stat().st_ino != inodes[p] for p in outputs if p not in images)


def test_rish_global_resampled(make_bids_dataset, tmp_path, validator):
    """rish-global at 1.05 mm with MultiProc: res- entity, scale maps = model factors, predicted
    RISH = factor^2 x source RISH, fibre direction kept, valid BIDS."""
    ds = make_bids_dataset(sessions=("1", "2"))
    factors = (0.9, 0.8, 0.7)
    model_dir = tmp_path / "models" / "rish-global"
    save_rish_global_model(RishGlobalModel(factors=factors, training={"note": "test model"}), model_dir)
    out, work = tmp_path / "out", tmp_path / "work"
    rc = main([str(ds.root), str(out), "participant", "-w", str(work), "--skip-bids-validation", "--nprocs", "2",
               "--method", "rish-global", "--model-dir", str(tmp_path / "models"), "--output-resolution", "1.05"])
    assert rc == 0
    folder = out / "sub-01" / "ses-1" / "dwi"
    stem = "sub-01_ses-1_res-1p05"
    dwi = folder / f"{stem}_desc-7Tlike_dwi.nii.gz"
    data, affine, bvals, bvecs = load_output(dwi)
    np.testing.assert_allclose(np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0)), 1.05, atol=1e-6)
    # Same axis directions as the input: the FSL bvecs of the input stay valid.
    np.testing.assert_allclose(affine[:3, :3] / 1.05, ds.affine[:3, :3] / 2.0, atol=1e-6)
    sidecar = json.loads(dwi.with_name(dwi.name.replace(".nii.gz", ".json")).read_text())
    assert "1.05 mm" in sidecar["Resolution"]
    assert sidecar["Model"]["SHA256"] and sidecar["Shells"][0]["ScaleFactors"] == list(factors)

    mask = np.asanyarray(nib.load(folder / f"{stem}_desc-brain_mask.nii.gz").dataobj) > 0
    scale = np.asanyarray(nib.load(folder / f"{stem}_model-rish_desc-scale_dwimap.nii.gz").dataobj)
    np.testing.assert_allclose(scale[mask], np.broadcast_to(factors, scale[mask].shape), rtol=1e-6)
    np.testing.assert_array_equal(scale[~mask], 1.0)
    source = np.asanyarray(nib.load(folder / f"{stem}_model-rish_desc-source_dwimap.nii.gz").dataobj)
    predicted = np.asanyarray(nib.load(folder / f"{stem}_model-rish_desc-7Tlike_dwimap.nii.gz").dataobj)
    np.testing.assert_allclose(predicted[mask], source[mask] * np.square(factors), rtol=1e-4, atol=1e-7)

    # Fibre direction in the white-matter core (output voxels mapped to the nearest input voxel,
    # one voxel away from the core's edge).
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape[:3]], indexing="ij"), axis=-1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    src_ijk = np.rint((world - ds.affine[:3, 3]) @ np.linalg.inv(ds.affine[:3, :3]).T).astype(int)
    inside = np.all((src_ijk >= 0) & (src_ijk < np.array(ds.wm_mask.shape)), axis=-1)
    from scipy.ndimage import binary_erosion

    core = binary_erosion(ds.wm_mask)
    sel = np.zeros(data.shape[:3], bool)
    sel[inside] = core[tuple(src_ijk[inside].T)]
    assert sel.sum() > 20
    _, evec = tensor_fit(data, bvals, bvecs, sel)
    assert np.median(angular_error_deg(evec[sel], ds.principal_direction)) < 2.0
    result = validate(validator, out, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]


def test_a_model_retrained_in_place_is_not_served_from_the_work_cache(make_bids_dataset, tmp_path):
    """The group level rewrites OUT/models/<method> in place; a participant rerun with the same
    work folder (and --overwrite) must use the new model's maps, not the cached node's."""
    ds = make_bids_dataset(sessions=("1",))
    models, out, work = tmp_path / "models", tmp_path / "out", tmp_path / "work"
    folder = out / "sub-01" / "ses-1" / "dwi"
    for factors in ((0.9, 0.8, 0.7), (0.6, 0.5, 0.4)):
        save_rish_global_model(RishGlobalModel(factors=factors), models / "rish-global")
        assert run_cli(ds.root, out, work, "--method", "rish-global", "--model-dir", str(models),
                       "--output-resolution", "native", "--overwrite") == 0
        mask = np.asanyarray(nib.load(folder / "sub-01_ses-1_desc-brain_mask.nii.gz").dataobj) > 0
        scale = np.asanyarray(nib.load(folder / "sub-01_ses-1_model-rish_desc-scale_dwimap.nii.gz").dataobj)
        np.testing.assert_allclose(scale[mask], np.broadcast_to(factors, scale[mask].shape), rtol=1e-6)


@pytest.mark.parametrize("resolution", ["native", "1.05"])
def test_small64d_real_oblique(small64d_bids, tmp_path, validator, resolution):
    """dipy's real oblique crop: bvecs (NaN b0 row) written clean and unchanged, the output grid
    keeps the oblique axis directions, and the fibre directions agree with the input's."""
    root, dwi_in, bvals_in, bvecs_in = small64d_bids
    out, work = tmp_path / "out", tmp_path / "work"
    assert run_cli(root, out, work, "--method", "identity", "--output-resolution", resolution) == 0
    res = "" if resolution == "native" else "_res-1p05"
    dwi = out / "sub-01" / "dwi" / f"sub-01{res}_desc-7Tlike_dwi.nii.gz"
    data, affine, bvals, bvecs = load_output(dwi)
    img_in = nib.load(dwi_in)
    np.testing.assert_allclose(bvals, bvals_in)  # one b0 first in the input too
    np.testing.assert_allclose(bvecs, np.nan_to_num(bvecs_in), atol=1e-6)
    zooms_in = np.sqrt(np.sum(img_in.affine[:3, :3] ** 2, axis=0))
    zooms_out = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    np.testing.assert_allclose(affine[:3, :3] / zooms_out, img_in.affine[:3, :3] / zooms_in, atol=1e-6)
    assert np.sign(np.linalg.det(affine)) == np.sign(np.linalg.det(img_in.affine))

    data_in = np.asanyarray(img_in.dataobj, dtype=np.float32)
    mask_in = data_in[..., 0] > 0
    fa_in, evec_in = tensor_fit(data_in, bvals_in, np.nan_to_num(bvecs_in), mask_in)
    mask_out = np.asanyarray(nib.load(str(dwi).replace("desc-7Tlike_dwi", "desc-brain_mask")).dataobj) > 0
    _, evec_out = tensor_fit(data, bvals, bvecs, mask_out)
    # Compare at output voxels whose centre maps into an input voxel with FA > 0.3.
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape[:3]], indexing="ij"), axis=-1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    src = np.rint((world - img_in.affine[:3, 3]) @ np.linalg.inv(img_in.affine[:3, :3]).T).astype(int)
    inside = np.all((src >= 1) & (src < np.array(fa_in.shape) - 1), axis=-1) & mask_out
    picked = np.zeros(inside.shape, bool)
    picked[inside] = fa_in[tuple(src[inside].T)] > 0.3
    assert picked.sum() >= 10
    angles = angular_error_deg(evec_out[picked], evec_in[tuple(src[picked].T)])
    assert np.median(angles) < (3.0 if resolution == "native" else 10.0)
    result = validate(validator, out, tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
