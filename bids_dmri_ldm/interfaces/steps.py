"""Plain functions behind the participant-level interfaces (files in, files out; no nipype).

Each ``*_step`` function reads its inputs from disk, calls the signal core / the method registry,
and writes its results into ``out_dir`` (NIfTI float32, mm/s units, the input's affine or the
output grid's). The nipype interfaces in :mod:`.dwi` and :mod:`.bids` are thin wrappers around
them, and the group level calls them directly. Intermediate images are uncompressed ``.nii``
(fast in the work directory); images that become derivatives are ``.nii.gz``.

Volume order of the selected data: the b0 volumes first (input order), then the selected shell's
volumes (input order) — :attr:`bids_dmri_ldm.core.gradients.ShellSelection.index`.
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
from ..core.gradients import (
    B0_THRESHOLD,
    GradientError,
    ShellSelection,
    check_gradients,
    load_gradients,
    select_shell,
)
from ..core.display import stored_display_voxels
from ..core.mask import brain_mask
from ..core.resample import fill_outside_mask, output_grid, resample
from ..core.sh import RISH_ORDERS, SHModel, sh_basis
from ..core.signal import fit_shell_rish
from ..io.nifti import READ_ERRORS, iter_nifti_volumes, nifti_layout, read_nifti_volumes, save_nifti
from ..io.nifti import write_nifti_volumes as write_nifti_volumes  # re-exported for callers of steps

LOGGER = logging.getLogger("bids_dmri_ldm.workflow")

# Errors raised by nibabel/gzip/zlib/ISA-L when a .nii.gz is truncated or not what it claims to be.
_READ_ERRORS = READ_ERRORS


class InputDataError(ValueError):
    """An input run cannot be processed as given (bad image, gradients, shell, mask).

    The message is one line saying what is wrong and, where possible, what to do; the workflow
    reports it as the run's failure reason (exit code 65, "data format error").
    """


# ---------------------------------------------------------------------------------------------
# input checks (header + text files only: cheap, done before any work)


@dataclass(frozen=True)
class InputSummary:
    """What a header-only check learned about a run."""

    shape: tuple[int, ...]
    affine: np.ndarray
    voxel_size: tuple[float, float, float]
    selection: ShellSelection


def check_run_inputs(dwi_file: str | os.PathLike, bval_file: str | os.PathLike | None,
                     bvec_file: str | os.PathLike | None, shell: float, tolerance: float,
                     sh_order_max: int = 4) -> InputSummary:
    """Check a DWI run from its header and gradient files, without reading the voxel data.

    Raises
    ------
    InputDataError
        Missing/empty/mismatched bval or bvec, not a 4D image, unreadable header, complex or
        non-numeric voxel type, a degenerate voxel-to-world affine, no b0, no volume near
        ``shell``, or too few directions for ``sh_order_max``.
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
        selection = select_shell(clean_bvals(bvals), clean, shell, tolerance)
    except GradientError as err:
        raise InputDataError(f"{name}: {err}") from None
    needed = {2: 6, 4: 15, 6: 28, 8: 45}.get(sh_order_max, 0)
    if selection.shell_index.size < needed:
        raise InputDataError(
            f"{name}: the b={selection.shell_bval:.0f} shell has {selection.shell_index.size} directions; "
            f"SH order {sh_order_max} (RISH L0-L{sh_order_max}) needs at least {needed}"
        )
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return InputSummary(shape=shape, affine=affine, voxel_size=zooms, selection=selection)


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


