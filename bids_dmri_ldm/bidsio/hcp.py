"""The HCP preprocessed diffusion layout as a BIDS derivative dataset (``hcp2bids``).

Input, one folder per subject (HCP Young Adult release, "Diffusion Preprocessed" packages)::

    HCP_DIR/<id>/T1w/Diffusion/{data.nii.gz,bvals,bvecs,nodif_brain_mask.nii.gz,grad_dev.nii.gz}
    HCP_DIR/<id>/T1w/Diffusion_7T/{...the same names...}

Output (``DatasetType: derivative``: the HCP data are preprocessed, in the subject's native
ACPC-aligned T1w space, which the names say with ``space-T1w`` as qsiprep does)::

    sub-<id>/ses-3T/dwi/sub-<id>_ses-3T_space-T1w_desc-preproc_dwi.{nii.gz,bval,bvec,json}
    sub-<id>/ses-3T/dwi/sub-<id>_ses-3T_space-T1w_desc-brain_mask.{nii.gz,json}
    sub-<id>/ses-3T/dwi/sub-<id>_ses-3T_space-T1w_graddev.nii.gz     (HCP grad_dev.nii.gz)
    sub-<id>/ses-7T/dwi/...                                            (from T1w/Diffusion_7T)

Images are symbolic links (relative) to the HCP files, or copies with ``copy=True``; the small
``bvals``/``bvecs`` text files are copied. Sidecars carry ``MagneticFieldStrength`` and the
protocols' ``EchoTime``/``RepetitionTime`` (:data:`HCP_SESSIONS`), ``SkullStripped`` and
``SpatialReference`` (derivative rules), ``Sources`` as ``bids:hcp:`` URIs and the gradient
nonlinearity file (``GradientNonlinearity``). The BIDS derivative rules have no name for DWI
gradient files nor for ``grad_dev``, so ``.bidsignore`` lists them; everything else passes
``bids-validator-deno``. A derivative dataset is what the participant level looks for masks in
(:func:`bids_dmri_ldm.bidsio.layout.find_brain_mask`), so each run's HCP mask is the mask used.

HCP bvecs are already in the FSL convention (image axes), as BIDS wants them: copied unchanged.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._version import __version__
from ..errors import BadDataError, MissingInputError
from .dataset import BIDS_VERSION, CODE_URL, dataset_link

LOGGER = logging.getLogger("bids_dmri_ldm.hcp2bids")

HCP_DATASET_KEY = "hcp"
"""Key of the HCP folder in ``DatasetLinks``; ``Sources`` are ``bids:hcp:<id>/T1w/...``."""
SPACE = "T1w"
_LABEL = re.compile(r"^[0-9a-zA-Z]+$")


@dataclass(frozen=True)
class HCPSession:
    """One HCP diffusion protocol: its folder under ``<id>/T1w`` and acquisition parameters.

    ``echo_time_s``/``repetition_time_s`` are the HCP Young Adult protocols' (3T: TE 89.5 ms,
    TR 5520 ms, https://www.humanconnectome.org/hcp-protocols-ya-3t-imaging; 7T: TE 71.2 ms,
    TR 7000 ms, https://www.humanconnectome.org/hcp-protocols-ya-7t-imaging and Vu et al.,
    NeuroImage 122:318-331, 2015).
    """

    label: str
    folder: str
    field_strength_t: float
    echo_time_s: float
    repetition_time_s: float


HCP_SESSIONS = (
    HCPSession("3T", "Diffusion", 3.0, 0.0895, 5.52),
    HCPSession("7T", "Diffusion_7T", 7.0, 0.0712, 7.0),
)

BIDSIGNORE_LINES = ("*_dwi.bval", "*_dwi.bvec", "*_graddev.nii.gz")
HCP_ACKNOWLEDGEMENT = (
    "Data were provided by the Human Connectome Project, WU-Minn Consortium (Principal "
    "Investigators: David Van Essen and Kamil Ugurbil; 1U54MH091657) funded by the 16 NIH "
    "Institutes and Centers that support the NIH Blueprint for Neuroscience Research; and by the "
    "McDonnell Center for Systems Neuroscience at Washington University."
)


@dataclass
class HCPRun:
    """The files of one subject's session, checked (:func:`inspect_session`)."""

    subject: str
    session: HCPSession
    folder: Path
    n_volumes: int
    mask: Path | None = None
    grad_dev: Path | None = None

    @property
    def data(self) -> Path:
        return self.folder / "data.nii.gz"

    @property
    def stem(self) -> str:
        """``sub-<id>_ses-<3T|7T>_space-T1w``."""
        return f"sub-{self.subject}_ses-{self.session.label}_space-{SPACE}"

    @property
    def out_folder(self) -> Path:
        """Folder of the run, relative to the BIDS root."""
        return Path(f"sub-{self.subject}") / f"ses-{self.session.label}" / "dwi"


