"""BIDS derivatives output: file names, sidecars and atomic writes of each run's files.

The dataset-level files (``dataset_description.json``, ``.bidsignore``) are in :mod:`~.dataset`.

Layout of the derivative dataset (``output_dir``), for each source run
``sub-<s>[_ses-<t>][_acq-<a>][_rec-<r>][_dir-<d>][_run-<n>]_dwi.nii.gz``::

    sub-<s>/[ses-<t>/]dwi/<entities>[_res-<R>]_desc-7Tlike_dwi.nii.gz   (+ .bval .bvec .json)
    sub-<s>/[ses-<t>/]dwi/<entities>[_res-<R>]_desc-brain_mask.nii.gz   (+ .json)
    sub-<s>/[ses-<t>/]dwi/<entities>[_res-<R>]_model-rish_desc-source_dwimap.nii.gz  (+ .json)
    sub-<s>/[ses-<t>/]dwi/<entities>[_res-<R>]_model-rish_desc-7Tlike_dwimap.nii.gz  (+ .json)
    sub-<s>/[ses-<t>/]dwi/<entities>[_res-<R>]_model-rish_desc-scale_dwimap.nii.gz   (+ .json)
    sub-<s>/[ses-<t>/]dwi/<entities>[_res-<R>]_model-rish_desc-7TlikeStd_dwimap.nii.gz  (+ .json;
        only ``--method ldm --num-samples K`` with K > 1: per-voxel SD over the K samples)

``<entities>`` are the input's, ``space-`` included: a derivative input such as qsiprep's
``sub-21_space-T1w_desc-preproc_dwi.nii.gz`` gives ``sub-21_space-T1w_desc-7Tlike_dwi.nii.gz``
(the outputs stay in the input's space; ``SpatialReference`` names the source image), a raw input
has no ``space-``. ``res-<R>`` appears when the output grid differs from the input's (``R`` =
voxel size with ``p`` for the decimal point, e.g. ``1p05``; it replaces an input's own ``res-``)
and the sidecars then carry ``Resolution``; an input's ``desc-`` is replaced by the output's.
RISH and scale maps use the ``_dwimap`` suffix with ``model-``/``desc-`` entities proposed by
BEP016 (diffusion derivatives); BIDS 1.10 has no suffix for them yet, so ``.bidsignore`` lists
them, together with the derivative ``.bval``/``.bvec`` files the schema does not yet allow.
BIDS has no entity for a b-value, so the shells share one file per map: three volumes (L0, L2,
L4) per SH-fitted shell, ascending b; the sidecars list each volume's shell and order
(``VolumeShells``, ``VolumeRISHOrders``) and every shell's fate (``Shells``).

Every file is written atomically (:mod:`bids_dmri_ldm.io.files`): to a temporary file in the
destination folder, then ``os.replace`` (readers never see a half-written file; a crash leaves
only a hidden temp file, removed on error).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .._version import __version__
from ..io.files import (
    atomic_copy,
    atomic_link_or_copy,
    atomic_write_json,
    atomic_write_text,
)
from ..io.files import json_default as _json_default
from ..io.nifti import make_nifti
from ..io.nifti import save_nifti as atomic_save_nifti
from .dataset import PIPELINE_NAME, OutputWriteError, software_versions
from .entities import parse_entities

DESC_7TLIKE = "7Tlike"

# Entities a raw DWI file name may carry, in the BIDS order; the derivative entities of an input
# that the outputs keep (its space, and its resolution when the grid is kept); and the order of
# every entity an output name may carry (the BIDS entity table's order, ``model``/``param`` of
# BEP016 before ``desc``).
_SOURCE_ENTITY_ORDER = ("sub", "ses", "acq", "ce", "rec", "dir", "run", "echo", "part", "chunk")
_KEPT_DERIVATIVE_ENTITIES = ("space", "res")
_DERIV_ENTITY_ORDER = ("sub", "ses", "acq", "ce", "rec", "dir", "run", "echo", "part", "space",
                       "chunk", "res", "model", "param", "desc")
_PYBIDS_TO_KEY = {
    "subject": "sub", "session": "ses", "acquisition": "acq", "ceagent": "ce",
    "reconstruction": "rec", "direction": "dir", "run": "run", "echo": "echo", "part": "part",
    "chunk": "chunk", "space": "space", "res": "res",
}
_LABEL = re.compile(r"^[0-9a-zA-Z+]+$")


# ---------------------------------------------------------------------------------------------
# atomic writes (the helpers of :mod:`bids_dmri_ldm.io.files` and :mod:`bids_dmri_ldm.io.nifti`)


def write_bval_bvec(bvals: np.ndarray, bvecs: np.ndarray, bval_path: str | os.PathLike,
                    bvec_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write FSL ``.bval`` (one row) and ``.bvec`` (3 rows) atomically.

    ``bvecs`` is ``(N, 3)`` in the FSL convention (voxel axes of the image they belong to).
    """
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    bvecs = np.asarray(bvecs, dtype=np.float64).reshape(-1, 3)
    if bvals.size != bvecs.shape[0]:
        raise ValueError(f"{bvals.size} b-values but {bvecs.shape[0]} vectors")
    atomic_write_text(bval_path, " ".join(np.format_float_positional(b, precision=6, trim="-") for b in bvals) + "\n")
    rows = [" ".join(f"{v:.8f}" for v in bvecs[:, axis]) for axis in range(3)]
    atomic_write_text(bvec_path, "\n".join(rows) + "\n")
    return Path(bval_path), Path(bvec_path)


