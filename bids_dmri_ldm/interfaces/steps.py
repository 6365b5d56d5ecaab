"""Plain functions behind the participant-level interfaces (files in, files out; no nipype).

Each ``*_step`` function reads its inputs from disk, calls the signal core / the method registry,
and writes its results into ``out_dir`` (NIfTI float32, mm/s units, the input's affine or the
output grid's). The nipype interfaces in :mod:`.dwi` and :mod:`.bids` are thin wrappers around
them, and the group level calls them directly. Intermediate images are uncompressed ``.nii``
(fast in the work directory); images that become derivatives are ``.nii.gz``.

What happens to each volume is decided once per run (:func:`select_shells_step`, a
:class:`~bids_dmri_ldm.core.shells.VolumePlan` written as JSON): the later steps read the plan.
Shells are processed one at a time (SH fit, scale maps, Eq. 3), in ascending b; their RISH and
scale maps are stacked in that order in the derivatives. The output DWI follows the output table
(the input's, volume for volume, or ``--output-gradients``).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from ..bids.derivatives import make_nifti, write_bval_bvec
from ..core.display import stored_display_voxels
from ..core.gradients import GradientError, b0_mask, check_gradients, load_gradients
from ..core.mask import brain_mask
from ..core.resample import fill_outside_mask, output_grid, resample
from ..core.sh import RISH_ORDERS, SHModel, n_coefficients, sh_basis
from ..core.shells import MEAN_B0, VolumePlan, load_output_table, plan_volumes
from ..core.signal import DEFAULT_S0_FLOOR, fit_shell_rish
from ..errors import InputDataError
from ..io.nifti import READ_ERRORS, iter_nifti_volumes, nifti_layout, save_nifti
from ..io.nifti import write_nifti_volumes as write_nifti_volumes  # re-exported for callers of steps

LOGGER = logging.getLogger("bids_dmri_ldm.workflow")

# Errors raised by nibabel/gzip/zlib/ISA-L when a .nii.gz is truncated or not what it claims to be.
_READ_ERRORS = READ_ERRORS


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
    except _READ_ERRORS as err:
        raise InputDataError(f"{name}: cannot read the NIfTI header ({_short(err)})") from None
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


def _short(err: BaseException) -> str:
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
    plan_file = write_json(doc, out_dir / "volume_plan.json")
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
    except _READ_ERRORS as err:
        raise InputDataError(f"{name}: cannot read the image data, the file is corrupt or truncated ({_short(err)})") from None


def load_dwi_step(dwi_file: str, plan_file: str, out_dir: str | os.PathLike) -> dict[str, Any]:
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
        ``integer_input`` (the source is stored as integers).
    """
    plan, _ = read_plan(plan_file)
    name = Path(dwi_file).name
    try:
        layout = nifti_layout(dwi_file)
    except _READ_ERRORS as err:
        raise InputDataError(f"{name}: cannot read the NIfTI header ({_short(err)})") from None
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
    mean_dwi = sums["dwi"] / max(1, len(for_mask)) if for_mask else sums["b0"] / len(b0s)
    return {
        "dwi_file": str(dwi_path),
        "mean_b0_file": _save((sums["b0"] / len(b0s)).astype(np.float32), affine, out_dir / "mean_b0.nii"),
        "mean_dwi_file": _save(mean_dwi.astype(np.float32), affine, out_dir / "mean_dwi.nii"),
        "bad_voxels_file": _save(bad.astype(np.uint8), affine, out_dir / "bad_voxels.nii", np.uint8),
        "n_bad_voxels": n_bad,
        "warnings": warnings,
        "integer_input": bool(np.issubdtype(layout.dtype, np.integer)),
    }


#: Stored integer types the volumes read keep (the SH fit converts them to float32 in torch).
_KEPT_INTEGER_TYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.int32))


# ---------------------------------------------------------------------------------------------
# mask


def brain_mask_step(mean_b0_file: str, bad_voxels_file: str, out_dir: str | os.PathLike,
                    mask_file: str | None = None, mean_dwi_file: str | None = None) -> dict[str, Any]:
    """Brain mask on the DWI grid: the given mask (:func:`user_mask_on_grid`: resampled when it is
    on another grid) or the automatic one (:func:`~bids_dmri_ldm.core.mask.brain_mask` of the mean
    b0, helped by the mean DW image); voxels with NaN/Inf are removed.

    The mask decides only where the scale maps may differ from 1; the output DWI keeps every voxel.

    Returns
    -------
    dict
        ``mask_file`` (uint8 NIfTI on the DWI grid), ``n_voxels``, ``warnings`` (one-line messages
        about a given mask, also logged).

    Raises
    ------
    InputDataError
        A given mask that cannot be read, is not 3D, is empty, or does not overlap the DWI; or
        an empty mask.
    """
    b0_img = nib.load(mean_b0_file)
    warnings: list[str] = []
    if mask_file:
        mask, warnings = user_mask_on_grid(mask_file, b0_img.affine, tuple(b0_img.shape[:3]))
        for message in warnings:
            LOGGER.warning("%s", message)
    else:
        mean_dwi = np.asanyarray(nib.load(mean_dwi_file).dataobj, dtype=np.float32) if mean_dwi_file else None
        mask = brain_mask(np.asanyarray(b0_img.dataobj, dtype=np.float32), b0_img.affine, mean_dwi)
    mask &= np.asanyarray(nib.load(bad_voxels_file).dataobj) == 0
    if not mask.any():
        raise InputDataError("the brain mask is empty (no signal in the mean b0?)")
    path = _save(mask.astype(np.uint8), b0_img.affine, Path(out_dir) / "brain_mask.nii", np.uint8)
    return {"mask_file": path, "n_voxels": int(mask.sum()), "warnings": warnings}


