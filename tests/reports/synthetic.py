"""Tiny synthetic 3T input and 7T-like derivatives with known answers, for the report tests.

Geometry: an ellipsoidal brain; its inner core is white-matter-like (a
prolate tensor, FA ~ 0.8, principal direction along voxel axis x in the left
half and along y in the right half); the rest is isotropic (FA 0). The scale
maps are lambda_l = ``WM_LAMBDA[l]`` in the white-matter core and 1 elsewhere,
the predicted RISH = lambda_l^2 x source RISH (paper Eq. 2 inverted), so the
report's summary numbers have known values.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_dmri_ldm.reports.participant import DERIVATIVE_NAMES

SHAPE_OUT = (22, 26, 20)
VOXEL_OUT = 2.0
VOXEL_IN = 2.5
ORDERS = (0, 2, 4)
WM_LAMBDA = {0: 0.9, 2: 0.8, 4: 0.7}
N_B0 = 2


def _affine(voxel: float, shape) -> np.ndarray:
    """LAS affine (x flipped, det < 0: FSL bvecs are in voxel axes as stored)."""
    affine = np.diag([-voxel, voxel, voxel, 1.0])
    affine[:3, 3] = [voxel * (shape[0] - 1) / 2, -voxel * (shape[1] - 1) / 2, -voxel * (shape[2] - 1) / 2]
    return affine


def gradient_scheme(seed: int = 0, shells=((1000.0, 30),)):
    """b0s then shells of random unit directions: ``bvals (N,)``, ``bvecs (N, 3)``."""
    rng = np.random.default_rng(seed)
    bvals = [np.zeros(N_B0)]
    bvecs = [np.zeros((N_B0, 3))]
    for b, n in shells:
        v = rng.normal(size=(n, 3))
        bvecs.append(v / np.linalg.norm(v, axis=1, keepdims=True))
        bvals.append(np.full(n, b))
    return np.concatenate(bvals), np.concatenate(bvecs)


def tissue(shape, affine, radii=(19.0, 23.0, 17.0)):
    """Brain mask, WM core and principal direction (voxel axes) at world positions of a grid."""
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = nib.affines.apply_affine(affine, ijk)
    r = np.sqrt(((xyz / np.asarray(radii)) ** 2).sum(axis=1))
    brain = (r < 1.0).reshape(shape)
    wm = (r < 0.6).reshape(shape)
    e1 = np.zeros((xyz.shape[0], 3))
    left = xyz[:, 0] < 0
    e1[left, 0] = 1.0
    e1[~left, 1] = 1.0
    return brain, wm, e1.reshape(shape + (3,))


def simulate_dwi(shape, affine, bvals, bvecs, radii=(19.0, 23.0, 17.0), s0=1000.0, l_par=1.7e-3,
                 l_perp=0.3e-3, d_iso=0.8e-3):
    """Noiseless DWI ``(X, Y, Z, N)``: prolate tensor in WM, isotropic elsewhere in the brain."""
    brain, wm, e1 = tissue(shape, affine, radii)
    cos2 = np.einsum("xyzc,nc->xyzn", e1.astype(np.float32), bvecs.astype(np.float32)) ** 2
    adc = np.where(wm[..., None], np.float32(l_perp) + np.float32(l_par - l_perp) * cos2,
                   np.float32(d_iso))
    data = np.float32(s0) * np.exp(-bvals.astype(np.float32) * adc)
    data[~brain] = 5.0
    return data.astype(np.float32), brain, wm


def _save(img_data, affine, path: Path, dtype=np.float32, slope=None):
    img = nib.Nifti1Image(img_data.astype(dtype), affine)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _write_gradients(bval: Path, bvec: Path, bvals, bvecs):
    np.savetxt(bval, bvals[None], fmt="%g")
    np.savetxt(bvec, bvecs.T, fmt="%.6f")


def make_dataset(root: Path, label: str = "01", uncertainty: bool = True, seed: int = 0,
                 shape_out=SHAPE_OUT, voxel_out: float = VOXEL_OUT) -> dict:
    """Write a raw BIDS dataset and a derivative dataset with one processed run.

    Layout: ``root/raw`` (3T DWI with b=1000 and b=2000 shells, gradients
    inherited from the dataset root, int16 with a scale factor) and
    ``root/out`` (derivatives named as in ``reports.participant.DERIVATIVE_NAMES``).

    Returns
    -------
    dict
        ``out`` (derivative root), ``dwi`` (7T-like DWI path), ``raw``, and
        the output-grid arrays ``mask``, ``wm``.
    """
    raw, out = root / "raw", root / "out"
    voxel_in = voxel_out * VOXEL_IN / VOXEL_OUT
    # 3T source: coarser grid, two shells, gradients at the dataset root.
    shape_in = tuple(round(n * voxel_out / voxel_in) for n in shape_out)
    affine_in = _affine(voxel_in, shape_in)
    bvals_in, bvecs_in = gradient_scheme(seed, ((1000.0, 30), (2000.0, 15)))
    radii = 0.43 * np.asarray(shape_out) * voxel_out
    data_in, _, _ = simulate_dwi(shape_in, affine_in, bvals_in, bvecs_in, radii)
    (raw).mkdir(parents=True, exist_ok=True)
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.10.0"}))
    _write_gradients(raw / "dwi.bval", raw / "dwi.bvec", bvals_in, bvecs_in)
    src = raw / f"sub-{label}" / "dwi" / f"sub-{label}_dwi.nii.gz"
    _save(np.rint(data_in / 0.5), affine_in, src, dtype=np.int16, slope=0.5)
    # 7T-like output: b0 + b=1000 shell on the output grid; slightly lower diffusivity.
    affine_out = _affine(voxel_out, shape_out)
    bvals_out = np.concatenate([bvals_in[:N_B0], bvals_in[N_B0:N_B0 + 30]])
    bvecs_out = np.concatenate([bvecs_in[:N_B0], bvecs_in[N_B0:N_B0 + 30]])
    data_out, mask, wm = simulate_dwi(shape_out, affine_out, bvals_out, bvecs_out, radii,
                                  l_perp=0.25e-3)
    ddir = out / f"sub-{label}" / "dwi"
    prefix = ddir / f"sub-{label}_res-2_"
    dwi = Path(str(prefix) + "desc-7Tlike_dwi.nii.gz")
    name = {role: Path(str(prefix) + names[0]) for role, names in DERIVATIVE_NAMES.items()}
    _save(data_out, affine_out, dwi)
    _write_gradients(name["bval"], name["bvec"], bvals_out, bvecs_out)
    _save(mask.astype(np.uint8), affine_out, name["mask"], np.uint8)
    rng = np.random.default_rng(seed)
    base = np.stack([np.full(shape_out, 2.0), np.full(shape_out, 0.3), np.full(shape_out, 0.05)], -1)
    source = base * (1 + 0.3 * wm[..., None]) * (1 + 0.05 * rng.standard_normal(tuple(shape_out) + (3,)))
    source *= mask[..., None]
    scale = np.ones(tuple(shape_out) + (3,))
    for i, order in enumerate(ORDERS):
        scale[wm, i] = WM_LAMBDA[order]
    _save(source, affine_out, name["rish_source"])
    _save(source * scale**2, affine_out, name["rish_predicted"])
    _save(scale, affine_out, name["scale"])
    if uncertainty:
        _save(0.01 * source * (1 + wm[..., None]), affine_out, name["uncertainty"])
    sidecar = {
        "Description": "7T-like diffusion MRI synthesised from 3T",
        "Sources": [f"bids:raw:sub-{label}/dwi/sub-{label}_dwi.nii.gz"],
        "SkullStripped": False,
        "Method": "ldm",
        "Model": {"Name": "demo", "Version": "0.1.0", "Checksum": "sha256:0123abcd"},
        "Settings": {"t0": [0.3, 0.3, 0.2], "guidance": [1.5, 1.0, 1.0], "ddim_steps": 50,
                     "seed": 2024, "num_samples": 4, "shell": 1000},
        "SoftwareVersions": {"bids-dmri-ldm": "0.1.0", "torch": "2.13.0"},
        "RunTimeSeconds": 12.5,
        "Device": "cpu",
        "Warnings": ["12 voxels with NaN/Inf were set to 0", "shell tolerance 100 s/mm² used"],
    }
    name["sidecar"].write_text(json.dumps(sidecar, indent=2))
    (out / "dataset_description.json").write_text(json.dumps({
        "Name": "bids-dmri-ldm", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "bids-dmri-ldm"}], "DatasetLinks": {"raw": raw.resolve().as_uri()}}))
    return {"out": out, "raw": raw, "dwi": dwi, "mask": mask, "wm": wm, "label": label,
            "names": name, "source": src}
