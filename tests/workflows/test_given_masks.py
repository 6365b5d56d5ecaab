"""Brain masks given with the input (a derivatives dataset, e.g. qsiprep's ``desc-brain_mask``),
and ``--skull-strip``, through the command line.

One derivatives dataset holds one session per case; a single participant-level call must use the
good masks (resampled when on another grid, thresholded with a recorded warning when not 0/1) and
fail only the runs whose mask is unusable, with a one-line reason and exit code 65.
"""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.cli.exitcodes import EX_DATAERR
from bids_dmri_ldm.cli.run import main

pytestmark = pytest.mark.slow

GOOD = ("fine", "prob")
BAD = {"empty": "the brain mask is empty", "fourd": "a brain mask must be a 3D image",
       "far": "does not overlap the DWI's field of view"}


def _derivative_dataset(make_bids_dataset):
    ds = make_bids_dataset(sessions=GOOD + tuple(BAD), inherit_gradients=False)
    description = json.loads((ds.root / "dataset_description.json").read_text())
    description.update(DatasetType="derivative", GeneratedBy=[{"Name": "qsiprep", "Version": "1.0.0"}])
    (ds.root / "dataset_description.json").write_text(json.dumps(description))
    affine, shape = ds.affine, ds.brain_mask.shape
    fine = affine.copy()
    fine[:3, :3] /= 2  # 1 mm: voxel (i, j, k) of the DWI is fine voxel (2i + 0.5, ...), same corner
    fine[:3, 3] -= fine[:3, :3] @ np.full(3, 0.5)
    ijk = np.stack(np.meshgrid(*[np.arange(2 * n) for n in shape], indexing="ij"), -1)
    coarse = np.floor(ijk / 2).astype(int)
    fine_mask = ds.wm_mask[tuple(np.moveaxis(coarse, -1, 0))].astype(np.uint8)  # the WM core, on 1 mm
    far = affine.copy()
    far[:3, 3] += 1000.0
    masks = {
        "fine": (fine_mask, fine),
        "prob": (np.where(ds.wm_mask, 0.7, 0.0).astype(np.float32), affine),
        "empty": (np.zeros(shape, np.uint8), affine),
        "fourd": (np.ones(shape + (2,), np.uint8), affine),
        "far": (np.ones(shape, np.uint8), far),
    }
    for ses, (data, aff) in masks.items():
        folder = ds.root / "sub-01" / f"ses-{ses}" / "dwi"
        nib.save(nib.Nifti1Image(data, aff), folder / f"sub-01_ses-{ses}_desc-brain_mask.nii.gz")
    return ds


def test_given_masks_used_resampled_or_refused(make_bids_dataset, tmp_path, capsys):
    ds = _derivative_dataset(make_bids_dataset)
    out, work = tmp_path / "out", tmp_path / "work"
    rc = main([str(ds.root), str(out), "participant", "-w", str(work), "--skip-bids-validation", "--nprocs", "1",
               "--method", "rish-global", "--model-dir", str(_rish_global_model(tmp_path)),
               "--output-resolution", "native"])
    assert rc == EX_DATAERR
    err = capsys.readouterr().err
    assert f"{len(BAD)} of {len(GOOD) + len(BAD)} run(s) failed" in err and "Traceback" not in err
    summary = max((out / "logs").glob("participant_*.tsv"), key=lambda p: p.stat().st_mtime_ns).read_text()
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in summary.splitlines()[1:]}
    for ses, fragment in BAD.items():
        status, reason = rows[f"sub-01_ses-{ses}"]
        assert status == "failed (bad-data)" and fragment in reason, (ses, status, reason)
        assert not (out / "sub-01" / f"ses-{ses}").exists() or not any((out / "sub-01" / f"ses-{ses}").rglob("*.*"))
    for ses in GOOD:
        assert rows[f"sub-01_ses-{ses}"][0] == "done"
        folder = out / "sub-01" / f"ses-{ses}" / "dwi"
        mask = np.asanyarray(nib.load(folder / f"sub-01_ses-{ses}_desc-brain_mask.nii.gz").dataobj) > 0
        np.testing.assert_array_equal(mask, ds.wm_mask)  # the given mask, brought to the DWI grid
        scale = np.asanyarray(nib.load(folder / f"sub-01_ses-{ses}_model-rish_desc-scale_dwimap.nii.gz").dataobj)
        np.testing.assert_allclose(scale[mask], np.broadcast_to(FACTORS, scale[mask].shape), rtol=1e-6)
        np.testing.assert_array_equal(scale[~mask], 1.0)
        dwi = np.asanyarray(nib.load(folder / f"sub-01_ses-{ses}_desc-7Tlike_dwi.nii.gz").dataobj)
        assert np.all(dwi[ds.brain_mask] > 0)  # the whole brain kept, beyond the given mask
        sidecar = json.loads((folder / f"sub-01_ses-{ses}_desc-7Tlike_dwi.json").read_text())
        warnings = [w for w in sidecar.get("RunWarnings", []) if "brain mask" in w]
        if ses == "prob":
            assert len(warnings) == 1 and "values other than 0 and 1 (values from 0.7 to 0.7)" in warnings[0]
        else:
            assert warnings == []
        assert any(s.endswith(f"sub-01_ses-{ses}_desc-brain_mask.nii.gz") for s in sidecar["Sources"])