def user_mask_on_grid(mask_file: str | os.PathLike, affine: np.ndarray,
                      shape: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    """A given brain mask as bool ``shape`` on the DWI grid, and one-line warnings about it.

    Voxels > 0 are brain (values other than 0 and 1, NaN included, give a warning). A 4D mask
    with a single volume is squeezed. A mask on another grid is resampled through the two affines
    (world space, nearest neighbour; outside its field of view: not brain).

    Raises
    ------
    InputDataError
        Unreadable, not 3D, empty, or with no brain voxel inside the DWI's field of view.
    """
    name = Path(mask_file).name
    try:
        img = nib.load(str(mask_file))
        data = np.asanyarray(img.dataobj)
    except _READ_ERRORS as err:
        raise InputDataError(f"{name}: cannot read the brain mask ({_short(err)})") from None
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise InputDataError(f"{name}: a brain mask must be a 3D image; found shape {tuple(data.shape)}")
    warnings = []
    values = np.asarray(data, dtype=np.float64)
    finite = np.isfinite(values)
    binary = finite & ((values == 0) | (values == 1))
    if not binary.all():
        shown = values[finite & ~binary]
        what = f"values from {shown.min():g} to {shown.max():g}" if shown.size else "no finite value"
        if not finite.all():
            what += f", {int((~finite).sum())} NaN/Inf"
        warnings.append(f"{name}: the brain mask holds values other than 0 and 1 ({what}); voxels > 0 are "
                        "taken as brain")
    mask = finite & (values > 0)
    if not mask.any():
        raise InputDataError(f"{name}: the brain mask is empty (no voxel > 0)")
    same_grid = tuple(mask.shape) == tuple(shape) and np.allclose(img.affine, affine, atol=1e-3)
    if same_grid:
        return mask, warnings
    try:
        mapping = np.linalg.inv(np.asarray(img.affine, dtype=np.float64)) @ np.asarray(affine, dtype=np.float64)
    except np.linalg.LinAlgError:
        raise InputDataError(f"{name}: the brain mask's affine is singular") from None
    on_grid = _nearest(mask, mapping, shape)
    if not on_grid.any():
        overlap = _nearest(np.ones(mask.shape, dtype=bool), mapping, shape).any()
        where = "its brain voxels lie outside the DWI's field of view" if overlap else \
            "its grid does not overlap the DWI's field of view in world space"
        raise InputDataError(f"{name}: the brain mask cannot be used: {where} (shape {tuple(mask.shape)} vs "
                             f"{tuple(shape)})")
    LOGGER.info("%s: brain mask resampled onto the DWI grid (nearest neighbour)", name)
    return on_grid, warnings


def _nearest(mask: np.ndarray, mapping: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a boolean volume; ``mapping`` (4, 4) maps output voxel
    indices to input voxel indices; outside the input: False."""
    from scipy import ndimage

    out = ndimage.affine_transform(mask.astype(np.uint8), mapping[:3, :3], mapping[:3, 3], output_shape=tuple(shape),
                                   order=0, mode="constant", cval=0, prefilter=False)
    return out > 0


# ---------------------------------------------------------------------------------------------
# normalise + SH fit + RISH (Eq. 1)


def fit_rish_step(dwi_file: str, plan_file: str, sh_order_max: int, out_dir: str | os.PathLike,
                  orders: tuple[int, ...] = RISH_ORDERS) -> dict[str, Any]:
    """Normalise (S/S0 in [0, 1]), fit SH (least squares, order ``sh_order_max``) and take RISH of
    each fitted shell, one shell at a time, in every voxel of the grid.

    ``dwi_file`` holds the volumes the run read (:func:`load_dwi_step`, memory-mapped); each
    shell's fit (:func:`~bids_dmri_ldm.core.signal.fit_shell_rish`: normalisation, SH fit and RISH
    in one pass, in chunks of voxels in the file's memory order, no copy of the data) reads the
    b0s and that shell's volumes only. The
    whole field of view is fitted, not only the brain mask, so that the output can carry the
    source signal everywhere (lambda = 1 outside the mask). Background voxels stay bounded: S0
    is floored (:data:`~bids_dmri_ldm.core.signal.DEFAULT_S0_FLOOR`) and S/S0 clipped to [0, 1],
    so air rebuilds to at most ~S0 (noise level) and voxels without signal to 0.

    Returns
    -------
    dict
        ``s0_file`` (X,Y,Z), and per fitted shell (ascending b) ``sh_files`` (X,Y,Z,K) and
        ``rish_files`` (X,Y,Z,len(orders)), float32 ``.nii`` on the input grid.
    """
    plan, _ = read_plan(plan_file)
    img = nib.load(dwi_file)
    data = _image_values(img)  # memory-mapped (X, Y, Z, V) in NIfTI order, as load_dwi_step writes it
    position = {int(t): k for k, t in enumerate(plan.read_index)}
    b0_pos = [position[int(t)] for t in plan.b0_index]
    out_dir = Path(out_dir)
    everywhere = np.ones(img.shape[:3], dtype=bool)
    s0 = None
    sh_files, rish_files = [], []
    for plan_shell in plan.fitted:
        shell = plan_shell.shell
        try:
            model = SHModel(plan.bvecs[shell.index], sh_order_max=sh_order_max)
        except ValueError as err:
            raise InputDataError(str(err)) from None
        shell_pos = np.array([position[int(t)] for t in shell.index], dtype=np.int64)
        s0, coeffs, rish = fit_shell_rish(data, np.array(b0_pos, dtype=np.int64), shell_pos, everywhere,
                                          model.fit_matrix, model.l_values, orders)
        label = f"b{shell.bval:.0f}"
        sh_files.append(_save(coeffs, img.affine, out_dir / f"sh_{label}.nii"))
        rish_files.append(_save(rish, img.affine, out_dir / f"rish_source_{label}.nii"))
        del coeffs, rish
    if s0 is None:  # no shell to fit (every volume carried): S0 is the floored mean b0
        b0 = _gather_volumes(img, b0_pos)
        s0 = np.maximum(b0.mean(axis=-1), np.float32(DEFAULT_S0_FLOOR))
    return {"s0_file": _save(s0, img.affine, out_dir / "s0.nii"), "sh_files": sh_files, "rish_files": rish_files}


def _image_values(img: nib.Nifti1Image) -> np.ndarray:
    """The image values: the stored array (memory-mapped for an uncompressed ``.nii``, any
    number type) when the header has no scaling, else float32 scaled values."""
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    if hasattr(proxy, "get_unscaled") and slope in (None, 1.0) and inter in (None, 0.0):
        return proxy.get_unscaled()
    return np.asanyarray(proxy, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# method -> scale maps (Eq. 2)


def _gather_volumes(img: nib.Nifti1Image, volumes: list[int]) -> np.ndarray:
    """Volumes ``volumes`` of a 4D float32 image as a C-order ``(X, Y, Z, len(volumes))`` array,
    copied one volume at a time from the memory-mapped file (no copy of the whole series)."""
    data = np.asanyarray(img.dataobj)
    out = np.empty(tuple(img.shape[:3]) + (len(volumes),), dtype=np.float32)
    for k, t in enumerate(volumes):
        out[..., k] = data[..., t]
    return out


#: Provenance keys that belong to one shell (moved into that shell's ``Shells`` record).
SHELL_PROVENANCE_KEYS = ("ScaleFactors",)


def predict_scale_step(rish_files: list[str], mask_file: str, method: str, model_dir: str | None,
                       options: dict[str, Any], plan_file: str, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Scale maps lambda ``(X, Y, Z, n_orders)`` of each fitted shell, and the provenance.

    A translated shell gets the method's scale maps (rish-global: the factors of that shell,
    :func:`~bids_dmri_ldm.methods.method_for_shell`); a shell passed through gets lambda = 1.
    Each file holds lambda inside the mask and, outside it, the nearest value inside
    (:func:`~bids_dmri_ldm.core.resample.fill_outside_mask`): lambda is set to 1 outside the mask
    on the output grid (:func:`scale_sh_step`), after the resampling.

    Returns
    -------
    dict
        ``scale_files`` and, for ``ldm`` with ``num_samples`` > 1, ``std_files`` (0 for shells
        passed through), one per fitted shell; ``provenance``: the method's (of the first
        translated shell) with ``Shells``, the sidecars' per-shell records (shell-specific
        provenance such as rish-global's ``ScaleFactors`` inside them).
    """
    from ..methods import load_method, method_for_shell  # imported here: loading the ldm pulls torch

    plan, tolerance = read_plan(plan_file)
    translator = load_method(method, model_dir, options)
    mask = np.asanyarray(nib.load(mask_file).dataobj) > 0
    records = plan.shell_records()
    by_position = {r["MapShellIndex"]: r for r in records if r["MapShellIndex"] is not None}
    provenance: dict[str, Any] | None = None
    scale_files, std_files, stds = [], [], []
    out_dir = Path(out_dir)
    for k, (plan_shell, rish_file) in enumerate(zip(plan.fitted, rish_files)):
        img = nib.load(rish_file)
        rish = np.asanyarray(img.dataobj, dtype=np.float32)
        label = f"b{plan_shell.bval:.0f}"
        std = None
        if plan_shell.translated:
            shell_method = method_for_shell(translator, plan_shell.bval, tolerance)
            prediction = shell_method.predict_scale_maps(rish, mask, img.affine)
            scale, std = prediction.scale, getattr(prediction, "std", None)
            shell_provenance = dict(prediction.provenance)
            for key in SHELL_PROVENANCE_KEYS:
                if key in shell_provenance:
                    by_position[k][key] = shell_provenance.pop(key)
            provenance = provenance or shell_provenance
        else:
            scale = np.ones(rish.shape, dtype=np.float32)
        # Outside the mask lambda is 1 (set again on the output grid); here it takes the nearest value
        # inside, so that resampling to the output grid does not blend lambda with 1 at the mask's edge.
        scale_files.append(_save(fill_outside_mask(scale, mask), img.affine, out_dir / f"scale_{label}.nii"))
        stds.append((None if std is None else np.where(mask[..., None], std, 0).astype(np.float32), img.affine,
                     out_dir / f"rish_std_{label}.nii", rish.shape))
    if any(std is not None for std, *_ in stds):  # ldm with num_samples > 1: one SD map per shell
        std_files = [_save(np.zeros(shape, np.float32) if std is None else std, affine, path)
                     for std, affine, path, shape in stds]
    if provenance is None:  # no shell translated (every shell passed through or carried)
        provenance = {"Method": str(method), "RISHOrders": list(RISH_ORDERS)}
    provenance["Shells"] = records
    return {"scale_files": scale_files, "std_files": std_files, "provenance": provenance}


# ---------------------------------------------------------------------------------------------
# resample to the output grid


def resample_step(in_file: str, voxel_size: float | None, out_dir: str | os.PathLike, kind: str = "image",
                  clip_min: float | None = None, out_name: str | None = None) -> str:
    """Resample an image to the isotropic output grid (``voxel_size`` mm; ``None``: unchanged).

    ``kind="image"`` uses cubic B-spline interpolation (volume by volume), ``kind="mask"`` linear
    interpolation thresholded at 0.5. The grid keeps the input's axis directions and field of
    view (:func:`~bids_dmri_ldm.core.resample.output_grid`), so FSL-convention bvecs stay valid.
    Written as float32 (uint8 for masks) uncompressed ``.nii`` unless ``out_name`` ends in ``.gz``.
    """
    img = nib.load(in_file)
    new_affine, new_shape = output_grid(img.affine, img.shape[:3], voxel_size)
    name = out_name or Path(in_file).name.replace(".nii.gz", ".nii")
    out_path = Path(out_dir) / name
    if kind == "mask":
        data = np.asanyarray(img.dataobj) > 0
        mask = resample_to_grid(data.astype(np.float32), img.affine, new_affine, new_shape, order=1) >= 0.5
        return _save(mask.astype(np.uint8), new_affine, out_path, np.uint8)
    resampler = SeparableResampler(img.affine, img.shape[:3], new_affine, new_shape, 3)
    n_channels = 1 if len(img.shape) == 3 else int(img.shape[3])

    def channels():  # one channel in memory at a time, written as soon as it is resampled
        for c in range(n_channels):
            out = resampler(_channel(img, c))
            if clip_min is not None:
                np.maximum(out, np.float32(clip_min), out=out)
            yield out

    if len(img.shape) == 3:
        return _save(next(channels()), new_affine, out_path)
    return str(write_nifti_volumes(out_path, new_shape, new_affine, n_channels, channels()))


class SeparableResampler:
    """Resample volumes between two grids with the same axis directions, one axis at a time.

    Between a grid and its :func:`~bids_dmri_ldm.core.resample.output_grid` the map from output
    to input voxel indices is diagonal (a scale and a shift per axis), so B-spline interpolation
    (prefilter + tensor-product kernel) is the product of three 1D linear operators
    ``W_a (n_out_a, n_in_a)``. Each ``W_a`` is obtained exactly from ``scipy.ndimage`` by
    resampling the 1D unit vectors (same prefilter, same ``mode="nearest"`` edges), and a volume
    is resampled by three small matrix products. Why not ``scipy.ndimage.affine_transform`` on
    the volume: its 3D kernel costs (order+1)³ = 64 taps per output voxel (~2.5 s CPU per
    6.4 M-voxel output volume); the separable form costs ~0.1 s and gives the same values to
    float32 precision. Maps that are not diagonal (never made by this pipeline) fall back to
    :func:`~bids_dmri_ldm.core.resample.resample`.

    Parameters
    ----------
    affine, new_affine : ndarray, shape (4, 4)
        Voxel-to-world affines of the input and output grids (mm).
    in_shape, new_shape : tuple of 3 ints
    order : int
        B-spline order (3: cubic for images, 1: linear for masks).
    """

    def __init__(self, affine: np.ndarray, in_shape: tuple[int, ...], new_affine: np.ndarray,
                 new_shape: tuple[int, ...], order: int = 3):
        self.affine = np.asarray(affine, dtype=np.float64)
        self.new_affine = np.asarray(new_affine, dtype=np.float64)
        self.in_shape = tuple(int(n) for n in in_shape[:3])
        self.new_shape = tuple(int(n) for n in new_shape[:3])
        self.order = int(order)
        mapping = np.linalg.inv(self.affine) @ self.new_affine
        matrix, offset = mapping[:3, :3], mapping[:3, 3]
        scale = np.diag(matrix)
        self.separable = bool(np.allclose(matrix, np.diag(scale), atol=1e-9))
        self.identity = self.separable and np.allclose(scale, 1) and np.allclose(offset, 0) \
            and self.in_shape == self.new_shape
        self.weights = ([_axis_weights(n, m, s, o, self.order) for n, m, s, o in
                         zip(self.in_shape, self.new_shape, scale, offset)]
                        if self.separable and not self.identity else None)

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        """Resample one ``(X, Y, Z)`` volume; returns float32 ``new_shape`` (Fortran-ordered for a
        Fortran-ordered volume, else C-ordered)."""
        if self.identity:
            return np.array(volume, dtype=np.float32, order="C")
        if not self.separable:
            return resample(np.asarray(volume, dtype=np.float32), self.affine, self.new_affine, self.new_shape,
                            order=self.order)
        # Contiguous operands only: numpy's matmul over a stack of non-contiguous matrices falls
        # back to a loop without BLAS (1-2 s per HCP-size volume instead of ~0.2 s). A volume
        # read from a NIfTI file is Fortran-ordered: its transpose is C-ordered, so it is
        # resampled as (Z, Y, X) with the weights in reverse order and the result, transposed
        # back, is Fortran-ordered too (no copy in, none out: the writer streams it as is).
        # torch: the three products run multi-threaded.
        volume = np.asarray(volume, dtype=np.float32)
        w0, w1, w2 = self._torch_weights()
        if volume.flags.f_contiguous and not volume.flags.c_contiguous:
            return self._separable(_read_only_tensor(volume.T), w2, w1, w0).T
        return self._separable(_read_only_tensor(np.ascontiguousarray(volume)), w0, w1, w2)

    @staticmethod
    def _separable(x: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, wc: torch.Tensor) -> np.ndarray:
        """``x (A, B, C)`` C-ordered -> ``(A', B', C')``: ``wc`` on the last axis, then ``wb``, then
        ``wa`` (the fastest order measured: 0.1 s vs 0.8 s per 6.4 M-voxel volume when the
        product over the first axis comes first)."""
        na, nb, _ = x.shape
        out = (x.reshape(na * nb, -1) @ wc.T).reshape(na, nb, -1)  # (A, B, C')
        out = torch.matmul(wb, out)  # (A, B', C'), one small product per a
        return (wa @ out.reshape(na, -1)).reshape(wa.shape[0], wb.shape[0], wc.shape[0]).numpy()

    def _torch_weights(self):
        if getattr(self, "_weights_t", None) is None:
            self._weights_t = [torch.from_numpy(w) for w in self.weights]
        return self._weights_t


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, which may be a read-only memory map: the tensor is
    only read, so torch's warning about non-writable arrays does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _axis_weights(n_in: int, n_out: int, scale: float, offset: float, order: int) -> np.ndarray:
    """1D B-spline resampling operator ``(n_out, n_in)`` float32: output ``o`` samples input
    coordinate ``scale * o + offset`` (column ``i`` = scipy's result for the unit vector ``e_i``)."""
    from scipy import ndimage

    eye = np.eye(n_in, dtype=np.float64)
    cols = [ndimage.affine_transform(eye[i], np.array([scale]), offset, output_shape=(n_out,), order=order,
                                     mode="nearest") for i in range(n_in)]
    return np.stack(cols, axis=1).astype(np.float32)


def resample_to_grid(data: np.ndarray, affine: np.ndarray, new_affine: np.ndarray, new_shape: tuple[int, ...],
                     order: int = 3) -> np.ndarray:
    """Resample ``(X, Y, Z)`` or ``(X, Y, Z, C)`` channel by channel (:class:`SeparableResampler`).

    Returns float32 ``new_shape (+ (C,))``; memory: the result plus one output volume.
    """
    resampler = SeparableResampler(affine, data.shape[:3], new_affine, new_shape, order)
    if data.ndim == 3:
        return resampler(data)
    out = np.empty(tuple(new_shape[:3]) + (data.shape[-1],), dtype=np.float32)
    for c in range(data.shape[-1]):
        out[..., c] = resampler(data[..., c])
    return out


def grid_changes(affine: np.ndarray, shape: tuple[int, ...], voxel_size: float | None) -> bool:
    """Whether resampling to ``voxel_size`` changes the grid (decides the ``res-`` entity)."""
    new_affine, new_shape = output_grid(affine, shape[:3], voxel_size)
    return tuple(new_shape) != tuple(shape[:3]) or not np.allclose(new_affine, affine, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# scale SH (Eq. 3) and rebuild


def scale_sh_step(sh_files: list[str], scale_files: list[str], mask_file: str, sh_order_max: int,
                  out_dir: str | os.PathLike, orders: tuple[int, ...] = RISH_ORDERS,
                  skull_strip: bool = False, std_files: list[str] | None = None) -> dict[str, Any]:
    """Apply each fitted shell's scale maps to its SH coefficients (Eq. 3) on the output grid, in
    every voxel, one shell at a time; then stack the shells' maps into the derivatives.

    lambda is taken inside the brain mask and is 1 outside it, where the source coefficients pass
    unchanged (the scale file holds, outside the mask, the nearest value inside —
    :func:`predict_scale_step` — so that the resampled lambda is not blended with 1 at the edge).
    Both RISH maps written are taken (Eq. 1) from coefficients on the output grid — the source
    ones from the resampled coefficients, the predicted ones from the scaled coefficients — so
    that ``RISH_predicted = lambda^2 RISH_source`` holds voxel by voxel (RISH of an interpolated
    field is not the interpolated RISH). The coefficients are streamed one channel at a time:
    memory holds one shell's scale maps, its RISH sums and one coefficient volume.

    Returns
    -------
    dict
        ``sh_files`` (scaled coefficients per shell, ``.nii``), and the derivative-ready
        ``.nii.gz`` images ``scale_file`` (lambda inside the mask, 1 outside),
        ``rish_source_file`` and ``rish_predicted_file`` (defined in every voxel; 0 outside the
        mask with ``skull_strip``) and, given ``std_files``, ``std_file``: ``len(orders)``
        volumes per shell, the shells in the order given (ascending b).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_img = nib.load(mask_file)
    mask = np.asanyarray(mask_img.dataobj) > 0
    affine, shape = mask_img.affine, tuple(int(n) for n in mask_img.shape[:3])
    scaled_files, per_shell = [], {"scale": [], "rish_source": [], "rish_predicted": []}
    for k, (sh_file, scale_file) in enumerate(zip(sh_files, scale_files)):
        parts = _scale_one_shell(sh_file, scale_file, mask, sh_order_max, orders, skull_strip,
                                 out_dir / f"shell{k}")
        scaled_files.append(parts.pop("sh_file"))
        for key, path in parts.items():
            per_shell[key].append(path)
    out = {"sh_files": scaled_files}
    names = {"scale": "scale_maps.nii.gz", "rish_source": "rish_source.nii.gz",
             "rish_predicted": "rish_predicted.nii.gz"}
    for key, name in names.items():
        out[f"{key}_file"] = stack_channels(per_shell[key], shape, affine, out_dir / name, len(orders),
                                            fill=1.0 if key == "scale" else 0.0)
    if std_files:
        out["std_file"] = stack_channels(std_files, shape, affine, out_dir / "rish_std.nii.gz", len(orders))
    return out


def _scale_one_shell(sh_file: str, scale_file: str, mask: np.ndarray, sh_order_max: int,
                     orders: tuple[int, ...], skull_strip: bool, out_dir: Path) -> dict[str, str]:
    """Eq. 3 on one shell (see :func:`scale_sh_step`); its maps as ``.nii`` in ``out_dir``."""
    img = nib.load(sh_file)
    affine, shape = img.affine, tuple(int(n) for n in img.shape[:3])
    l_values = sh_basis(np.array([[0.0, 0.0, 1.0]]), sh_order_max)[2]
    scale_img = nib.load(scale_file)
    # Fortran order, as the NIfTI channels are read and written: every product below is an
    # elementwise pass over contiguous memory and is written without a transposing copy.
    lam = np.empty(shape + (len(orders),), dtype=np.float32, order="F")
    for c in range(len(orders)):
        lam[..., c] = np.where(mask, np.maximum(_channel(scale_img, c), 0.0), 1.0)
    rish_source = np.zeros(shape + (len(orders),), dtype=np.float32, order="F")
    rish_predicted = np.zeros(shape + (len(orders),), dtype=np.float32, order="F")
    slot = {int(order): k for k, order in enumerate(orders)}

    def scaled_channels():
        for c, order in enumerate(l_values):
            coeff = _channel(img, c)
            k = slot.get(int(order))
            if k is None:  # an order without a scale map keeps lambda = 1
                yield coeff
                continue
            scaled = coeff * lam[..., k]  # Eq. 3
            rish_source[..., k] += np.square(coeff)  # Eq. 1
            rish_predicted[..., k] += np.square(scaled)
            yield scaled

    sh_path = write_nifti_volumes(out_dir / "sh_scaled.nii", shape, affine, len(l_values), scaled_channels())
    if skull_strip:
        rish_source[~mask] = 0.0
        rish_predicted[~mask] = 0.0
    return {
        "sh_file": str(sh_path),
        "scale": _write_4d(lam, affine, out_dir / "scale.nii"),
        "rish_source": _write_4d(rish_source, affine, out_dir / "rish_source.nii"),
        "rish_predicted": _write_4d(rish_predicted, affine, out_dir / "rish_predicted.nii"),
    }


def stack_channels(files: list[str], shape: tuple[int, ...], affine: np.ndarray, path: Path,
                   n_channels: int, fill: float = 0.0) -> str:
    """Stack the channels of several images of ``n_channels`` into one file (streamed channel by
    channel: memory holds one volume); no file (no shell was fitted): ``n_channels`` volumes of
    ``fill``."""
    def channels():
        if not files:
            for _ in range(n_channels):
                yield np.full(shape, fill, np.float32)
        for file in files:
            img = nib.load(file)
            for c in range(n_channels):
                yield _channel(img, c)

    return str(write_nifti_volumes(path, shape, affine, n_channels * max(1, len(files)), channels()))


def _channel(img: nib.Nifti1Image, c: int) -> np.ndarray:
    """Channel ``c`` of a 3D/4D image as float32 ``(X, Y, Z)`` (a 3D image has one channel)."""
    data = img.dataobj if len(img.shape) == 3 else img.dataobj[..., c]
    return np.asarray(data, dtype=np.float32)


def _write_4d(values: np.ndarray, affine: np.ndarray, path: Path) -> str:
    """Stream a ``(X, Y, Z, C)`` array to a NIfTI file channel by channel (:func:`write_nifti_volumes`)."""
    shape = values.shape[:3]
    return str(write_nifti_volumes(path, shape, affine, values.shape[3],
                                   (values[..., c] for c in range(values.shape[3]))))


def rebuild_step(s0_file: str, dwi_file: str, mean_b0_file: str, sh_files: list[str], mask_file: str,
                 plan_file: str, bval_file: str, bvec_file: str, sh_order_max: int, out_dir: str | os.PathLike,
                 integer_output: bool = False, skull_strip: bool = False,
                 report_samples: str | os.PathLike | None = None) -> dict[str, str]:
    """Write the 7T-like DWI on the output table, volume by volume in its order, in every voxel of
    the output grid (outside the brain mask lambda = 1, so the source signal is carried there);
    with ``skull_strip`` every volume is zero outside the mask.

    Each output volume (:class:`~bids_dmri_ldm.core.shells.VolumePlan`) is

    * rebuilt from its shell's scaled SH: ``S0 * max(sum C_hat Y(g), 0)`` on its direction ``g``
      (any direction: the input's, or a given table's);
    * an input volume carried through (a b0, or a volume of a shell with too few directions for
      the SH fit), resampled, clipped >= 0;
    * the input's mean b0, resampled, clipped >= 0 (the b0 rows of a given table).

    ``s0_file``, ``sh_files`` (per fitted shell, ascending b) and ``mask_file`` are on the output
    grid; ``dwi_file`` (the volumes read, :func:`load_dwi_step`) and ``mean_b0_file`` may be on
    the input grid, in which case each carried volume is resampled (cubic B-spline) as it is
    written. Memory is bounded: the coefficients ``(n_voxels, K)`` of every fitted shell over the
    rebuilt region (the whole grid, or the mask with ``skull_strip``) and a few output volumes
    are held, and the image is streamed to disk volume by volume (:func:`write_nifti_volumes`,
    ISA-L gzip level 1) — never the whole ``(X, Y, Z, N)`` array.

    On-disk type: float32; with ``integer_output`` (the source was stored as integers) int16
    with a ``scl_slope`` (:func:`int16_slope`, bounded over the rebuilt region), half the size
    and write/read time, a quantisation step of about 1/20000 of the largest b0 value.

    Returns ``dwi_file`` (``.nii.gz``), ``bval_file``, ``bvec_file`` (the output table) and
    ``mask_file`` (the derivative-ready ``.nii.gz`` mask). With ``report_samples`` (a path), what
    the participant report needs from the output is recorded as it is written
    (:class:`ReportSamples`).
    """
    plan, _ = read_plan(plan_file)
    mask_img = nib.load(mask_file)
    affine, shape = mask_img.affine, tuple(int(n) for n in mask_img.shape[:3])
    mask = np.asanyarray(mask_img.dataobj) > 0
    region = mask if skull_strip else np.ones(shape, dtype=bool)
    voxels = np.flatnonzero(region.ravel(order="F"))  # NIfTI (Fortran) order of the written volumes
    coeffs = [_masked_channels(nib.load(f), voxels) for f in sh_files]  # (K, n_region) per shell
    s0 = _masked_channels(nib.load(s0_file), voxels)[0]
    dw = plan.out_shell >= 0
    basis = np.zeros((plan.out_bvals.size, n_coefficients(sh_order_max)), dtype=np.float32)
    if dw.any():
        basis[dw] = sh_basis(plan.out_bvecs[dw], sh_order_max)[0]
    carried = _CarriedVolumes(plan, nib.load(dwi_file), nib.load(mean_b0_file), shape, affine)
    dtype, slope = (np.int16, int16_slope(carried.max_value(), coeffs, s0, basis, plan.out_shell)) \
        if integer_output else (np.float32, None)
    volumes = _output_volumes(plan, carried, coeffs, s0, basis, shape, region, voxels, slope)
    out_dir = Path(out_dir)
    n_volumes = plan.out_bvals.size
    samples = None
    if report_samples:
        samples = ReportSamples(mask, affine, np.flatnonzero(b0_mask(plan.out_bvals)), n_volumes, slope)
        volumes = samples.observe(volumes)
    dwi_path = write_nifti_volumes(out_dir / "dwi_7tlike.nii.gz", shape, affine, n_volumes, volumes,
                                   dtype=dtype, slope=slope)
    if samples is not None:
        samples.save(Path(report_samples), dwi_path)
    return {
        "dwi_file": str(dwi_path),
        "bval_file": str(bval_file),
        "bvec_file": str(bvec_file),
        "mask_file": _save(mask.astype(np.uint8), affine, out_dir / "brain_mask.nii.gz", np.uint8),
    }


#: File name of the rebuild's :class:`ReportSamples` (beside its work folder).
REPORT_SAMPLES = "report_samples.npz"


class ReportSamples:
    """What the participant report needs from the 7T-like DWI, recorded while it is written.

    The report shows the output's FA on a few slices and its mean b0
    (:func:`~bids_dmri_ldm.core.display.stored_display_voxels`); reading them back means
    inflating the whole output again (1.3 GB at HCP size). Here the signal of every volume at
    those voxels and the mean of the b0 volumes (``b0_index``: the output table's b0 rows, as
    the report finds them) are kept as the volumes stream past — image values: volumes already
    quantised to int16 (``slope``) are multiplied back by the slope, float volumes are recorded
    before the writer quantises them — and saved with the size and gzip trailer (CRC-32 +
    length) of the file they belong to: the report uses them only for that exact file.
    """

    def __init__(self, mask: np.ndarray, affine: np.ndarray, b0_index, n_volumes: int,
                 slope: float | None = None):
        self.ijk = stored_display_voxels(mask, affine)
        self.index = tuple(self.ijk.T)
        self.b0_index = {int(t) for t in np.atleast_1d(b0_index)}
        self.slope = slope
        self.signals = np.empty((len(self.ijk), n_volumes), dtype=np.float32)
        self.b0_sum = np.zeros(mask.shape, dtype=np.float64)

    def observe(self, volumes):
        """Pass ``volumes`` through, recording each."""
        for t, volume in enumerate(volumes):
            values = volume[self.index]
            if self.slope is not None and np.issubdtype(volume.dtype, np.integer):
                values = values.astype(np.float32) * np.float32(self.slope)
            self.signals[:, t] = values
            if t in self.b0_index:
                if self.slope is not None and np.issubdtype(volume.dtype, np.integer):
                    self.b0_sum += volume.astype(np.float64) * self.slope
                else:
                    self.b0_sum += volume
            yield volume

    def save(self, path: Path, dwi_path: Path) -> str:
        with open(dwi_path, "rb") as handle:
            handle.seek(-8, os.SEEK_END)
            tail = handle.read(8)
        mean_b0 = (self.b0_sum / max(len(self.b0_index), 1)).astype(np.float32)
        with open(path, "wb") as handle:
            np.savez(handle, ijk=self.ijk, signals=self.signals, mean_b0=mean_b0,
                     dwi_bytes=np.int64(os.path.getsize(dwi_path)), dwi_tail=np.frombuffer(tail, np.uint8))
        return str(path)


#: Output volumes rebuilt per matrix product (bounds the ``(batch, n_region)`` temporary).
REBUILD_BATCH_BYTES = 256 * 2**20


#: Headroom for cubic B-spline overshoot of the resampled b0 volumes above the input's maximum.
B0_OVERSHOOT = 1.5


class _CarriedVolumes:
    """Input volumes carried into the output (b0s, volumes of shells not SH-fitted, the mean b0),
    resampled from the input grid to the output grid one at a time."""

    def __init__(self, plan: VolumePlan, read_img: nib.Nifti1Image, mean_b0_img: nib.Nifti1Image,
                 shape: tuple[int, ...], affine: np.ndarray):
        self.plan, self.read_img, self.mean_b0_img = plan, read_img, mean_b0_img
        self.position = {int(t): k for k, t in enumerate(plan.read_index)}
        same_grid = tuple(read_img.shape[:3]) == tuple(shape) and np.allclose(read_img.affine, affine, atol=1e-5)
        self.resampler = None if same_grid else SeparableResampler(read_img.affine, read_img.shape[:3], affine,
                                                                   shape, 3)
        self._mean_b0 = None

    def input_volume(self, source: int) -> np.ndarray:
        """Input volume ``source`` (or the mean b0 for :data:`MEAN_B0`) on the input grid, float32."""
        if source == MEAN_B0:
            return np.array(self.mean_b0_img.dataobj, dtype=np.float32)
        # a copy: the file may be memory-mapped read-only
        return np.array(self.read_img.dataobj[..., self.position[int(source)]], dtype=np.float32)

    def __call__(self, source: int) -> np.ndarray:
        """Volume ``source`` on the output grid, clipped >= 0."""
        if source == MEAN_B0 and self._mean_b0 is not None:
            return self._mean_b0.copy()
        volume = self.input_volume(source)
        volume = volume if self.resampler is None else self.resampler(volume)
        np.maximum(volume, 0.0, out=volume)
        if source == MEAN_B0:
            self._mean_b0 = volume.copy()
        return volume

    def max_value(self) -> float:
        """Largest value of the carried volumes on the input grid (bounds the int16 output)."""
        sources = sorted({int(t) for t in self.plan.out_source if t >= 0 or t == MEAN_B0})
        return max((float(np.max(self.input_volume(t))) for t in sources), default=0.0)


def int16_slope(carried_max: float, coeffs: list[np.ndarray], s0: np.ndarray, basis: np.ndarray,
                out_shell: np.ndarray) -> float:
    """``scl_slope`` that maps the largest possible output value to 32767.

    Bounds, computed before any volume is written (the output is streamed): carried volumes
    (b0s), their input maximum ``carried_max`` times :data:`B0_OVERSHOOT`; rebuilt volumes, by
    Cauchy-Schwarz, ``S0 * |C| * max_g |Y(g)|`` per voxel and shell (``|.|`` the Euclidean norm
    over the K coefficients, ``g`` the shell's output directions). Values above the bound cannot
    occur in the rebuilt volumes; b0 overshoot beyond it is clipped. Each ``coeffs[k]`` is
    ``(K, n_voxels)``.
    """
    top = B0_OVERSHOOT * carried_max
    for k, shell_coeffs in enumerate(coeffs):
        rows = basis[out_shell == k]
        if not rows.size:
            continue
        basis_norm = float(np.sqrt(np.square(rows, dtype=np.float64).sum(axis=1)).max())
        for start in range(0, s0.size, 1 << 20):  # in chunks: no (K, n_voxels) temporary
            chunk = slice(start, start + (1 << 20))
            norms = np.sqrt(np.einsum("ij,ij->j", shell_coeffs[:, chunk], shell_coeffs[:, chunk]))
            top = max(top, float(np.max(s0[chunk] * norms)) * basis_norm)
    return top / 32767.0 if top > 0 else 1.0


def _masked_channels(img: nib.Nifti1Image, voxels: np.ndarray) -> np.ndarray:
    """``(C, len(voxels))`` float32: the channels of a 3D/4D image at Fortran-order flat indices,
    read one channel at a time (an uncompressed ``.nii`` is memory-mapped); each row is
    contiguous, so one output volume is one matrix product away."""
    n_channels = 1 if len(img.shape) == 3 else int(img.shape[3])
    out = np.empty((n_channels, voxels.size), dtype=np.float32)
    data = img.dataobj
    for c in range(n_channels):
        volume = np.asanyarray(data if n_channels == 1 and len(img.shape) == 3 else data[..., c])
        flat = volume.ravel(order="F")
        out[c] = flat if voxels.size == flat.size else flat[voxels]  # all voxels: no gather
    return out


def _output_volumes(plan: VolumePlan, carried: _CarriedVolumes, coeffs: list[np.ndarray], s0: np.ndarray,
                    basis: np.ndarray, shape, region, voxels, slope: float | None = None):
    """Yield the output volumes ``(X, Y, Z)`` in the output table's order; zero outside ``region``
    (the whole grid unless skull-stripped). ``coeffs[k]`` is shell ``k``'s ``(K, n_region)``.

    Carried volumes are float32 (quantised by the writer). Consecutive volumes of one shell are
    rebuilt in torch (multi-threaded) with one matrix product ``Y_batch (b, K) @ C (K, n)`` (at
    most :data:`REBUILD_BATCH_BYTES` of temporary): each row of the result is one volume in
    NIfTI order, contiguous, yielded as a Fortran-ordered view (no copy, no transpose). With
    ``slope`` (int16 output) they are quantised here, on the whole batch,
    ``rint(max(C Y, 0) * (S0 / slope))`` clipped to int16: four passes over the batch instead of
    seven. ``S0 / slope`` is taken once, so a value within a float32 rounding of a half-quantum
    may round to the neighbouring integer (1/32767 of the range).
    """
    n_out = plan.out_bvals.size
    n_vox = int(np.prod(shape))
    everywhere = voxels.size == region.size
    batch = max(1, REBUILD_BATCH_BYTES // max(1, 4 * voxels.size))
    coeffs_t = [torch.from_numpy(c) for c in coeffs]
    s0_t = torch.from_numpy(s0) if slope is None else torch.from_numpy(s0) / np.float32(slope)
    basis_t = torch.from_numpy(np.ascontiguousarray(basis, dtype=np.float32))
    j = 0
    while j < n_out:
        k = int(plan.out_shell[j])
        if k < 0:
            volume = carried(int(plan.out_source[j]))
            if not everywhere:
                volume[~region] = 0.0
            yield volume
            j += 1
            continue
        stop = j + 1
        while stop < n_out and stop - j < batch and int(plan.out_shell[stop]) == k:
            stop += 1
        attenuation = basis_t[j:stop] @ coeffs_t[k]  # (stop - j, n_region)
        attenuation.clamp_(min=0.0).mul_(s0_t)
        values = attenuation.numpy()
        if slope is not None:  # numpy's float32 -> int16 cast is ~2x faster than torch's
            values = attenuation.round_().clamp_(max=32767.0).numpy().astype(np.int16)
        for c in range(values.shape[0]):
            if everywhere:  # voxels = 0 .. n_vox - 1 in Fortran order: no scatter needed
                yield values[c].reshape(shape, order="F")
                continue
            flat = np.zeros(n_vox, dtype=values.dtype)
            flat[voxels] = values[c]
            yield flat.reshape(shape, order="F")
        j = stop


def rebuild_dwi_volumes(s0: np.ndarray, b0: np.ndarray, coeffs: np.ndarray, basis: np.ndarray,
                        mask: np.ndarray, skull_strip: bool = False) -> np.ndarray:
    """``(X, Y, Z, n_b0 + M)`` float32 rebuilt DWI in every voxel (zero outside ``mask`` with
    ``skull_strip``): the in-memory form of :func:`rebuild_step`, for small arrays."""
    from ..core.signal import rebuild_dwi

    dwi = rebuild_dwi(s0, b0, coeffs, basis)
    if skull_strip:
        dwi[~mask] = 0.0
    return dwi


# ---------------------------------------------------------------------------------------------
# helpers


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype=np.float32) -> str:
    save_nifti(make_nifti(data, affine, dtype), path)  # atomic; .nii.gz through ISA-L gzip
    return str(path)


def write_json(obj: Any, path: str | os.PathLike) -> str:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True))
    return str(path)
