"""The output grid (step 6) and Eq. 3 on it (step 7): resampling, scaled SH, stacked maps."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ...core.rebuild import lambda_in_mask, scale_channels, sh_l_values
from ...core.resample import SeparableResampler, output_grid, resample_to_grid
from ...core.sh import RISH_ORDERS
from ...io.files import atomic_write_json, file_stamp
from ...io.nifti import read_channel, save_array, write_channels, write_nifti_volumes

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
        return save_array(mask.astype(np.uint8), new_affine, out_path, np.uint8)
    resampler = SeparableResampler(img.affine, img.shape[:3], new_affine, new_shape, 3)
    n_channels = 1 if len(img.shape) == 3 else int(img.shape[3])

    def channels():  # one channel in memory at a time, written as soon as it is resampled
        for c in range(n_channels):
            out = resampler(read_channel(img, c))
            if clip_min is not None:
                np.maximum(out, np.float32(clip_min), out=out)
            yield out

    if len(img.shape) == 3:
        return save_array(next(channels()), new_affine, out_path)
    return str(write_nifti_volumes(out_path, new_shape, new_affine, n_channels, channels()))


# ---------------------------------------------------------------------------------------------
# scale SH (Eq. 3) and rebuild


def scale_sh_step(sh_files: list[str], scale_files: list[str], mask_file: str, sh_order_max: int,
                  out_dir: str | os.PathLike, orders: tuple[int, ...] = RISH_ORDERS,
                  skull_strip: bool = False, std_files: list[str] | None = None,
                  map_record: str | os.PathLike | None = None) -> dict[str, Any]:
    """The derivative maps of Eq. 3 on the output grid, in every voxel, one shell at a time: each
    fitted shell's scale maps applied to its SH coefficients, the RISH maps of the source and of
    the scaled coefficients, stacked into the derivatives. The scaled coefficients themselves are
    not written: the rebuild applies the same Eq. 3 to its own
    (:func:`~bids_dmri_ldm.interfaces.steps.rebuild_step` with ``scale_files``), so the two steps
    run side by side.

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
        The derivative-ready ``.nii.gz`` images ``scale_file`` (lambda inside the mask, 1 outside),
        ``rish_source_file`` and ``rish_predicted_file`` (defined in every voxel; 0 outside the
        mask with ``skull_strip``) and, given ``std_files``, ``std_file``: ``len(orders)``
        volumes per shell, the shells in the order given (ascending b); ``shell_map_files``: the
        uncompressed per-shell maps they were stacked from, kept for the report and recorded in
        ``map_record`` when given (:func:`write_map_copies_record`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_img = nib.load(mask_file)
    mask = np.asanyarray(mask_img.dataobj) > 0
    affine, shape = mask_img.affine, tuple(int(n) for n in mask_img.shape[:3])
    per_shell = {"scale": [], "rish_source": [], "rish_predicted": []}
    for k, (sh_file, scale_file) in enumerate(zip(sh_files, scale_files)):
        parts = _scale_one_shell(sh_file, scale_file, mask, sh_order_max, orders, skull_strip,
                                 out_dir / f"shell{k}")
        for key, path in parts.items():
            per_shell[key].append(path)
    out = {}
    names = {"scale": "scale_maps.nii.gz", "rish_source": "rish_source.nii.gz",
             "rish_predicted": "rish_predicted.nii.gz"}
    for key, name in names.items():
        out[f"{key}_file"] = stack_channels(per_shell[key], shape, affine, out_dir / name, len(orders),
                                            fill=1.0 if key == "scale" else 0.0)
    if std_files:
        out["std_file"] = stack_channels(std_files, shape, affine, out_dir / "rish_std.nii.gz", len(orders))
    out["shell_map_files"] = [path for key in names for path in per_shell[key]]
    if map_record:
        write_map_copies_record(map_record, {out[f"{key}_file"]: per_shell[key] for key in names if per_shell[key]})
    return out


#: File name of the record of :func:`scale_sh_step`'s uncompressed per-shell maps (beside its
#: work folder), read by the participant report (:func:`write_map_copies_record`).
MAP_COPIES = "map_copies.json"


def write_map_copies_record(path: str | os.PathLike, copies: dict[str, list[str]]) -> str:
    """Record, for each stacked ``.nii.gz`` map, the uncompressed per-shell ``.nii`` files whose
    channels it holds in order, with the sizes and modification times of all of them: the
    participant report reads a derivative map that *is* the stacked file (a hard link:
    :func:`~bids_dmri_ldm.io.files.atomic_link_or_copy`) from the per-shell files, memory-mapped,
    instead of inflating it (~0.5 s per map at HCP size), and only while none of them changed."""
    def identity(file: str) -> dict[str, Any]:
        return dict(zip(("path", "size", "mtime_ns"), file_stamp(file)))

    record = {"maps": [{"file": identity(stacked), "copies": [identity(f) for f in parts]}
                       for stacked, parts in copies.items()]}
    atomic_write_json(Path(path), record)
    return str(path)


def _scale_one_shell(sh_file: str, scale_file: str, mask: np.ndarray, sh_order_max: int,
                     orders: tuple[int, ...], skull_strip: bool, out_dir: Path) -> dict[str, str]:
    """Eq. 3 on one shell (see :func:`scale_sh_step`); its maps as ``.nii`` in ``out_dir``."""
    img = nib.load(sh_file)
    affine, shape = img.affine, tuple(int(n) for n in img.shape[:3])
    l_values = sh_l_values(sh_order_max)
    scale_img = nib.load(scale_file)
    # Fortran order, as the NIfTI channels are read and written: every product below is an
    # elementwise pass over contiguous memory and is written without a transposing copy.
    lam = np.empty(shape + (len(orders),), dtype=np.float32, order="F")
    for c in range(len(orders)):
        lam[..., c] = lambda_in_mask(read_channel(scale_img, c), mask)
    rish_source = np.zeros(shape + (len(orders),), dtype=np.float32, order="F")
    rish_predicted = np.zeros(shape + (len(orders),), dtype=np.float32, order="F")
    coefficients = (read_channel(img, c) for c in range(len(l_values)))
    for _ in scale_channels(coefficients, l_values, lam, orders, rish_source, rish_predicted):
        pass  # the RISH maps accumulate as the scaled coefficients pass; the rebuild scales its own
    if skull_strip:
        rish_source[~mask] = 0.0
        rish_predicted[~mask] = 0.0
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "scale": write_channels(lam, affine, out_dir / "scale.nii"),
        "rish_source": write_channels(rish_source, affine, out_dir / "rish_source.nii"),
        "rish_predicted": write_channels(rish_predicted, affine, out_dir / "rish_predicted.nii"),
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
                yield read_channel(img, c)

    return str(write_nifti_volumes(path, shape, affine, n_channels * max(1, len(files)), channels()))
