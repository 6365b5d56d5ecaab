"""Derivative inputs (qsiprep-style): validated as derivatives, names keep ``space-``.

A qsiprep-style dataset (``DatasetType: derivative``, ``sub-21_space-T1w_desc-preproc_dwi`` with
its ``desc-brain_mask``, sidecars without ``SpatialReference``/``SkullStripped``, a figure the
BIDS schema does not know) is refused by ``bids-validator-deno`` as a whole; the app holds it to
what it reads (:mod:`bids_dmri_ldm.bidsio.validate`), so the participant level runs on it without
``--skip-bids-validation``, and every output keeps ``space-T1w``.
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

from bids_dmri_ldm.bidsio.validate import (
    is_derivative_dataset,
    relaxed_reason,
    validate_dataset,
)
from bids_dmri_ldm.cli.exitcodes import ValidationFailed
from bids_dmri_ldm.cli.run import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import _write_gradients, dwi_signal, gradient_table  # noqa: E402

SHAPE = (12, 12, 10)


def write_qsiprep_like(root: Path, snr: float | None = None) -> dict:
    """One participant as qsiprep writes it: ``space-T1w`` DWI + gradients + sidecar + brain mask.

    The brain mask is the phantom's brain eroded by one voxel, so that a mask the app computed
    itself (median_otsu) cannot be mistaken for it. Returns paths and the mask array.
    """
    folder = root / "sub-21" / "dwi"
    folder.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "qsiprep output", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsiprep", "Version": "1.0.0"}]}))
    (root / "README").write_text("qsiprep-like derivatives written by the bids-dmri-ldm tests\n")
    bvals, bvecs = gradient_table()
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    data, brain, _ = dwi_signal(SHAPE, bvals, bvecs, (1.0, 1.0, 0.0), 3.0, snr=snr)
    stem = folder / "sub-21_space-T1w_desc-preproc_dwi"
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, f"{stem}.nii.gz")
    _write_gradients(stem, bvals, bvecs)
    # qsiprep-like sidecar: no SpatialReference / SkullStripped (the derivative rules want them)
    Path(f"{stem}.json").write_text(json.dumps({"MagneticFieldStrength": 3.0, "EchoTime": 0.0895,
                                                "RepetitionTime": 5.52}))
    from scipy.ndimage import binary_erosion

    mask = binary_erosion(brain)
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    mask_img.header.set_xyzt_units("mm", "sec")
    nib.save(mask_img, folder / "sub-21_space-T1w_desc-brain_mask.nii.gz")
    (folder / "sub-21_space-T1w_desc-brain_mask.json").write_text(json.dumps({"Type": "Brain"}))
    figures = root / "sub-21" / "figures"
    figures.mkdir()
    (figures / "sub-21_carpetplot.svg").write_text("<svg/>\n")  # a file BIDS does not describe
    return {"dwi": Path(f"{stem}.nii.gz"), "mask": mask, "bvals": bvals}


# --------------------------------------------------------------------------- validation rules
def test_relaxed_reasons_name_only_what_the_app_does_not_need():
    dwi = "/sub-21/dwi/sub-21_space-T1w_desc-preproc_dwi.nii.gz"
    assert relaxed_reason({"code": "SIDECAR_KEY_REQUIRED", "subCode": "SpatialReference", "location": dwi})
    assert relaxed_reason({"code": "SIDECAR_KEY_REQUIRED", "subCode": "SkullStripped", "location": dwi})
    assert relaxed_reason({"code": "ALL_FILENAME_RULES_HAVE_ISSUES",
                           "location": dwi.replace(".nii.gz", ".bval")})
    assert relaxed_reason({"code": "NOT_INCLUDED", "location": "/sub-21/figures/x.svg"})
    # what the app reads is still held to the rules
    assert relaxed_reason({"code": "SIDECAR_KEY_REQUIRED", "subCode": "EchoTime", "location": dwi}) is None
    assert relaxed_reason({"code": "NIFTI_HEADER_UNREADABLE", "location": dwi}) is None
    assert relaxed_reason({"code": "JSON_INVALID", "location": dwi.replace(".nii.gz", ".json")}) is None
    assert relaxed_reason({"code": "ALL_FILENAME_RULES_HAVE_ISSUES", "location": dwi}) is None
    assert relaxed_reason({"code": "JSON_KEY_REQUIRED", "location": "/dataset_description.json"}) is None
    assert relaxed_reason({"code": "MISSING_DATASET_DESCRIPTION"}) is None


def test_derivative_input_validated_as_a_derivative(tmp_path, validator, caplog):
    """The official validator rejects the qsiprep-like dataset; the app accepts it and says which
    errors it set aside. A stray file is an error in a raw dataset but not in a derivative one,
    and a corrupt DWI still fails a derivative input (16)."""
    root = tmp_path / "qsiprep"
    write_qsiprep_like(root)
    env = dict(os.environ, DENO_DIR=str(tmp_path / "deno"))
    assert subprocess.run([validator, str(root)], capture_output=True, env=env, check=False).returncode != 0
    assert is_derivative_dataset(root)
    with caplog.at_level("WARNING", logger="bids_dmri_ldm.bids"):
        assert validate_dataset(root, tmp_path) is True
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "derivative dataset" in message and "SIDECAR_KEY_REQUIRED SpatialReference" in message

    # the same stray file in a raw dataset is an error
    description = json.loads((root / "dataset_description.json").read_text())
    raw = tmp_path / "raw"
    (raw / "sub-01" / "anat").mkdir(parents=True)
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "r", "BIDSVersion": "1.9.0"}))
    (raw / "README").write_text("raw\n")
    (raw / "sub-01" / "anat" / "notes_of_the_day.txt").write_text("x\n")
    with pytest.raises(ValidationFailed):
        validate_dataset(raw, tmp_path)

    # a DWI the app reads is still validated
    (root / "sub-21" / "dwi" / "sub-21_space-T1w_desc-preproc_dwi.nii.gz").write_bytes(b"not a nifti")
    assert description["DatasetType"] == "derivative"
    with pytest.raises(ValidationFailed) as err:
        validate_dataset(root, tmp_path)
    assert err.value.exit_code == 16


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_qsiprep_style_input_keeps_space_and_mask(tmp_path, validator):
    """Participant level on a qsiprep-style input, validation on: every output name keeps
    ``space-T1w``, the input's brain mask is the mask used, SpatialReference names the source,
    and the validator accepts the outputs."""
    root = tmp_path / "qsiprep"
    written = write_qsiprep_like(root)
    out, work = tmp_path / "out", tmp_path / "work"
    rc = main([str(root), str(out), "participant", "-w", str(work), "--nprocs", "1",
               "--method", "identity", "--output-resolution", "native"])
    assert rc == 0
    files = sorted(p for p in (out / "sub-21").rglob("*") if p.is_file())
    assert len(files) >= 12 and all("_space-T1w_" in p.name for p in files), [p.name for p in files]
    folder = out / "sub-21" / "dwi"
    dwi = folder / "sub-21_space-T1w_desc-7Tlike_dwi.nii.gz"
    assert dwi.is_file()
    mask = np.asanyarray(nib.load(folder / "sub-21_space-T1w_desc-brain_mask.nii.gz").dataobj) > 0
    np.testing.assert_array_equal(mask, written["mask"])  # the input's mask, not a computed one
    sidecar = json.loads(dwi.with_name(dwi.name.replace(".nii.gz", ".json")).read_text())
    source = "bids:raw:sub-21/dwi/sub-21_space-T1w_desc-preproc_dwi.nii.gz"
    assert sidecar["SpatialReference"] == source and sidecar["Sources"][0] == source
    assert "bids:raw:sub-21/dwi/sub-21_space-T1w_desc-brain_mask.nii.gz" in sidecar["Sources"]
    # the report finds every derivative by the space- names and the source through the relative
    # DatasetLinks.raw
    from bids_dmri_ldm.reports.participant import load_run

    assert (out / "sub-21.html").is_file() and load_run(dwi).problems == {}
    assert json.loads((out / "dataset_description.json").read_text())["DatasetLinks"] == {"raw": "../qsiprep"}
    log = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "is a derivative dataset" in log
    env = dict(os.environ, DENO_DIR=str(tmp_path / "deno"))
    result = subprocess.run([validator, str(out)], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
