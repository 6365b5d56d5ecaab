"""Output integrity on a simulated subject: ``identity`` through the whole participant level loses
no brain voxel and scores like the untouched 3T scan against the noiseless 7T truth.

The subject is the project's simulator at ``--voxel-scale 4`` (3T 5 mm, 7T 4.2 mm); the output is
resampled to 4.2 mm, so the check covers the resampling path too. Scoring goes through the
evaluation code (:mod:`bids_dmri_ldm.evaluation.pipeline`) exactly as ``python -m
bids_dmri_ldm.evaluate`` does: maps of each DWI on its own grid, resampled into the 7T grid,
scored inside the simulator's brain mask; the raw 3T DWI is scored as a prediction.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.cli.run import main
from bids_dmri_ldm.core.resample import resample_mask
from bids_dmri_ldm.evaluation import discovery, pipeline

pytestmark = pytest.mark.slow


def _noiseless_row(truth, root: Path, dwi: Path, name: str):
    stem = str(dwi).removesuffix(".nii.gz")
    prediction = discovery.Prediction("01", dwi, Path(f"{stem}.bval"), Path(f"{stem}.bvec"), {"ses": "3T"})
    on_truth = pipeline.prediction_on_truth(prediction, truth, name, 1000.0, 100.0, root)
    rows = pipeline.score_participant(truth, [on_truth])
    return next(row for row in rows if row.reference == "noiseless7T")


def test_identity_loses_no_brain_voxel_and_scores_like_the_3t_scan(simulated_dataset, tmp_path):
    from bids import BIDSLayout

    root = simulated_dataset(4.0)
    out, work = tmp_path / "out", tmp_path / "work"
    assert main([str(root), str(out), "participant", "-w", str(work), "--skip-bids-validation", "--nprocs", "1",
                 "--method", "identity", "--output-resolution", "4.2"]) == 0
    dwi = out / "sub-01" / "ses-3T" / "dwi" / "sub-01_ses-3T_res-4p2_desc-7Tlike_dwi.nii.gz"
    img = nib.load(dwi)
    data = np.asanyarray(img.dataobj)

    # (a) No zero-valued voxel inside the truth brain (brought to the output grid): no b0 value is
    # 0 and no voxel's diffusion-weighted volumes are all 0. A single DW value may be 0 where the
    # rebuild clips S0 * sum C Y(g) at 0 (CSF, whose signal is at the noise floor): at b=1000 at
    # most 1e-4 of the values (measured 5e-5); more at the higher shells, where the order-4 fit
    # of noise-floor attenuations swings below 0 more often (measured 0.9 % at b=2000, 4.0 % at
    # b=3000; the input has 1e-5).
    truth_img = nib.load(root / "derivatives" / "simulation" / "sub-01" / "ses-3T" / "dwi" /
                         "sub-01_ses-3T_desc-brain_mask.nii.gz")
    brain = resample_mask(np.asanyarray(truth_img.dataobj) > 0, truth_img.affine, img.affine, img.shape[:3])
    assert brain.sum() > 1000
    bvals = np.loadtxt(str(dwi).replace(".nii.gz", ".bval"))  # every input volume, in the input's order
    b0 = bvals <= 50
    inside = data[brain]
    assert int(np.count_nonzero(np.any(inside[:, b0] == 0, axis=-1))) == 0
    assert int(np.count_nonzero(np.all(inside[:, ~b0] == 0, axis=-1))) == 0
    for shell, most in ((1000, 1e-4), (2000, 0.02), (3000, 0.08)):
        assert np.mean(inside[:, np.abs(bvals - shell) <= 100] == 0) <= most, shell

    # (b) RISH L0 against the noiseless 7T truth: identity within 1.2x of the untouched 3T scan.
    scan = discovery.find_seven_tesla_scans(BIDSLayout(str(root), validate=False), ["01"])["01"][0]
    truth = pipeline.prepare_truth(scan, root, "simulation", 1000.0, 100.0)
    assert truth.mask_source == "simulation"
    raw = root / "sub-01" / "ses-3T" / "dwi" / "sub-01_ses-3T_dwi.nii.gz"
    untouched = _noiseless_row(truth, root, raw, "3T")
    identity = _noiseless_row(truth, out, dwi, "identity")
    assert identity.coverage == untouched.coverage == 1.0  # every truth-brain voxel scored
    assert identity.n_voxels == untouched.n_voxels
    assert identity.scores["nmse_L0"] <= 1.2 * untouched.scores["nmse_L0"], (identity.scores, untouched.scores)
