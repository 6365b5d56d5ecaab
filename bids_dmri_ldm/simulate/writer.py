"""Write simulated scans as a BIDS raw dataset with a ``derivatives/simulation`` ground truth.

Raw layout::

    dataset_description.json  README  participants.tsv  participants.json  .bidsignore
    sub-01/ses-3T/dwi/sub-01_ses-3T_dwi.{nii.gz,bval,bvec,json}
    sub-01/ses-7T/dwi/sub-01_ses-7T_dwi.{nii.gz,bval,bvec,json}
    derivatives/simulation/  (a derivative dataset, see :func:`write_truth`)

Ground truth per scan, on that scan's grid (``derivatives/simulation/sub-01/ses-3T/dwi/``):

- ``*_label-{WM,GM,CSF}_probseg.nii.gz``: tissue volume fractions;
- ``*_desc-brain_mask.nii.gz``: voxels with any brain tissue above 50 %;
- ``*_model-truth_param-rish_dwimap.nii.gz``: noiseless b = 1000 RISH L0, L2, L4 of S/S0
  (3 volumes; SH order 4, descoteaux07 legacy=False, unregularised least squares);
- ``*_model-truth_param-peaks_dwimap.nii.gz``: up to 3 fibre directions per voxel (9 volumes,
  x/y/z of peak 1, 2, 3 in world RAS axes) and ``*_param-peakfrac_dwimap``: their volume fractions;
- ``*_model-truth_param-gain_dwimap.nii.gz``: the receive field the signal was multiplied by.

``_dwimap`` with ``model-``/``param-`` follows the BIDS diffusion-derivatives proposal (BEP016),
which the released specification does not include yet, so the derivative's ``.bidsignore``
lists ``*_dwimap.*``; everything else is validated.

All files are written into a temporary folder by the caller, which moves it into place.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .._version import __version__
from ..io.nifti import save_nifti as write_nifti
from .acquisition import Protocol
from .anatomy import TISSUES
from .scan import ScanResult

BIDS_VERSION = "1.10.0"
CODE_URL = "https://github.com/bids-dmri-ldm/bids-dmri-ldm"
GENERATOR = "bids-dmri-ldm simulator"


def subject_label(index: int, total: int) -> str:
    """Zero-padded subject label (``01``, ``02`` ... at least two digits)."""
    return f"{index:0{max(2, len(str(total)))}d}"


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON (the caller's temporary folder makes it atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, repetition_time: float | None = None) -> None:
    """Save ``data`` with ``affine`` (scanner frame, mm, seconds); int16 data are stored unscaled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if repetition_time is not None and data.ndim == 4:
        zooms = image.header.get_zooms()
        image.header.set_zooms(zooms[:3] + (repetition_time,))
    write_nifti(image, path)  # nibabel's bytes, ISA-L gzip (the simulator's time was ~45 % zlib)