# ---------------------------------------------------------------------------------------------
# names


def source_entities(dwi_file: str | os.PathLike, entities: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Entities of a source DWI run that its derivatives keep: the raw-data ones and, of a
    derivative input, ``space`` and ``res`` (file-name labels; pybids names in ``entities`` fill
    gaps). ``desc`` is left out: the outputs set their own."""
    kept = _SOURCE_ENTITY_ORDER + _KEPT_DERIVATIVE_ENTITIES
    found = {k: v for k, v in parse_entities(dwi_file).items() if k in kept}
    for name, key in _PYBIDS_TO_KEY.items():
        if entities and name in entities and key not in found:
            found[key] = str(entities[name])
    if "sub" not in found:
        raise ValueError(f"{dwi_file} is not a BIDS file name with a sub- entity")
    return found


def resolution_label(voxel_size_mm: float) -> str:
    """``res-`` label of an isotropic voxel size: 1.05 -> '1p05', 2.0 -> '2'."""
    text = f"{float(voxel_size_mm):.4f}".rstrip("0").rstrip(".")
    return text.replace(".", "p")


def build_name(entities: Mapping[str, str], suffix: str, extension: str) -> str:
    """File name with entities in BIDS order; labels must match ``[0-9a-zA-Z+]+``."""
    unknown = set(entities) - set(_DERIV_ENTITY_ORDER)
    if unknown:
        raise ValueError(f"unknown entities {sorted(unknown)}")
    parts = []
    for key in _DERIV_ENTITY_ORDER:
        value = entities.get(key)
        if value is None:
            continue
        value = str(value)
        if not _LABEL.match(value):
            raise ValueError(f"invalid BIDS label {key}-{value!r}: only letters, digits and '+' are allowed")
        parts.append(f"{key}-{value}")
    return "_".join(parts + [suffix]) + extension


@dataclass(frozen=True)
class OutputSpec:
    """One derivative of a run: entities added to the source's, suffix and the volume it holds."""

    key: str
    desc: str
    suffix: str
    model: str | None = None
    extra_extensions: tuple[str, ...] = ()
    optional: bool = False  # written only by some runs; not needed for completeness


OUTPUT_SPECS: tuple[OutputSpec, ...] = (
    OutputSpec("rish_source", desc="source", suffix="dwimap", model="rish"),
    OutputSpec("rish_predicted", desc=DESC_7TLIKE, suffix="dwimap", model="rish"),
    OutputSpec("scale", desc="scale", suffix="dwimap", model="rish"),
    OutputSpec("rish_std", desc=DESC_7TLIKE + "Std", suffix="dwimap", model="rish", optional=True),
    OutputSpec("mask", desc="brain", suffix="mask"),
    OutputSpec("dwi", desc=DESC_7TLIKE, suffix="dwi", extra_extensions=(".bval", ".bvec")),
)
"""Derivatives of each source run. The DWI comes last: its sidecar is the run's commit marker."""


@dataclass(frozen=True)
class RunOutputs:
    """Paths of every derivative of one source run.

    Attributes
    ----------
    root : Path
        Derivative dataset root (``output_dir``).
    entities : dict
        Source entities (``sub``, ``ses``, ..., an input's ``space``), plus ``res`` when the
        grid changes.
    """

    root: Path
    entities: Mapping[str, str]

    @property
    def folder(self) -> Path:
        sub = self.root / f"sub-{self.entities['sub']}"
        if "ses" in self.entities:
            sub = sub / f"ses-{self.entities['ses']}"
        return sub / "dwi"

    def path(self, key: str, extension: str = ".nii.gz") -> Path:
        spec = _spec(key)
        ents = dict(self.entities, desc=spec.desc)
        if spec.model:
            ents["model"] = spec.model
        return self.folder / build_name(ents, spec.suffix, extension)

    def sidecar(self, key: str) -> Path:
        return self.path(key, ".json")

    def all_files(self, optional: bool = False) -> list[Path]:
        """The files every run writes (``optional=True``: also those only some runs write, e.g.
        the ldm SD map); the DWI sidecar (commit marker) last."""
        files = []
        for spec in OUTPUT_SPECS:
            if spec.optional and not optional:
                continue
            files += [self.path(spec.key, ext) for ext in (".nii.gz",) + spec.extra_extensions]
            files.append(self.sidecar(spec.key))
        return files

    @property
    def run_id(self) -> str:
        """The source run's name stem without the output's ``res-``, e.g. ``sub-01_ses-1_dwi``
        (``sub-21_space-T1w_dwi`` for a derivative input in ``space-T1w``)."""
        return build_name({k: v for k, v in self.entities.items() if k != "res"}, "dwi", "")


def _spec(key: str) -> OutputSpec:
    for spec in OUTPUT_SPECS:
        if spec.key == key:
            return spec
    raise KeyError(f"unknown derivative {key!r}")


def run_outputs(output_dir: str | os.PathLike, dwi_file: str | os.PathLike,
                entities: Mapping[str, Any] | None = None, res_label: str | None = None) -> RunOutputs:
    """The :class:`RunOutputs` of a source DWI file (``res_label`` when the grid changes)."""
    ents = source_entities(dwi_file, entities)
    if res_label is not None:
        ents["res"] = res_label  # the output grid's, replacing an input's own res-
    return RunOutputs(Path(output_dir), ents)


# ---------------------------------------------------------------------------------------------
# sidecars and dataset-level files


#: Derivatives whose voxels outside the brain mask are zeroed by ``--skull-strip`` (the others:
#: the mask itself, the scale maps (1 outside the mask) and the ldm SD map (0 outside it always)).
SKULL_STRIPPABLE = ("dwi", "rish_source", "rish_predicted")


def sidecar_metadata(kind: str, *, sources: Sequence[str], spatial_reference: str,
                     provenance: Mapping[str, Any], resolution: str | None = None,
                     extra: Mapping[str, Any] | None = None, skull_stripped: bool = False) -> dict[str, Any]:
    """Sidecar dictionary of one derivative.

    Parameters
    ----------
    kind : str
        One of the keys of :data:`OUTPUT_SPECS` (``dwi``, ``mask``, ``rish_source``, ...).
    sources : list of str
        BIDS URIs of the files used (``bids:raw:...``).
    spatial_reference : str
        BIDS URI of the image defining the space (the source DWI).
    provenance : dict
        Method, model, settings, seed and software versions (:func:`provenance_block`).
    resolution : str, optional
        Description of the ``res-`` label (required by BIDS when ``res-`` is present).
    skull_stripped : bool
        Whether the run was made with ``--skull-strip`` (voxels outside the brain mask set to 0 in
        the DWI and RISH maps). ``SkullStripped`` says, per image, whether it is zero outside the
        brain mask: the DWI and RISH maps follow ``skull_stripped``, the ldm SD map is always
        (True), the scale maps never (False: 1 outside the mask); the mask has no such key.
    """
    given_table = (provenance.get("Settings") or {}).get("OutputGradients")
    per_shell = ("three volumes (L0, L2, L4) per SH-fitted shell, the shells in ascending b (VolumeShells, "
                 "VolumeRISHOrders)")
    descriptions = {
        "dwi": "7T-like diffusion-weighted images: each shell's SH coefficients scaled per order by its RISH "
               "scale maps (Zhu et al. 2024, Eq. 3; scale 1 for a shell passed through, see Shells) and "
               + ("evaluated on the directions of the given table (Settings.OutputGradients), whose b0 "
                  "volumes are the source's mean b0" if given_table else
                  "rebuilt on the source directions, volume for volume in the source's order, the b0 volumes "
                  "(and those of a shell with too few directions for the SH fit) carried as they are")
               + "; in every voxel (scale 1 outside the brain mask, where the source signal is carried through "
               "the same SH fit and rebuild)"
               + ("; zero outside the brain mask (--skull-strip)." if skull_stripped else "."),
        "mask": "Brain mask of the translation: where the scale maps may differ from 1 (the automatic "
                "air/tissue mask of the mean b0, or the input mask brought to the DWI grid).",
        "rish_source": f"RISH features of the source run, {per_shell} (Eq. 1, of S/S0, no square root)"
                       + ("; zero outside the brain mask." if skull_stripped else "; every voxel."),
        "rish_predicted": f"Predicted 7T RISH features, {per_shell} (of the scaled SH coefficients)"
                          + ("; zero outside the brain mask." if skull_stripped else
                             "; every voxel (equal to the source outside the brain mask)."),
        "scale": f"RISH scale maps lambda_l, {per_shell} (Eq. 2); 1 outside the brain mask and for a shell "
                 "passed through.",
        "rish_std": "Per-voxel standard deviation of the latent diffusion model's predicted 7T RISH "
                    f"features over NumSamples seeded samples, {per_shell}; 0 for a shell passed through "
                    "(uncertainty of the prediction, on the model's output before the scale maps are formed).",
    }
    meta: dict[str, Any] = {
        "Description": descriptions[kind],
        "Sources": list(sources),
        "SpatialReference": spatial_reference,
    }
    if kind == "mask":
        meta["Type"] = "Brain"
    else:
        meta["SkullStripped"] = bool(skull_stripped) if kind in SKULL_STRIPPABLE else kind == "rish_std"
    if kind in ("rish_source", "rish_predicted", "scale", "rish_std"):
        orders = [int(o) for o in provenance.get("RISHOrders", [0, 2, 4])]
        meta["RISHOrders"] = orders
        fitted = [r["BValue"] for r in provenance.get("Shells") or [] if r.get("MapShellIndex") is not None]
        meta["VolumeShells"] = [b for b in fitted for _ in orders]
        meta["VolumeRISHOrders"] = [o for _ in fitted for o in orders]
    if resolution is not None:
        meta["Resolution"] = resolution
    meta.update(dict(provenance))
    meta.update(dict(extra or {}))
    return meta


def provenance_block(method_provenance: Mapping[str, Any], settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Provenance recorded in every sidecar: the method's block + settings, seed, software."""
    block = dict(method_provenance)
    block["Settings"] = dict(settings)
    block["Seed"] = int(seed)
    block["Software"] = software_versions()  # not "SoftwareVersions": BIDS reserves it (scanner)
    block["GeneratedBy"] = {"Name": PIPELINE_NAME, "Version": __version__}
    return block


def write_derivative(outputs: RunOutputs, key: str, in_file: str | os.PathLike, metadata: Mapping[str, Any],
                     bval_file: str | os.PathLike | None = None, bvec_file: str | os.PathLike | None = None) -> list[Path]:
    """Write one derivative of a run (image, its sidecar, and bval/bvec for the DWI), atomically.

    ``in_file`` is taken as is when it is already ``.nii.gz`` (hard-linked from the work folder
    when both are on one file system, else copied: :func:`~bids_dmri_ldm.io.files.atomic_link_or_copy`),
    else loaded and compressed. The sidecar is written last.
    """
    spec = _spec(key)
    written = []
    target = outputs.path(key)
    try:
        if str(in_file).endswith(".nii.gz"):
            written.append(atomic_link_or_copy(in_file, target))
        else:
            written.append(atomic_save_nifti(nib.load(str(in_file)), target))
        if ".bval" in spec.extra_extensions:
            if bval_file is None or bvec_file is None:
                raise ValueError(f"{key} needs bval and bvec files")
            written.append(atomic_copy(bval_file, outputs.path(key, ".bval")))
            written.append(atomic_copy(bvec_file, outputs.path(key, ".bvec")))
        written.append(atomic_write_json(outputs.sidecar(key), metadata))
    except OSError as err:  # permissions, a file where a folder should be, disk full
        raise OutputWriteError(f"cannot write {target}: {err.strerror or err}") from None
    return written


# ---------------------------------------------------------------------------------------------
# completeness


def is_complete(outputs: RunOutputs, settings: Mapping[str, Any] | None = None) -> bool:
    """Whether every derivative of the run exists (and, given ``settings``, was made with them).

    The DWI sidecar is written last, so its presence together with every other file means the
    run finished; ``settings`` are compared with its ``Settings`` block (method, shell, ...).
    """
    if not all(path.is_file() for path in outputs.all_files()):
        return False
    if settings is None:
        return True
    recorded = read_settings(outputs)
    return recorded is not None and _same_settings(recorded, settings)


def read_settings(outputs: RunOutputs) -> dict[str, Any] | None:
    """``Settings`` recorded in the run's DWI sidecar, or ``None`` if absent/unreadable."""
    try:
        return json.loads(outputs.sidecar("dwi").read_text()).get("Settings")
    except (OSError, ValueError):
        return None


def _same_settings(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    normalise = lambda d: json.loads(json.dumps(dict(d), sort_keys=True, default=_json_default))
    return normalise(recorded) == normalise(wanted)


def existing_files(outputs: RunOutputs) -> list[Path]:
    """Derivative files of the run that exist now (optional ones included)."""
    return [path for path in outputs.all_files(optional=True) if path.is_file()]


def remove_outputs(outputs: RunOutputs) -> list[Path]:
    """Delete the run's derivatives (used to leave nothing half-written after a failure)."""
    removed = []
    for path in existing_files(outputs):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


__all__ = [
    "DESC_7TLIKE",
    "OUTPUT_SPECS",
    "SKULL_STRIPPABLE",
    "OutputSpec",
    "OutputWriteError",
    "RunOutputs",
    "atomic_copy",
    "atomic_save_nifti",
    "atomic_write_json",
    "atomic_write_text",
    "build_name",
    "existing_files",
    "is_complete",
    "make_nifti",
    "parse_entities",
    "provenance_block",
    "read_settings",
    "remove_outputs",
    "resolution_label",
    "run_outputs",
    "sidecar_metadata",
    "software_versions",
    "source_entities",
    "write_bval_bvec",
    "write_derivative",
]