@dataclass
class Inventory:
    """What an HCP folder holds: usable runs, sessions absent per label (subjects without
    ``T1w/Diffusion_7T``, common: most HCP subjects have no 7T scan) and why the rest was
    skipped."""

    runs: list[HCPRun] = field(default_factory=list)
    absent: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def absent_lines(self, shown: int | None = None) -> list[str]:
        """One line per session label: the subjects without that session's folder."""
        lines = []
        for label, subjects in self.absent.items():
            listed = subjects if shown is None else subjects[:shown]
            more = f" and {len(subjects) - len(listed)} more" if len(listed) < len(subjects) else ""
            lines.append(f"no {label} data (folder absent) for {len(subjects)} subject(s): "
                         f"{', '.join(listed)}{more}")
        return lines


# --------------------------------------------------------------------------- reading
def find_subjects(hcp_dir: Path, wanted: Sequence[str] = ()) -> list[str]:
    """Subject folders of ``hcp_dir`` (those with a ``T1w`` folder), or the ``wanted`` ones.

    Raises
    ------
    MissingInputError
        ``hcp_dir`` is not a readable folder, or a wanted subject has no folder (66).
    """
    if not hcp_dir.is_dir() or not os.access(hcp_dir, os.R_OK | os.X_OK):
        raise MissingInputError(f"HCP_DIR {hcp_dir} is not a readable folder")
    if wanted:
        labels = [str(w).removeprefix("sub-") for w in wanted]
        missing = [label for label in labels if not (hcp_dir / label).is_dir()]
        if missing:
            raise MissingInputError(f"subject folder(s) {', '.join(missing)} not found in {hcp_dir}")
        return list(dict.fromkeys(labels))
    try:
        return sorted(p.name for p in hcp_dir.iterdir() if (p / "T1w").is_dir())
    except OSError as err:
        raise MissingInputError(f"cannot list HCP_DIR {hcp_dir}: {err.strerror or err}") from None


def inspect_session(hcp_dir: Path, subject: str, session: HCPSession) -> HCPRun | str | None:
    """Check one session folder; the run, None when the folder is absent, or why it is skipped
    (a missing part).

    Raises
    ------
    BadDataError
        The parts are there but disagree: bvals/bvecs counts, the image's volume count or
        shape, an unreadable image (65).
    """
    import nibabel as nib

    folder = hcp_dir / subject / "T1w" / session.folder
    where = f"{subject}/T1w/{session.folder}"
    if not folder.is_dir():
        return None
    missing = [name for name in ("data.nii.gz", "bvals", "bvecs") if not (folder / name).is_file()]
    if missing:
        return f"{subject}: {session.label} skipped, {where} has no {' or '.join(missing)}"
    bvals, bvecs = _read_gradients(folder, where)
    try:
        shape = nib.load(folder / "data.nii.gz").shape
    except Exception as err:  # nibabel raises several types for unreadable/truncated files
        raise BadDataError(f"{where}/data.nii.gz cannot be read: {err}") from None
    if len(shape) != 4 or shape[3] != bvals.size:
        raise BadDataError(f"{where}/data.nii.gz has shape {tuple(shape)} but bvals lists "
                           f"{bvals.size} volumes")
    run = HCPRun(subject, session, folder, int(shape[3]))
    mask = folder / "nodif_brain_mask.nii.gz"
    if mask.is_file():
        try:
            mask_shape = nib.load(mask).shape
        except Exception as err:  # noqa: BLE001 - as above
            raise BadDataError(f"{where}/nodif_brain_mask.nii.gz cannot be read: {err}") from None
        if tuple(mask_shape[:3]) != tuple(shape[:3]) or len(mask_shape) > 3 and mask_shape[3] != 1:
            raise BadDataError(f"{where}/nodif_brain_mask.nii.gz has shape {tuple(mask_shape)}, "
                               f"the data {tuple(shape[:3])}")
        run.mask = mask
    else:
        LOGGER.warning("%s: %s has no nodif_brain_mask.nii.gz; the app will compute a mask",
                       subject, where)
    if (folder / "grad_dev.nii.gz").is_file():
        run.grad_dev = folder / "grad_dev.nii.gz"
    return run


