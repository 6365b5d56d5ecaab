"""Input checks, the run's volume plan, and reading the volumes it needs (steps 1-2).

:func:`check_run_inputs` looks at the header and the gradient files only (cheap, before any
work); :func:`select_shells_step` writes the run's
:class:`~bids_dmri_ldm.core.shells.VolumePlan`; :func:`load_dwi_step` streams the input once
(:mod:`bids_dmri_ldm.io.nifti`) and writes the volumes the run needs.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ...bidsio.derivatives import write_bval_bvec
from ...core.gradients import GradientError, check_gradients, load_gradients
from ...core.shells import VolumePlan, load_output_table, plan_volumes
from ...errors import InputDataError
from ...io.files import atomic_write_json, file_stamp
from ...io.nifti import (
    READ_ERRORS,
    iter_nifti_volumes,
    nifti_layout,
    save_array,
    write_nifti_volumes,
)

LOGGER = logging.getLogger("bids_dmri_ldm.workflow")


# ---------------------------------------------------------------------------------------------
# input checks (header + text files only: cheap, done before any work)


@dataclass(frozen=True)
class InputSummary:
    """What a header-only check learned about a run."""

    shape: tuple[int, ...]
    affine: np.ndarray
    voxel_size: tuple[float, float, float]
    plan: VolumePlan


@dataclass(frozen=True)
class ShellOptions:
    """How a run's shells are treated (:func:`~bids_dmri_ldm.core.shells.plan_volumes`).

    Attributes
    ----------
    tolerance : float
        ``--shell-tolerance`` (s/mm²).
    sh_order_max : int
        SH order of the fit.
    shells : tuple of float or None
        ``--shell``: the shells to translate (None: every shell the model covers).
    covered : tuple of float or None
        Shells the model was trained for (None: every shell).
    model_label : str
        The model in messages (``"the rish-global model"``).
    output_bval, output_bvec : str or None
        ``--output-gradients`` files (None: the output keeps the input's table).
    only_selected : bool
        Leave out the shells ``shells`` does not name (the group level's RISH features).
    output_sha256 : str or None
        Digest of the ``--output-gradients`` files: part of the options, so that a table edited
        in place changes the cached plan of a rerun.
    """

    tolerance: float = 100.0
    sh_order_max: int = 4
    shells: tuple[float, ...] | None = None
    covered: tuple[float, ...] | None = None
    model_label: str = "the model"
    output_bval: str | None = None
    output_bvec: str | None = None
    only_selected: bool = False
    output_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain values (nipype inputs)."""
        return {"tolerance": float(self.tolerance), "sh_order_max": int(self.sh_order_max),
                "shells": None if self.shells is None else [float(b) for b in self.shells],
                "covered": None if self.covered is None else [float(b) for b in self.covered],
                "model_label": self.model_label, "output_bval": self.output_bval, "output_bvec": self.output_bvec,
                "only_selected": bool(self.only_selected), "output_sha256": self.output_sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShellOptions:
        d = dict(d)
        for key in ("shells", "covered"):
            d[key] = None if d.get(key) is None else tuple(float(b) for b in d[key])
        return cls(**d)


def check_run_inputs(dwi_file: str | os.PathLike, bval_file: str | os.PathLike | None,
                     bvec_file: str | os.PathLike | None, options: ShellOptions = ShellOptions()) -> InputSummary:
    """Check a DWI run from its header and gradient files, without reading the voxel data, and
    decide the fate of each of its volumes (:func:`~bids_dmri_ldm.core.shells.plan_volumes`).

    Raises
    ------
    InputDataError
        Missing/empty/mismatched bval or bvec, not a 4D image, unreadable header, complex or
        non-numeric voxel type, a degenerate voxel-to-world affine, no b0, a ``--shell`` or an
        output b-value the run lacks, a shell to translate with too few directions for the SH
        order, or a model that covers none of the run's shells.
    """
    name = Path(dwi_file).name
    if bval_file is None or bvec_file is None:
        missing = ".bval" if bval_file is None else ".bvec"
        raise InputDataError(f"{name}: no {missing} file found (next to the image or inherited from a parent folder)")
    try:
        img = nib.load(str(dwi_file))
        shape = tuple(int(s) for s in img.shape)
    except READ_ERRORS as err:
        raise InputDataError(f"{name}: cannot read the NIfTI header ({short_error(err)})") from None
    affine = _checked_affine(img, name)
    if len(shape) != 4 or shape[3] < 2:
        raise InputDataError(f"{name}: a DWI run must be a 4D image (X, Y, Z, volumes); found shape {shape}")
    check_voxel_type(img.get_data_dtype(), name)
    try:
        bvals, bvecs = load_gradients(bval_file, bvec_file)
        clean = check_gradients(bvals, bvecs, shape[3])
        table = None
        if options.output_bval is not None:
            table = load_output_table(options.output_bval, options.output_bvec)
        plan = plan_volumes(clean_bvals(bvals), clean, tolerance=options.tolerance,
                            sh_order_max=options.sh_order_max, selected=options.shells, covered=options.covered,
                            model_label=options.model_label, output_table=table,
                            only_selected=options.only_selected)
    except GradientError as err:
        raise InputDataError(f"{name}: {err}") from None
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return InputSummary(shape=shape, affine=affine, voxel_size=zooms, plan=plan)


def check_voxel_type(dtype: np.dtype, name: str) -> None:
    """Refuse voxel types that are not real numbers (complex data: magnitude and phase in one
    image; its imaginary part would be dropped without a word).

    Raises
    ------
    InputDataError
    """
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.complexfloating):
        raise InputDataError(f"{name}: the image holds complex values ({dtype}); diffusion models here need "
                             "magnitude images: convert it (e.g. the absolute value) or use the magnitude "
                             "reconstruction of the scan")
    if dtype.fields is not None or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise InputDataError(f"{name}: voxel type {dtype} is not a number type; store the DWI as integers or floats")


def _checked_affine(img: nib.Nifti1Image, name: str) -> np.ndarray:
    """The image's voxel-to-world affine, refused when it has non-finite values or does not map
    the three voxel axes to three independent directions (an all-zero sform, say)."""
    with np.errstate(all="ignore"):
        affine = np.asarray(img.affine, dtype=np.float64)
        linear = affine[:3, :3]
        finite = bool(np.all(np.isfinite(affine)))
        singular = not finite or abs(float(np.linalg.det(linear))) <= 1e-12 * max(
            1.0, float(np.abs(linear).max()) ** 3)
    if not finite or singular:
        what = "non-finite values" if not finite else (
            "all zeros" if not np.any(linear) else "axes that are not independent (determinant 0)")
        raise InputDataError(f"{name}: the voxel-to-world affine of the NIfTI header (sform/qform) has {what}; "
                             "fix the header (e.g. copy the affine of the scanner's original image)")
    return affine


def clean_bvals(bvals: np.ndarray) -> np.ndarray:
    """b-values as float64 (s/mm²)."""
    return np.asarray(bvals, dtype=np.float64)


def short_error(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{type(err).__name__}: {text}" if not text.startswith(type(err).__name__) else text


# ---------------------------------------------------------------------------------------------
# select shell -> load + sanitize


def select_shells_step(dwi_file: str, bval_file: str | None, bvec_file: str | None, options: dict[str, Any],
                       out_dir: str | os.PathLike) -> dict[str, Any]:
    """Check the run, decide each volume's fate and write the output gradient table.

    ``options`` is :meth:`ShellOptions.to_dict`.

    Returns
    -------
    dict
        ``plan_file`` (JSON of the :class:`~bids_dmri_ldm.core.shells.VolumePlan`, with
        ``tolerance``), ``bval_file``, ``bvec_file`` (FSL table of the output volumes) and
        ``warnings`` (one line each, also logged; the notes are logged at INFO).
    """
    opts = ShellOptions.from_dict(options)
    plan = check_run_inputs(dwi_file, bval_file, bvec_file, opts).plan
    name = Path(dwi_file).name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bval_out, bvec_out = write_bval_bvec(plan.out_bvals, plan.out_bvecs, out_dir / "output.bval",
                                         out_dir / "output.bvec")
    doc = plan.to_dict()
    doc["tolerance"] = float(opts.tolerance)
    plan_file = str(atomic_write_json(out_dir / "volume_plan.json", doc))
    warnings = [f"{name}: {w}" for w in plan.warnings]
    for message in warnings:
        LOGGER.warning("%s", message)
    for message in plan.notes:
        LOGGER.info("%s: %s", name, message)
    return {"plan_file": plan_file, "bval_file": str(bval_out), "bvec_file": str(bvec_out), "warnings": warnings}


def read_plan(plan_file: str | os.PathLike) -> tuple[VolumePlan, float]:
    """The :class:`~bids_dmri_ldm.core.shells.VolumePlan` and the shell tolerance of a run."""
    doc = json.loads(Path(plan_file).read_text())
    return VolumePlan.from_dict(doc), float(doc.get("tolerance", 100.0))


def iter_volumes(dwi_file: str | os.PathLike):
    """Yield ``(t, volume)`` for every volume of a 4D image in file order, each float32
    ``(X, Y, Z)`` with the scaling slope/intercept applied.

    The file is streamed once, front to back (:func:`iter_stored_volumes`): a ``.nii.gz`` is
    inflated by ISA-L and memory holds one volume, never the whole series.

    Raises
    ------
    InputDataError
        When the data cannot be decompressed or read (corrupt or truncated file).
    """
    layout = None
    for t, stored, layout in iter_stored_volumes(dwi_file):
        volume = stored.astype(np.float32, order="F")  # a copy: the caller may write to it
        if layout.slope != 1.0:
            volume *= np.float32(layout.slope)
        if layout.inter != 0.0:
            volume += np.float32(layout.inter)
        yield t, volume


def iter_stored_volumes(dwi_file: str | os.PathLike):
    """Yield ``(t, stored, layout)`` for every volume of a 4D image in file order: the stored
    (unscaled) values in the on-disk type, Fortran-ordered ``(X, Y, Z)``, a buffer that the next
    volume overwrites (:func:`~bids_dmri_ldm.io.nifti.iter_nifti_volumes`), and the file's
    :class:`~bids_dmri_ldm.io.nifti.NiftiLayout`.

    Raises
    ------
    InputDataError
        Not a 4D image, or the data cannot be decompressed or read (corrupt or truncated file).
    """
    name = Path(dwi_file).name
    try:
        layout = nifti_layout(dwi_file)
        shape = tuple(int(n) for n in layout.header.get_data_shape())
        if len(shape) != 4:
            raise InputDataError(f"{name}: a DWI run must be a 4D image; found shape {shape}")
        for t, stored in iter_nifti_volumes(dwi_file, layout):
            yield t, stored, layout
    except InputDataError:
        raise
    except READ_ERRORS as err:
        raise InputDataError(f"{name}: cannot read the image data, the file is corrupt or truncated ({short_error(err)})") from None


#: File name of the record of :func:`load_dwi_step`'s copy of the source volumes (beside its work
#: folder), read by the participant report (:func:`write_source_copy_record`).
SOURCE_COPY = "source_copy.json"


def write_source_copy_record(path: str | os.PathLike, source: str | os.PathLike, copy: str | os.PathLike,
                             read_index) -> str:
    """Record that ``copy`` (an uncompressed ``.nii``) holds the image values of volumes
    ``read_index`` (ascending) of ``source``, as the source file is now (its resolved path, size
    and modification time): the participant report reads the 3T signal it shows from the copy
    (memory-mapped) instead of inflating the source again, and only while the source is unchanged.
    NaN/Inf of the source are 0 in the copy."""
    record = {**dict(zip(("source", "size", "mtime_ns"), file_stamp(source))),
              "copy": str(Path(copy).resolve()), "read_index": [int(t) for t in read_index]}
    atomic_write_json(Path(path), record)
    return str(path)


def load_dwi_step(dwi_file: str, plan_file: str, out_dir: str | os.PathLike,
                  source_record: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read the volumes the run needs (:attr:`~bids_dmri_ldm.core.shells.VolumePlan.read_index`),
    replace NaN/Inf by 0 and record where they were; streamed volume by volume.

    The input is read once, front to back (:func:`iter_stored_volumes`: ISA-L inflation), and the
    volumes read are written as they arrive; memory holds a few volumes, never the series. They
    keep the stored integer type when the source is stored as integers without scaling (half the
    bytes of float32; no NaN is possible; the SH fit converts them), else they are float32 image
    values.

    Returns
    -------
    dict
        ``dwi_file`` (``.nii`` of the volumes read, in ascending input order),
        ``mean_b0_file``, ``mean_dwi_file`` (mean of the lowest shell's volumes; helps the
        automatic mask tell air from tissue), ``bad_voxels_file`` (uint8, 1 where any volume read
        was NaN/Inf), ``n_bad_voxels``, ``warnings`` (list of one-line messages, also logged),
        ``integer_input`` (the source is stored as integers). With ``source_record`` (a path),
        the copy is recorded there for the report (:func:`write_source_copy_record`).
    """
    plan, _ = read_plan(plan_file)
    name = Path(dwi_file).name
    try:
        layout = nifti_layout(dwi_file)
    except READ_ERRORS as err:
        raise InputDataError(f"{name}: cannot read the NIfTI header ({short_error(err)})") from None
    shape, affine = layout.shape, layout.affine
    keep = set(int(i) for i in plan.read_index)
    b0s = set(int(i) for i in plan.b0_index)
    for_mask = set(int(i) for i in plan.mask_index)
    sums = {"b0": np.zeros(shape, np.float64, order="F"), "dwi": np.zeros(shape, np.float64, order="F")}
    bad = np.zeros(shape, dtype=bool, order="F")
    stored_type = layout.dtype.newbyteorder("=")
    keep_integer = stored_type in _KEPT_INTEGER_TYPES and not layout.scaled
    dtype = stored_type if keep_integer else np.dtype(np.float32)

    def kept_volumes():
        for t, stored, _ in iter_stored_volumes(dwi_file):
            if t not in keep and t not in for_mask:
                continue
            if keep_integer:  # image values = stored values; no NaN/Inf possible
                volume = stored.astype(stored_type, copy=False)
            else:
                volume = stored.astype(np.float32, order="F")
                if layout.slope != 1.0:
                    volume *= np.float32(layout.slope)
                if layout.inter != 0.0:
                    volume += np.float32(layout.inter)
                finite = np.isfinite(volume)
                if not finite.all():
                    bad[~finite] = True
                    volume[~finite] = 0.0
            if t in b0s:
                sums["b0"] += volume
            if t in for_mask:
                sums["dwi"] += volume
            if t in keep:
                yield volume

    out_dir = Path(out_dir)
    dwi_path = write_nifti_volumes(out_dir / "dwi_read.nii", shape, affine, len(keep), kept_volumes(), dtype=dtype,
                                   slope=1.0 if keep_integer else None)
    n_bad = int(bad.sum())
    warnings = []
    if n_bad:
        warnings.append(f"{Path(dwi_file).name}: {n_bad} voxel(s) with NaN/Inf values are set to 0 and left out "
                        "of the brain mask")
        LOGGER.warning("%s", warnings[-1])
    if source_record:
        write_source_copy_record(source_record, dwi_file, dwi_path, sorted(keep))
    mean_dwi = sums["dwi"] / max(1, len(for_mask)) if for_mask else sums["b0"] / len(b0s)
    return {
        "dwi_file": str(dwi_path),
        "mean_b0_file": save_array((sums["b0"] / len(b0s)).astype(np.float32), affine, out_dir / "mean_b0.nii"),
        "mean_dwi_file": save_array(mean_dwi.astype(np.float32), affine, out_dir / "mean_dwi.nii"),
        "bad_voxels_file": save_array(bad.astype(np.uint8), affine, out_dir / "bad_voxels.nii", np.uint8),
        "n_bad_voxels": n_bad,
        "warnings": warnings,
        "integer_input": bool(np.issubdtype(layout.dtype, np.integer)),
    }


#: Stored integer types the volumes read keep (the SH fit converts them to float32 in torch).
_KEPT_INTEGER_TYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.int32))