def write_gradients(stem: Path, bvals: np.ndarray, bvecs: np.ndarray) -> None:
    """FSL ``.bval`` (1 x N) and ``.bvec`` (3 x N) text files."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    Path(f"{stem}.bvec").write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs) + "\n")


def write_scan(root: Path, label: str, protocol: Protocol, result: ScanResult, provenance: dict) -> None:
    """Write one raw DWI run and its ground truth under ``root`` (the dataset being built)."""
    session = protocol.name
    stem = f"sub-{label}_ses-{session}"
    raw_dir = root / f"sub-{label}" / f"ses-{session}" / "dwi"
    save_nifti(raw_dir / f"{stem}_dwi.nii.gz", result.dwi, result.affine, protocol.repetition_time_s)
    write_gradients(raw_dir / f"{stem}_dwi", result.bvals, result.bvecs)
    write_json(raw_dir / f"{stem}_dwi.json", protocol.sidecar(result.dwi.shape[:3]))
    write_truth(root / "derivatives" / "simulation", label, session, result, provenance)


def write_truth(deriv_root: Path, label: str, session: str, result: ScanResult, provenance: dict) -> None:
    """Ground-truth maps of one scan in the simulation derivative dataset."""
    stem = f"sub-{label}_ses-{session}"
    out_dir = deriv_root / f"sub-{label}" / f"ses-{session}" / "dwi"
    source = f"bids:raw:sub-{label}/ses-{session}/dwi/{stem}_dwi.nii.gz"
    common = {"SkullStripped": False, "Sources": [source], "SpatialReference": source}
    for channel, tissue in enumerate(TISSUES):
        save_nifti(out_dir / f"{stem}_label-{tissue}_probseg.nii.gz", result.tissue[..., channel], result.affine)
        write_json(out_dir / f"{stem}_label-{tissue}_probseg.json",
                   {**common, "Description": f"{tissue} volume fraction (partial-volume ground truth)"})
    brain = (result.tissue.sum(axis=-1) > 0.5).astype(np.uint8)
    save_nifti(out_dir / f"{stem}_desc-brain_mask.nii.gz", brain, result.affine)
    write_json(out_dir / f"{stem}_desc-brain_mask.json",
               {**common, "Type": "Brain", "Description": "WM + GM + CSF fraction above 0.5"})
    maps = {
        "rish": (result.rish, {
            "Description": "Noiseless RISH features of S/S0 on the b=1000 shell (volumes: L0, L2, L4)",
            "RISHOrders": [0, 2, 4], "Shell": 1000, "SHOrderMax": 4,
            "SHBasis": "descoteaux07 (dipy, legacy=False, orthonormal)", "Fit": "unregularised least squares",
        }),
        "peaks": (result.peak_directions.reshape(result.peak_directions.shape[:3] + (9,)), {
            "Description": "Fibre directions, strongest first (volumes: x, y, z of peaks 1-3, world RAS axes); "
                           "zero where a peak is absent",
        }),
        "peakfrac": (result.peak_fractions, {
            "Description": "Voxel volume fraction of each fibre peak's population (at most the WM fraction in total; weaker populations beyond the third are left out)",
        }),
        "gain": (result.receive_field, {"Description": "Multiplicative receive/B1 field applied to the signal"}),
    }
    for param, (data, extra) in maps.items():
        name = f"{stem}_model-truth_param-{param}_dwimap"
        save_nifti(out_dir / f"{name}.nii.gz", np.ascontiguousarray(data, dtype=np.float32), result.affine)
        write_json(out_dir / f"{name}.json", {**common, **extra, "Simulation": provenance})


def write_dataset_files(root: Path, labels_paired: list[str], labels_3t_only: list[str], participants: dict[str, dict], settings: dict) -> None:
    """Dataset-level files of the raw dataset and of the simulation derivative."""
    write_json(root / "dataset_description.json", {
        "Name": "Simulated paired 3T/7T diffusion MRI (HCP-like)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["bids-dmri-ldm developers"],
        "GeneratedBy": [{"Name": GENERATOR, "Version": __version__, "CodeURL": CODE_URL}],
        "HowToAcknowledge": "Simulated data; no human subjects.",
    })
    (root / "README").write_text(_readme(labels_paired, labels_3t_only, settings))
    lines = ["participant_id\tage\tsex\tsessions"]
    for label in labels_paired + labels_3t_only:
        info = participants[label]
        lines.append(f"sub-{label}\t{info['age']}\t{info['sex']}\t{info['sessions']}")
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    write_json(root / "participants.json", {
        "age": {"Description": "Simulated age", "Units": "year"},
        "sex": {"Description": "Simulated sex", "Levels": {"M": "male", "F": "female"}},
        "sessions": {"Description": "Sessions of this participant (3T only, or paired 3T and 7T)"},
    })
    deriv = root / "derivatives" / "simulation"
    write_json(deriv / "dataset_description.json", {
        "Name": "Ground truth of the simulated paired 3T/7T dataset",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": GENERATOR, "Version": __version__, "CodeURL": CODE_URL}],
        "SourceDatasets": [{"URL": "bids:raw:"}],
        "DatasetLinks": {"raw": "../../"},
    })
    (deriv / ".bidsignore").write_text(
        "# BEP016-style diffusion-model maps (model-/param- entities, _dwimap suffix) are not in the\n"
        "# released BIDS specification yet.\n*_dwimap.nii.gz\n*_dwimap.json\n"
    )
    (deriv / "README").write_text(
        "Ground truth written by the bids-dmri-ldm simulator next to the raw data: tissue volume\n"
        "fractions (probseg), brain masks, fibre peaks and fractions, the receive field, and the\n"
        "noiseless b=1000 RISH features (L0, L2, L4) of each scan, on that scan's own grid.\n"
        f"Simulation settings: {json.dumps(settings, sort_keys=True)}\n"
    )


def _readme(labels_paired: list[str], labels_3t_only: list[str], settings: dict) -> str:
    return (
        "Simulated paired 3T/7T diffusion MRI\n"
        "====================================\n\n"
        "Written by the bids-dmri-ldm simulator (python -m bids_dmri_ldm.simulate). No human data:\n"
        "brain-shaped phantoms built from the MNI152 2009a tissue maps shipped with nilearn, with a\n"
        "random smooth deformation per subject, synthetic fibre bundles with crossings, a\n"
        "stick/zeppelin/GM/CSF signal model weighted by exp(-TE/T2) per compartment, HCP-like\n"
        "3T (1.25 mm, TE 89.5 ms, 18 b0 + 3 x 90 directions at b=1000/2000/3000) and 7T (1.05 mm,\n"
        "TE 71.2 ms, 15 b0 + 2 x 64 directions at b=1000/2000) acquisitions, partial volume, a 7T\n"
        "receive field and Rician noise.\n\n"
        f"Paired subjects (ses-3T and ses-7T): {', '.join('sub-' + l for l in labels_paired) or 'none'}\n"
        f"3T-only subjects: {', '.join('sub-' + l for l in labels_3t_only) or 'none'}\n\n"
        "Ground truth: derivatives/simulation/.\n"
        f"Settings: {json.dumps(settings, sort_keys=True)}\n"
    )


def replace_directory(staging: Path, target: Path, overwrite: bool) -> None:
    """Move the finished ``staging`` folder to ``target`` (same file system), atomically.

    An existing empty ``target`` is replaced by the rename itself; a non-empty one only with
    ``overwrite`` (moved aside first and removed after the new folder is in place).
    """
    import shutil

    old = None
    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{target} exists and is not empty (use --overwrite)")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    elif target.exists():
        target.rmdir()
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