def _read_gradients(folder: Path, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``bvals`` (N,) and ``bvecs`` (3, N) of an HCP folder, checked for shape and values."""
    try:
        bvals = np.loadtxt(folder / "bvals", ndmin=1, dtype=np.float64)
        bvecs = np.loadtxt(folder / "bvecs", ndmin=2, dtype=np.float64)
    except (OSError, ValueError) as err:
        raise BadDataError(f"{where}: bvals/bvecs are not numeric tables: {err}") from None
    if bvals.ndim != 1 or bvecs.shape[0] != 3:
        raise BadDataError(f"{where}: bvecs must have 3 rows (FSL layout), found {bvecs.shape[0]}")
    if bvecs.shape[1] != bvals.size:
        raise BadDataError(f"{where}: {bvals.size} b-values in bvals but {bvecs.shape[1]} "
                           "vectors in bvecs")
    if not (np.isfinite(bvals).all() and np.isfinite(bvecs).all()) or (bvals < 0).any():
        raise BadDataError(f"{where}: bvals/bvecs hold negative or non-finite values")
    return bvals, bvecs


def inventory(hcp_dir: Path, subjects: Sequence[str] = ()) -> Inventory:
    """Every usable run of the (selected) subjects, and the reasons for what was skipped."""
    found = Inventory()
    for subject in find_subjects(hcp_dir, subjects):
        if not _LABEL.match(subject):
            found.skipped.append(f"{subject}: not a valid BIDS label (letters and digits only)")
            continue
        for session in HCP_SESSIONS:
            result = inspect_session(hcp_dir, subject, session)
            if result is None:
                found.absent.setdefault(session.label, []).append(subject)
            else:
                (found.runs if isinstance(result, HCPRun) else found.skipped).append(result)
    return found


# --------------------------------------------------------------------------- writing
def write_dataset(runs: Sequence[HCPRun], staging: Path, final: Path, hcp_dir: Path,
                  copy: bool = False, skipped: Sequence[str] = ()) -> None:
    """Write the BIDS derivative dataset of ``runs`` into ``staging``, which the caller then
    renames to ``final`` (symbolic links are made relative to ``final``'s location);
    ``skipped`` (one line each) goes into the README."""
    for run in runs:
        _write_run(run, staging, final, hcp_dir, copy)
    _write_dataset_files(runs, staging, final, hcp_dir, copy, skipped)


def _place(src: Path, dst: Path, final_dst: Path, copy: bool) -> None:
    """Copy ``src`` to ``dst``, or link ``dst`` to it by a path relative to ``final_dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copyfile(src, dst)
    else:
        os.symlink(os.path.relpath(os.path.realpath(src), os.path.realpath(final_dst.parent)), dst)


def _hcp_uri(path: Path, hcp_dir: Path) -> str:
    return f"bids:{HCP_DATASET_KEY}:{Path(path).relative_to(hcp_dir).as_posix()}"


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _write_run(run: HCPRun, staging: Path, final: Path, hcp_dir: Path, copy: bool) -> None:
    folder = staging / run.out_folder
    final_folder = final / run.out_folder
    folder.mkdir(parents=True, exist_ok=True)
    dwi = f"{run.stem}_desc-preproc_dwi"
    _place(run.data, folder / f"{dwi}.nii.gz", final_folder / f"{dwi}.nii.gz", copy)
    shutil.copyfile(run.folder / "bvals", folder / f"{dwi}.bval")
    shutil.copyfile(run.folder / "bvecs", folder / f"{dwi}.bvec")
    dwi_uri = f"bids::{(run.out_folder / f'{dwi}.nii.gz').as_posix()}"
    sidecar = {
        "Description": f"HCP minimally preprocessed diffusion data ({run.session.label}, "
                       f"T1w/{run.session.folder}/data.nii.gz): corrected for distortions, eddy "
                       "currents, motion and gradient nonlinearity, in the subject's native "
                       "ACPC-aligned T1w space",
        "MagneticFieldStrength": run.session.field_strength_t,
        "EchoTime": run.session.echo_time_s,
        "RepetitionTime": run.session.repetition_time_s,
        "SkullStripped": False,
        "SpatialReference": f"bids:{HCP_DATASET_KEY}:{run.subject}/T1w/T1w_acpc_dc_restore.nii.gz",
        "Sources": [_hcp_uri(run.folder / name, hcp_dir) for name in ("data.nii.gz", "bvals", "bvecs")],
    }
    if run.grad_dev is not None:
        graddev = f"{run.stem}_graddev.nii.gz"
        _place(run.grad_dev, folder / graddev, final_folder / graddev, copy)
        sidecar["GradientNonlinearity"] = {
            "File": f"bids::{(run.out_folder / graddev).as_posix()}",
            "Source": _hcp_uri(run.grad_dev, hcp_dir),
            "Description": "HCP grad_dev.nii.gz: per-voxel deviation of the gradient coils' field "
                           "from the nominal one (9 volumes), to correct b-values and directions "
                           "voxel-wise (e.g. FSL bedpostx -g); not used by bids-dmri-ldm",
        }
    _write_json(folder / f"{dwi}.json", sidecar)
    if run.mask is not None:
        mask = f"{run.stem}_desc-brain_mask"
        _place(run.mask, folder / f"{mask}.nii.gz", final_folder / f"{mask}.nii.gz", copy)
        _write_json(folder / f"{mask}.json", {
            "Description": "HCP brain mask of the diffusion data (nodif_brain_mask.nii.gz)",
            "Type": "Brain",
            "SpatialReference": dwi_uri,
            "Sources": [_hcp_uri(run.mask, hcp_dir)],
        })


def _write_dataset_files(runs: Sequence[HCPRun], staging: Path, final: Path, hcp_dir: Path,
                         copy: bool, skipped: Sequence[str]) -> None:
    _write_json(staging / "dataset_description.json", {
        "Name": "HCP preprocessed diffusion MRI (3T and 7T) as BIDS",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {"Name": "HCP Pipelines", "Description": "HCP minimal preprocessing (DiffusionPreprocessing)",
             "CodeURL": "https://github.com/Washington-University/HCPpipelines"},
            {"Name": "bids-dmri-ldm hcp2bids", "Version": __version__, "CodeURL": CODE_URL,
             "Description": "python -m bids_dmri_ldm.hcp2bids: renames, links or copies, adds sidecars"},
        ],
        "SourceDatasets": [{"URL": f"bids:{HCP_DATASET_KEY}:",
                            "Name": "WU-Minn Human Connectome Project (HCP Young Adult)"}],
        "DatasetLinks": {HCP_DATASET_KEY: dataset_link(hcp_dir, final)},
        "HowToAcknowledge": HCP_ACKNOWLEDGEMENT,
    })
    (staging / ".bidsignore").write_text("\n".join(BIDSIGNORE_LINES) + "\n")
    sessions: dict[str, list[str]] = {}
    for run in runs:
        sessions.setdefault(run.subject, []).append(run.session.label)
    rows = [f"sub-{subject}\t{','.join(labels)}" for subject, labels in sorted(sessions.items())]
    (staging / "participants.tsv").write_text("participant_id\tsessions\n" + "\n".join(rows) + "\n")
    _write_json(staging / "participants.json", {
        "sessions": {"Description": "HCP diffusion sessions converted (3T: T1w/Diffusion, "
                                    "7T: T1w/Diffusion_7T)"}})
    (staging / "README").write_text(_readme(runs, copy, skipped))


def _readme(runs: Sequence[HCPRun], copy: bool, skipped: Sequence[str]) -> str:
    n3 = sum(run.session.label == "3T" for run in runs)
    lines = [
        "HCP preprocessed diffusion MRI as BIDS",
        "======================================",
        "",
        "Written by `python -m bids_dmri_ldm.hcp2bids` (bids-dmri-ldm "
        f"{__version__}) from the HCP layout <id>/T1w/Diffusion (ses-3T) and <id>/T1w/Diffusion_7T "
        "(ses-7T); DatasetLinks.hcp in dataset_description.json is the HCP folder, relative to this one.",
        "",
        f"Runs: {len(runs)} ({n3} at 3T, {len(runs) - n3} at 7T) of "
        f"{len({run.subject for run in runs})} subject(s).",
        "Images: " + ("copies of the HCP files." if copy else
                      "relative symbolic links to the HCP files (keep both folders where they are, or "
                      "mount their common parent at the same path in a container)."),
        "",
        "- *_space-T1w_desc-preproc_dwi.nii.gz: data.nii.gz; .bval/.bvec: bvals/bvecs, unchanged "
        "(FSL convention).",
        "- *_space-T1w_desc-brain_mask.nii.gz: nodif_brain_mask.nii.gz.",
        "- *_space-T1w_graddev.nii.gz: grad_dev.nii.gz (gradient nonlinearity, 9 volumes), named in "
        "the DWI sidecar under GradientNonlinearity.",
        "- Sidecars: MagneticFieldStrength, EchoTime and RepetitionTime of the HCP Young Adult "
        "protocols (3T: TE 89.5 ms, TR 5520 ms; 7T: TE 71.2 ms, TR 7000 ms).",
        "- .bidsignore lists the gradient and grad_dev files: the BIDS derivative rules have no "
        "names for them.",
        "",
        HCP_ACKNOWLEDGEMENT,
    ]
    if skipped:
        lines += ["", "Not converted:"] + [f"- {reason}" for reason in skipped]
    return "\n".join(lines) + "\n"