def select_shell_step(dwi_file: str, bval_file: str | None, bvec_file: str | None, shell: float,
                      tolerance: float, sh_order_max: int, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Check the run and write the gradient table of the kept volumes (b0s, then the shell).

    Returns
    -------
    dict
        ``bval_file``, ``bvec_file`` (FSL, of the kept volumes), ``index`` (list of input volume
        indices, in output order), ``n_b0``, ``shell_bval``, ``warnings`` (see
        :func:`selection_warnings`; also logged).
    """
    summary = check_run_inputs(dwi_file, bval_file, bvec_file, shell, tolerance, sh_order_max)
    sel = summary.selection
    index = sel.index
    out_dir = Path(out_dir)
    bval_out, bvec_out = write_bval_bvec(sel.bvals[index], sel.bvecs[index],
                                         out_dir / "selected.bval", out_dir / "selected.bvec")
    warnings = selection_warnings(Path(dwi_file).name, sel, shell, tolerance)
    for message in warnings:
        LOGGER.warning("%s", message)
    return {"bval_file": str(bval_out), "bvec_file": str(bvec_out), "index": [int(i) for i in index],
            "n_b0": sel.n_b0, "shell_bval": sel.shell_bval, "warnings": warnings}


def selection_warnings(name: str, sel: ShellSelection, shell: float, tolerance: float) -> list[str]:
    """One-line warnings about a shell selection: volumes dropped (other shells), and shell
    b-values that differ from ``shell`` (the tolerance was used). Recorded in the run's sidecar
    (``RunWarnings``) and shown in the participant report."""
    warnings = []
    kept = np.zeros(sel.bvals.size, dtype=bool)
    kept[sel.index] = True
    if not kept.all():
        dropped = sorted({round(float(b)) for b in sel.bvals[~kept]})
        shown = ", ".join(str(b) for b in dropped[:8]) + (", ..." if len(dropped) > 8 else "")
        warnings.append(f"{name}: {int((~kept).sum())} of {kept.size} volume(s) dropped "
                        f"(b-values {shown} s/mm²; only the b0s and the b={shell:g} shell are translated)")
    shell_b = sel.bvals[sel.shell_index]
    if np.abs(shell_b - shell).max() > 0.5:
        warnings.append(f"{name}: the b={shell:g} shell was taken with the tolerance of {tolerance:g} s/mm²: "
                        f"b-values {shell_b.min():g} to {shell_b.max():g} (mean {shell_b.mean():.1f}) "
                        "treated as one shell")
    return warnings


def read_volumes(dwi_file: str | os.PathLike, index: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Read the volumes ``index`` of a 4D image as float32 ``(X, Y, Z, len(index))``.

    One streamed pass over the file (:func:`~bids_dmri_ldm.io.nifti.read_nifti_volumes`: ISA-L
    inflation, each kept volume converted into its slot with the scaling slope/intercept; no
    copy of the whole stored series).

    Raises
    ------
    InputDataError
        When the data cannot be decompressed or read (corrupt or truncated file).
    """
    name = Path(dwi_file).name
    try:
        layout = nifti_layout(dwi_file)
        if len(layout.header.get_data_shape()) != 4:
            raise InputDataError(f"{name}: a DWI run must be a 4D image; found shape {layout.header.get_data_shape()}")
        data, layout = read_nifti_volumes(dwi_file, index, np.float32, layout)
    except InputDataError:
        raise
    except _READ_ERRORS as err:
        raise InputDataError(f"{name}: cannot read the image data, the file is corrupt or truncated ({_short(err)})") from None
    return data, layout.affine


def load_dwi_step(dwi_file: str, index: list[int], n_b0: int, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read the kept volumes, replace NaN/Inf by 0 and record where they were.

    The input is streamed once, volume by volume (:func:`~bids_dmri_ldm.io.nifti.iter_nifti_volumes`),
    into an uncompressed ``.nii`` in output order (b0s, then the shell) while the means and the
    bad-voxel map are accumulated: memory holds a few volumes, never the series. The kept volumes
    stay in the stored integer type when the source is stored as integers without scaling (half
    the bytes of float32; no NaN is possible), else they are float32 image values.

    Returns
    -------
    dict
        ``dwi_file`` (``.nii``, kept volumes), ``mean_b0_file``, ``mean_dwi_file`` (mean of the
        shell's volumes; helps the automatic mask tell air from tissue), ``bad_voxels_file``
        (uint8, 1 where any kept volume was NaN/Inf), ``n_bad_voxels``, ``warnings`` (list of
        one-line messages, also logged), ``integer_input`` (the source is stored as integers).
    """
    name = Path(dwi_file).name
    out_dir = Path(out_dir)
    try:
        layout = nifti_layout(dwi_file)
        if len(layout.header.get_data_shape()) != 4:
            raise InputDataError(f"{name}: a DWI run must be a 4D image; found shape {layout.header.get_data_shape()}")
        sums, bad, out_path = _stream_selected(dwi_file, layout, [int(i) for i in index], n_b0, out_dir)
    except InputDataError:
        raise
    except _READ_ERRORS as err:
        raise InputDataError(f"{name}: cannot read the image data, the file is corrupt or truncated ({_short(err)})") from None
    n_bad = int(bad.sum())
    warnings = []
    if n_bad:
        warnings.append(f"{name}: {n_bad} voxel(s) with NaN/Inf values are set to 0 and left out "
                        "of the brain mask")
        LOGGER.warning("%s", warnings[-1])
    affine = layout.affine
    n_shell = len(index) - n_b0
    files = {
        "dwi_file": out_path,
        "mean_b0_file": _save((sums[0] / max(n_b0, 1)).astype(np.float32), affine, out_dir / "mean_b0.nii"),
        "mean_dwi_file": _save((sums[1] / max(n_shell, 1)).astype(np.float32), affine, out_dir / "mean_dwi.nii"),
        "bad_voxels_file": _save(bad.astype(np.uint8), affine, out_dir / "bad_voxels.nii", np.uint8),
    }
    files["n_bad_voxels"] = n_bad
    files["warnings"] = warnings
    files["integer_input"] = bool(np.issubdtype(layout.dtype, np.integer))
    return files


#: Stored integer types the selected volumes keep (torch converts them to float32 in the SH fit).
_KEPT_INTEGER_TYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.int32))


def _stream_selected(dwi_file, layout, index: list[int], n_b0: int, out_dir: Path):
    """Copy the volumes ``index`` of ``dwi_file`` into ``out_dir/dwi_selected.nii`` (output order,
    written at each volume's offset), sanitised; return the float32 sums ``(b0 sum, shell sum)``,
    the bad-voxel map and the path."""
    keep_integer = layout.dtype.newbyteorder("=") in _KEPT_INTEGER_TYPES and not layout.scaled
    dtype = layout.dtype.newbyteorder("=") if keep_integer else np.dtype(np.float32)
    slots: dict[int, list[int]] = {}
    for slot, t in enumerate(index):
        slots.setdefault(t, []).append(slot)
    header = make_nifti(np.zeros((1, 1, 1), np.float32), layout.affine).header
    header.set_data_dtype(dtype)
    header.set_data_shape(layout.shape + (len(index),))
    header.set_data_offset(352)
    out_path = out_dir / "dwi_selected.nii"
    out_dir.mkdir(parents=True, exist_ok=True)
    volume_bytes = int(np.prod(layout.shape)) * dtype.itemsize
    sums = np.zeros((2,) + layout.shape, dtype=np.float32, order="F")
    bad = np.zeros(layout.shape, dtype=bool, order="F")
    with open(out_path, "wb") as handle:
        header.write_to(handle)
        handle.truncate(352 + len(index) * volume_bytes)
        for t, stored in iter_nifti_volumes(dwi_file, layout):
            if t not in slots:
                continue
            if keep_integer:
                volume = stored
            else:
                volume = stored.astype(np.float32, order="F")
                if layout.slope != 1.0:
                    volume *= np.float32(layout.slope)
                if layout.inter != 0.0:
                    volume += np.float32(layout.inter)
                finite = np.isfinite(volume)
                if not finite.all():
                    bad |= ~finite
                    volume[~finite] = 0.0
            data = memoryview(np.asarray(volume, dtype=dtype).ravel(order="F"))  # NIfTI order, no copy
            for slot in slots[t]:
                handle.seek(352 + slot * volume_bytes)
                handle.write(data)
                np.add(sums[0 if slot < n_b0 else 1], volume, out=sums[0 if slot < n_b0 else 1], casting="unsafe")
    return sums, bad, str(out_path)


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


def _shell_parts(bval_file: str, bvec_file: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bvals, bvecs = load_gradients(bval_file, bvec_file)
    is_b0 = bvals <= B0_THRESHOLD
    return np.flatnonzero(is_b0), np.flatnonzero(~is_b0), bvecs[~is_b0]


def fit_rish_step(dwi_file: str, bval_file: str, bvec_file: str, mask_file: str | None, sh_order_max: int,
                  out_dir: str | os.PathLike, orders: tuple[int, ...] = RISH_ORDERS) -> dict[str, str]:
    """Normalise (S/S0 in [0, 1]), fit SH (least squares, order ``sh_order_max``) and take RISH,
    in every voxel of the grid.

    The whole field of view is fitted, not only the brain mask, so that the output can carry the
    source signal everywhere (lambda = 1 outside the mask). Background voxels stay bounded: S0 is
    floored (:data:`~bids_dmri_ldm.core.signal.DEFAULT_S0_FLOOR`) and S/S0 clipped to [0, 1], so
    air rebuilds to at most ~S0 (noise level) and voxels without signal to 0. ``mask_file`` is not
    used by the fit (accepted so callers can pass the run's mask).

    Returns
    -------
    dict
        ``s0_file`` (X,Y,Z), ``b0_file`` (X,Y,Z,n_b0), ``sh_file`` (X,Y,Z,K) and ``rish_file``
        (X,Y,Z,len(orders)), float32 ``.nii`` on the input grid.
    """
    b0_index, dwi_index, bvecs_shell = _shell_parts(bval_file, bvec_file)
    img = nib.load(dwi_file)
    data = _image_values(img)  # memory-mapped when unscaled (as load_dwi_step writes it)
    try:
        model = SHModel(bvecs_shell, sh_order_max=sh_order_max)
    except ValueError as err:
        raise InputDataError(str(err)) from None
    everywhere = np.ones(data.shape[:3], dtype=bool)
    s0, coeffs, rish = fit_shell_rish(data, b0_index, dwi_index, everywhere, model.fit_matrix, model.l_values, orders)
    out_dir = Path(out_dir)
    return {
        "s0_file": _save(s0, img.affine, out_dir / "s0.nii"),
        "b0_file": _save(data[..., b0_index], img.affine, out_dir / "b0.nii", _value_type(data.dtype)),
        "sh_file": _save(coeffs, img.affine, out_dir / "sh.nii"),
        "rish_file": _save(rish, img.affine, out_dir / "rish_source.nii"),
    }


def _image_values(img: nib.Nifti1Image) -> np.ndarray:
    """The image values: the stored array (memory-mapped for an uncompressed ``.nii``, any
    number type) when the header has no scaling, else float32 scaled values."""
    proxy = img.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    if hasattr(proxy, "get_unscaled") and slope in (None, 1.0) and inter in (None, 0.0):
        return proxy.get_unscaled()
    return np.asanyarray(proxy, dtype=np.float32)


def _value_type(dtype: np.dtype):
    """On-disk type that holds values of ``dtype`` exactly (integers kept, floats as float32)."""
    dtype = np.dtype(dtype)
    return dtype.newbyteorder("=") if np.issubdtype(dtype, np.integer) else np.float32


# ---------------------------------------------------------------------------------------------
# method -> scale maps (Eq. 2)


def predict_scale_step(rish_file: str, mask_file: str, method: str, model_dir: str | None,
                       options: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Scale maps lambda ``(X, Y, Z, n_orders)`` of the chosen method, and its provenance.

    The file written holds lambda inside the mask and, outside it, the nearest value inside
    (:func:`~bids_dmri_ldm.core.resample.fill_outside_mask`): lambda is set to 1 outside the mask
    on the output grid (:func:`scale_sh_step`), after the resampling.
    """
    from ..methods import load_method  # imported here: loading the ldm pulls torch

    translator = load_method(method, model_dir, options)
    img = nib.load(rish_file)
    rish = np.asanyarray(img.dataobj, dtype=np.float32)
    mask = np.asanyarray(nib.load(mask_file).dataobj) > 0
    prediction = translator.predict_scale_maps(rish, mask, img.affine)
    # Outside the mask lambda is 1 (set again on the output grid); here it takes the nearest value
    # inside, so that resampling to the output grid does not blend lambda with 1 at the mask's edge.
    scale = fill_outside_mask(prediction.scale, mask)
    out = {"scale_file": _save(scale, img.affine, Path(out_dir) / "scale.nii"),
           "provenance": prediction.provenance}
    if getattr(prediction, "std", None) is not None:  # ldm with num_samples > 1
        std = np.where(mask[..., None], prediction.std, 0).astype(np.float32)
        out["std_file"] = _save(std, img.affine, Path(out_dir) / "rish_std.nii")
    return out


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
        """Resample one ``(X, Y, Z)`` volume; returns float32 ``new_shape`` (C order)."""
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


def scale_sh_step(sh_file: str, scale_file: str, mask_file: str, sh_order_max: int,
                  out_dir: str | os.PathLike, orders: tuple[int, ...] = RISH_ORDERS,
                  skull_strip: bool = False) -> dict[str, str]:
    """Apply the scale maps to the SH coefficients (Eq. 3) on the output grid, in every voxel.

    lambda is taken inside the brain mask and is 1 outside it, where the source coefficients pass
    unchanged (the scale file holds, outside the mask, the nearest value inside —
    :func:`predict_scale_step` — so that the resampled lambda is not blended with 1 at the edge).
    Both RISH maps written are taken (Eq. 1) from coefficients on the output grid — the source
    ones from the resampled coefficients, the predicted ones from the scaled coefficients — so
    that ``RISH_predicted = lambda^2 RISH_source`` holds voxel by voxel (RISH of an interpolated
    field is not the interpolated RISH). The coefficients are streamed one channel at a time:
    memory holds the scale maps, the RISH sums and one coefficient volume.

    Returns
    -------
    dict
        ``sh_file`` (scaled coefficients, ``.nii``), and the derivative-ready ``.nii.gz`` images
        ``scale_file`` (lambda inside the mask, 1 outside), ``rish_source_file`` and
        ``rish_predicted_file`` (defined in every voxel; 0 outside the mask with ``skull_strip``).
    """
    img = nib.load(sh_file)
    affine, shape = img.affine, tuple(int(n) for n in img.shape[:3])
    mask = np.asanyarray(nib.load(mask_file).dataobj) > 0
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

    out_dir = Path(out_dir)
    sh_path = write_nifti_volumes(out_dir / "sh_scaled.nii", shape, affine, len(l_values), scaled_channels())
    if skull_strip:
        rish_source[~mask] = 0.0
        rish_predicted[~mask] = 0.0
    return {
        "sh_file": str(sh_path),
        "scale_file": _write_4d(lam, affine, out_dir / "scale_maps.nii.gz"),
        "rish_source_file": _write_4d(rish_source, affine, out_dir / "rish_source.nii.gz"),
        "rish_predicted_file": _write_4d(rish_predicted, affine, out_dir / "rish_predicted.nii.gz"),
    }


def _channel(img: nib.Nifti1Image, c: int) -> np.ndarray:
    """Channel ``c`` of a 3D/4D image as float32 ``(X, Y, Z)`` (a 3D image has one channel)."""
    data = img.dataobj if len(img.shape) == 3 else img.dataobj[..., c]
    return np.asarray(data, dtype=np.float32)


def _write_4d(values: np.ndarray, affine: np.ndarray, path: Path) -> str:
    """Stream a ``(X, Y, Z, C)`` array to a NIfTI file channel by channel (:func:`write_nifti_volumes`)."""
    shape = values.shape[:3]
    return str(write_nifti_volumes(path, shape, affine, values.shape[3],
                                   (values[..., c] for c in range(values.shape[3]))))


def rebuild_step(s0_file: str, b0_file: str, sh_file: str, mask_file: str, bval_file: str, bvec_file: str,
                 sh_order_max: int, out_dir: str | os.PathLike, integer_output: bool = False,
                 skull_strip: bool = False, report_samples: str | os.PathLike | None = None) -> dict[str, str]:
    """Rebuild the 7T-like DWI: ``S0 * max(sum C_hat Y(g), 0)`` on the source directions, the b0
    volumes put back first (clipped >= 0), in every voxel of the output grid (outside the brain
    mask lambda = 1, so the source signal is carried there); with ``skull_strip`` every volume
    is zero outside the mask.

    ``s0_file``, ``sh_file`` and ``mask_file`` are on the output grid; ``b0_file`` may be on the
    input grid, in which case each b0 volume is resampled (cubic B-spline) as it is written.
    Memory is bounded: the coefficients ``(n_voxels, K)`` of the rebuilt region (the whole grid,
    or the mask with ``skull_strip``) and a few output volumes are held, and the image is
    streamed to disk volume by volume (:func:`write_nifti_volumes`, gzip level 1) — never the
    whole ``(X, Y, Z, n_b0 + M)`` array.

    On-disk type: float32; with ``integer_output`` (the source was stored as integers) int16
    with a ``scl_slope`` (:func:`int16_slope`, bounded over the rebuilt region), half the size
    and write/read time, a quantisation step of about 1/20000 of the largest b0 value.

    Returns ``dwi_file`` (``.nii.gz``), ``bval_file``, ``bvec_file`` and ``mask_file`` (the
    derivative-ready ``.nii.gz`` mask). With ``report_samples`` (a path), what the participant
    report needs from the output is recorded as it is written (:class:`ReportSamples`).
    """
    _, _, bvecs_shell = _shell_parts(bval_file, bvec_file)
    sh_img = nib.load(sh_file)
    affine, shape = sh_img.affine, tuple(int(n) for n in sh_img.shape[:3])
    mask = np.asanyarray(nib.load(mask_file).dataobj) > 0
    region = mask if skull_strip else np.ones(shape, dtype=bool)
    voxels = np.flatnonzero(region.ravel(order="F"))  # NIfTI (Fortran) order of the written volumes
    coeffs = _masked_channels(sh_img, voxels)  # (K, n_region)
    s0 = _masked_channels(nib.load(s0_file), voxels)[0]
    basis = sh_basis(bvecs_shell, sh_order_max)[0].astype(np.float32)  # (M, K)
    b0_img = nib.load(b0_file)
    n_b0 = 1 if len(b0_img.shape) == 3 else int(b0_img.shape[3])
    out_dir = Path(out_dir)
    dtype, slope = (np.int16, int16_slope(b0_img, coeffs, s0, basis)) if integer_output else (np.float32, None)
    n_volumes = n_b0 + basis.shape[0]
    volumes = _rebuilt_volumes(b0_img, shape, affine, region, voxels, coeffs, s0, basis, slope)
    samples = ReportSamples(mask, affine, n_b0, n_volumes) if report_samples else None
    dwi_path = write_nifti_volumes(out_dir / "dwi_7tlike.nii.gz", shape, affine, n_volumes,
                                   volumes if samples is None else samples.observe(volumes), dtype=dtype, slope=slope)
    if samples is not None:
        samples.save(Path(report_samples), dwi_path)
    bvals, bvecs = load_gradients(bval_file, bvec_file)
    bval_out, bvec_out = write_bval_bvec(bvals, bvecs, out_dir / "dwi_7tlike.bval", out_dir / "dwi_7tlike.bvec")
    return {
        "dwi_file": str(dwi_path),
        "bval_file": str(bval_out),
        "bvec_file": str(bvec_out),
        "mask_file": _save(mask.astype(np.uint8), affine, out_dir / "brain_mask.nii.gz", np.uint8),
    }


#: File name of the rebuild's :class:`ReportSamples` (in its work folder).
REPORT_SAMPLES = "report_samples.npz"


class ReportSamples:
    """What the participant report needs from the 7T-like DWI, recorded while it is written.

    The report shows the output's FA on a few slices and its mean b0
    (:func:`~bids_dmri_ldm.core.display.stored_display_voxels`); reading them back means
    inflating the whole output again (1.3 GB at HCP size). Here the signal of every volume at
    those voxels and the mean of the b0 volumes are kept as the volumes stream past (values
    before the int16 quantisation), and saved with the size and gzip trailer (CRC-32 + length)
    of the file they belong to: the report uses them only for that exact file.
    """

    def __init__(self, mask: np.ndarray, affine: np.ndarray, n_b0: int, n_volumes: int):
        self.ijk = stored_display_voxels(mask, affine)
        self.index = tuple(self.ijk.T)
        self.n_b0 = n_b0
        self.signals = np.empty((len(self.ijk), n_volumes), dtype=np.float32)
        self.b0_sum = np.zeros(mask.shape, dtype=np.float64)

    def observe(self, volumes):
        """Pass ``volumes`` through, recording each."""
        for t, volume in enumerate(volumes):
            self.signals[:, t] = volume[self.index]
            if t < self.n_b0:
                self.b0_sum += volume
            yield volume

    def save(self, path: Path, dwi_path: Path) -> str:
        with open(dwi_path, "rb") as handle:
            handle.seek(-8, os.SEEK_END)
            tail = handle.read(8)
        mean_b0 = (self.b0_sum / max(self.n_b0, 1)).astype(np.float32)
        with open(path, "wb") as handle:
            np.savez(handle, ijk=self.ijk, signals=self.signals, mean_b0=mean_b0,
                     dwi_bytes=np.int64(os.path.getsize(dwi_path)), dwi_tail=np.frombuffer(tail, np.uint8))
        return str(path)


#: Output volumes rebuilt per matrix product (bounds the ``(n_mask, batch)`` temporary).
REBUILD_BATCH_BYTES = 256 * 2**20


#: Headroom for cubic B-spline overshoot of the resampled b0 volumes above the input's maximum.
B0_OVERSHOOT = 1.5


def int16_slope(b0_img: nib.Nifti1Image, coeffs: np.ndarray, s0: np.ndarray, basis: np.ndarray) -> float:
    """``scl_slope`` that maps the largest possible output value to 32767.

    Bounds, computed before any volume is written (the output is streamed): b0 volumes, the
    input's maximum times :data:`B0_OVERSHOOT`; diffusion-weighted volumes, by Cauchy-Schwarz,
    ``S0 * |C| * max_g |Y(g)|`` per voxel (``|.|`` the Euclidean norm over the K coefficients;
    ``coeffs`` is ``(K, n_voxels)``). Values above the bound cannot occur in the DW volumes; b0
    overshoot beyond it is clipped.
    """
    b0_max = float(np.max(np.asanyarray(b0_img.dataobj)))
    basis_norm = float(np.sqrt(np.square(basis, dtype=np.float64).sum(axis=1)).max()) if basis.size else 0.0
    dw_max = 0.0
    for start in range(0, s0.size, 1 << 20):  # in chunks: no (K, n_voxels) temporary
        rows = slice(start, start + (1 << 20))
        norms = np.sqrt(np.einsum("ij,ij->j", coeffs[:, rows], coeffs[:, rows]))
        dw_max = max(dw_max, float(np.max(s0[rows] * norms)) * basis_norm)
    top = max(B0_OVERSHOOT * b0_max, dw_max)
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


def _rebuilt_volumes(b0_img, shape, affine, region, voxels, coeffs, s0, basis, slope=None):
    """Yield the output volumes ``(X, Y, Z)`` in order: b0s (float32), then the rebuilt shell;
    zero outside ``region`` (the whole grid unless skull-stripped). ``coeffs`` is ``(K, n_region)``.

    The shell's volumes are computed in torch (multi-threaded), a batch of directions per matrix
    product ``Y_batch (b, K) @ C (K, n)``: each row of the result is one volume in NIfTI order,
    contiguous, yielded as a Fortran-ordered view (no copy, no transpose). With ``slope`` (int16
    output) they are quantised here, on the whole batch, ``rint(max(C Y, 0) * (S0 / slope))``
    clipped to int16 (the b0 volumes are quantised by the writer): four passes over the batch
    instead of seven. ``S0 / slope`` is taken once, so a value within a float32 rounding of a
    half-quantum may round to the neighbouring integer (1/32767 of the range).
    """
    b0_same_grid = tuple(b0_img.shape[:3]) == tuple(shape) and np.allclose(b0_img.affine, affine, atol=1e-5)
    resampler = None if b0_same_grid else SeparableResampler(b0_img.affine, b0_img.shape[:3], affine, shape, 3)
    n_b0 = 1 if len(b0_img.shape) == 3 else int(b0_img.shape[3])
    everywhere = voxels.size == region.size
    for t in range(n_b0):
        volume = np.array(b0_img.dataobj if len(b0_img.shape) == 3 else b0_img.dataobj[..., t],
                          dtype=np.float32)  # a copy: the file may be memory-mapped read-only
        volume = volume if resampler is None else resampler(volume)
        np.maximum(volume, 0.0, out=volume)
        if not everywhere:
            volume[~region] = 0.0
        yield volume
    n_vox = int(np.prod(shape))
    coeffs_t = torch.from_numpy(coeffs)
    s0_t = torch.from_numpy(s0) if slope is None else torch.from_numpy(s0) / np.float32(slope)
    basis_t = torch.from_numpy(np.ascontiguousarray(basis, dtype=np.float32))
    batch = max(1, min(basis.shape[0], REBUILD_BATCH_BYTES // max(1, 4 * voxels.size)))
    for start in range(0, basis.shape[0], batch):
        attenuation = basis_t[start:start + batch] @ coeffs_t  # (batch, n_region)
        attenuation.clamp_(min=0.0).mul_(s0_t)
        values = attenuation.numpy()
        if slope is not None:  # numpy's float32 -> int16 cast is ~2x faster than torch's
            values = attenuation.round_().clamp_(max=32767.0).numpy().astype(np.int16)
        for j in range(values.shape[0]):
            if everywhere:  # voxels = 0 .. n_vox - 1 in Fortran order: no scatter needed
                yield values[j].reshape(shape, order="F")
                continue
            flat = np.zeros(n_vox, dtype=values.dtype)
            flat[voxels] = values[j]
            yield flat.reshape(shape, order="F")


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
