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
- ``*_model-truth_param-gain_dwimap.nii.gz``: the intensity gain (B1 transmit x receive) the
  signal was multiplied by; ``*_param-sigma_dwimap``: the noise SD of each voxel;
- ``*_model-truth_param-graddev_dwimap.nii.gz`` (only when the scan had gradient non-linearity):
  the gradient deviation tensor in the HCP ``grad_dev.nii.gz`` layout (9 volumes, FSL convention,
  see :func:`.fields.grad_dev_volumes`).

A dataset made with a held-out-only physics preset (``--physics shifted``) names it under
``SimulationPhysicsPreset`` in both ``dataset_description.json`` files (and in their ``Name``), so
nobody trains on it by mistake (:func:`~bids_dmri_ldm.bidsio.heldout.is_shifted_dataset`; the group level refuses it).

``_dwimap`` with ``model-``/``param-`` follows the BIDS diffusion-derivatives proposal (BEP016),
which the released specification does not include yet, so the derivative's ``.bidsignore``
lists ``*_dwimap.*``; everything else is validated.

All files are written into a temporary folder by the caller, which moves it into place.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from .._version import __version__
from ..io.nifti import save_nifti as write_nifti
from .acquisition import Protocol
from .anatomy import TISSUES
from ..bidsio.heldout import HELD_OUT_PRESETS, PRESET_KEY
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
        "gain": (result.gain, {"Description": "Intensity gain applied to the signal: spin-echo B1 transmit factor "
                                               "sin(kappa pi/2)^3 times the receive sensitivity"}),
        "sigma": (result.noise_sd, {"Description": "Noise standard deviation of each voxel (same units as the DWI; "
                                                   "real and imaginary parts, before the magnitude)"}),
    }
    if result.grad_dev is not None:
        maps["graddev"] = (result.grad_dev, {
            "Description": "Gradient deviation tensor L used by the simulation, in the layout of HCP's grad_dev.nii.gz: "
                           "volume 3*j+i holds L[i, j] in the voxel axes of the DWI (the frame of its FSL bvecs); "
                           "a volume with bvec v and b-value b was acquired with v_eff = (I + L) v, "
                           "b_eff = |v_eff|^2 b (FSL convention, bedpostx -g)",
            "GradientIsocentreMm": None if result.isocentre is None else [float(v) for v in result.isocentre],
        })
    for param, (data, extra) in maps.items():
        name = f"{stem}_model-truth_param-{param}_dwimap"
        save_nifti(out_dir / f"{name}.nii.gz", np.ascontiguousarray(data, dtype=np.float32), result.affine)
        write_json(out_dir / f"{name}.json", {**common, **extra, "Simulation": provenance})


def write_dataset_files(
    root: Path,
    labels_paired: list[str],
    labels_3t_only: list[str],
    participants: dict[str, dict],
    settings: dict,
    physics: str = "default",
) -> None:
    """Dataset-level files of the raw dataset and of the simulation derivative.

    ``physics`` is the preset name, written under :data:`~bids_dmri_ldm.bidsio.heldout.PRESET_KEY`; a held-out-only
    preset is also spelled out in ``Name`` and ``GeneratedBy[0].Description``.
    """
    held_out = physics in HELD_OUT_PRESETS
    suffix = f" [{physics.upper()} PHYSICS: held-out evaluation only, do not train on it]" if held_out else ""
    generated_by = {"Name": GENERATOR, "Version": __version__, "CodeURL": CODE_URL,
                    "Description": f"physics preset '{physics}'" + (" (held-out evaluation only)" if held_out else "")}
    write_json(root / "dataset_description.json", {
        "Name": "Simulated paired 3T/7T diffusion MRI (HCP-like)" + suffix,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["bids-dmri-ldm developers"],
        "GeneratedBy": [generated_by],
        "HowToAcknowledge": "Simulated data; no human subjects.",
        PRESET_KEY: physics,
    })
    (root / "README").write_text(_readme(labels_paired, labels_3t_only, settings, physics))
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
        "Name": "Ground truth of the simulated paired 3T/7T dataset" + suffix,
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [{"URL": "bids:raw:"}],
        "DatasetLinks": {"raw": "../../"},
        PRESET_KEY: physics,
    })
    (deriv / ".bidsignore").write_text(
        "# BEP016-style diffusion-model maps (model-/param- entities, _dwimap suffix) are not in the\n"
        "# released BIDS specification yet.\n*_dwimap.nii.gz\n*_dwimap.json\n"
    )
    (deriv / "README").write_text(
        "Ground truth written by the bids-dmri-ldm simulator next to the raw data: tissue volume\n"
        "fractions (probseg), brain masks, fibre peaks and fractions, the intensity gain and noise SD\n"
        "maps, the gradient deviation tensor (HCP grad_dev layout), and the noiseless b=1000 RISH\n"
        "features (L0, L2, L4) of each scan, on that scan's own grid.\n"
        + _held_out_warning(physics)
        + f"Simulation settings: {json.dumps(settings, sort_keys=True)}\n"
    )


def _held_out_warning(physics: str) -> str:
    if physics not in HELD_OUT_PRESETS:
        return f"Physics preset: {physics}.\n"
    return (f"Physics preset: {physics}. HELD-OUT EVALUATION ONLY: these physics differ from the default\n"
            "preset on purpose; do not train on this dataset.\n")


def _readme(labels_paired: list[str], labels_3t_only: list[str], settings: dict, physics: str = "default") -> str:
    return (
        "Simulated paired 3T/7T diffusion MRI\n"
        "====================================\n\n"
        "Written by the bids-dmri-ldm simulator (python -m bids_dmri_ldm.simulate). No human data:\n"
        "brain-shaped phantoms built from the MNI152 2009a tissue maps shipped with nilearn, with a\n"
        "random smooth deformation per subject, synthetic fibre bundles with crossings, a\n"
        "stick/zeppelin/GM/CSF signal model weighted by exp(-TE/T2) per compartment (tract-specific\n"
        "intra-axonal fractions), HCP-like\n"
        "3T (18 b0 + 3 x 90 directions at b=1000/2000/3000) and 7T (15 b0 + 2 x 64 directions at\n"
        "b=1000/2000) acquisitions, partial volume, gradient non-linearity, diffusion-time dependent\n"
        "extra-axonal diffusivity, B1 transmit/receive fields and Rician noise with a spatially\n"
        "varying SD.\n"
        + _held_out_warning(physics) + "\n"
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
    from ..io.files import replace_dir

    if target.exists() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{target} exists and is not empty (use --overwrite)")
    elif target.exists():
        target.rmdir()
    replace_dir(staging, target)