FACTORS = (0.9, 0.8, 0.7)


def _rish_global_model(tmp_path):
    from bids_dmri_ldm.methods import RishGlobalModel, save_rish_global_model

    save_rish_global_model(RishGlobalModel(factors=FACTORS, training={"note": "test model"}),
                           tmp_path / "models" / "rish-global")
    return tmp_path / "models"


def test_skull_strip_zeroes_outside_the_mask(make_bids_dataset, tmp_path):
    """--skull-strip: the DWI and RISH maps are 0 outside the brain mask and say so
    (SkullStripped), the scale maps stay 1 there; the setting is recorded."""
    ds = make_bids_dataset(snr=30.0)  # noise everywhere: without --skull-strip no voxel would be 0
    out, work = tmp_path / "out", tmp_path / "work"
    assert main([str(ds.root), str(out), "participant", "-w", str(work), "--skip-bids-validation", "--nprocs", "1",
                 "--method", "identity", "--output-resolution", "native", "--skull-strip"]) == 0
    folder = out / "sub-01" / "dwi"
    mask = np.asanyarray(nib.load(folder / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    assert mask.sum() >= ds.brain_mask.sum() and np.all(mask[ds.brain_mask])
    dwi = np.asanyarray(nib.load(folder / "sub-01_desc-7Tlike_dwi.nii.gz").dataobj)
    assert np.all(dwi[~mask] == 0) and np.all(dwi[mask][:, 0] > 0)
    for name in ("source", "7Tlike"):
        rish = np.asanyarray(nib.load(folder / f"sub-01_model-rish_desc-{name}_dwimap.nii.gz").dataobj)
        assert np.all(rish[~mask] == 0) and np.all(rish[mask][:, 0] > 0)
        meta = json.loads((folder / f"sub-01_model-rish_desc-{name}_dwimap.json").read_text())
        assert meta["SkullStripped"] is True
    scale = np.asanyarray(nib.load(folder / "sub-01_model-rish_desc-scale_dwimap.nii.gz").dataobj)
    np.testing.assert_array_equal(scale, 1.0)
    assert json.loads((folder / "sub-01_model-rish_desc-scale_dwimap.json").read_text())["SkullStripped"] is False
    sidecar = json.loads((folder / "sub-01_desc-7Tlike_dwi.json").read_text())
    assert sidecar["SkullStripped"] is True and sidecar["Settings"]["SkullStrip"] is True
    assert "zero outside the brain mask" in sidecar["Description"]
    assert "SkullStripped" not in json.loads((folder / "sub-01_desc-brain_mask.json").read_text())

    # Without --skull-strip the same run keeps every voxel (a changed setting needs --overwrite).
    assert main([str(ds.root), str(out), "participant", "-w", str(work), "--skip-bids-validation", "--nprocs", "1",
                 "--method", "identity", "--output-resolution", "native", "--overwrite"]) == 0
    dwi = np.asanyarray(nib.load(folder / "sub-01_desc-7Tlike_dwi.nii.gz").dataobj)
    assert np.all(dwi[mask] > 0) and np.all(dwi[..., :3] > 0)  # b0s: the source's noise, never zeroed
    assert np.mean(dwi[~mask] == 0) < 0.01  # air rebuilt from its noise (clipped >= 0 in a few directions)
    assert json.loads((folder / "sub-01_desc-7Tlike_dwi.json").read_text())["SkullStripped"] is False
