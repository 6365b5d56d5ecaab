"""SH fit and RISH of each shell (step 4, Eq. 1) and the method's scale maps (step 5, Eq. 2)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from ...core.resample import fill_outside_mask, nearest_inside_index
from ...core.sh import RISH_ORDERS, SHModel
from ...core.signal import DEFAULT_S0_FLOOR, fit_shell_rish
from ...errors import InputDataError
from ...io.nifti import save_array
from .inputs import read_plan

if TYPE_CHECKING:  # pragma: no cover
    from ...methods import MethodOptions

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
        sh_files.append(save_array(coeffs, img.affine, out_dir / f"sh_{label}.nii"))
        rish_files.append(save_array(rish, img.affine, out_dir / f"rish_source_{label}.nii"))
        del coeffs, rish
    if s0 is None:  # no shell to fit (every volume carried): S0 is the floored mean b0
        b0 = _gather_volumes(img, b0_pos)
        s0 = np.maximum(b0.mean(axis=-1), np.float32(DEFAULT_S0_FLOOR))
    return {"s0_file": save_array(s0, img.affine, out_dir / "s0.nii"), "sh_files": sh_files, "rish_files": rish_files}


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
                       options: MethodOptions, plan_file: str, out_dir: str | os.PathLike) -> dict[str, Any]:
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
    from ...methods import (  # imported here: loading the ldm pulls torch
        load_method,
        method_for_shell,
    )

    plan, tolerance = read_plan(plan_file)
    translator = load_method(method, model_dir, options)
    mask = np.asanyarray(nib.load(mask_file).dataobj) > 0
    records = plan.shell_records()
    by_position = {r["MapShellIndex"]: r for r in records if r["MapShellIndex"] is not None}
    provenance: dict[str, Any] | None = None
    scale_files, std_files, stds = [], [], []
    out_dir = Path(out_dir)
    # The fill below needs each voxel's nearest voxel inside the mask (the mask's distance
    # transform, 0.2-0.3 s at HCP size). For a method whose maps vary in space it is computed once
    # for every shell, in a thread, while the method predicts (scipy releases the GIL, and the
    # ldm's numpy parts leave a core idle); the other methods' maps are one value inside the mask
    # and need none.
    with ThreadPoolExecutor(max_workers=1) as background:
        nearest = background.submit(nearest_inside_index, mask) if getattr(translator, "varying_maps", False) else None
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
            filled = fill_outside_mask(scale, mask, None if nearest is None else nearest.result)
            scale_files.append(save_array(filled, img.affine, out_dir / f"scale_{label}.nii"))
            stds.append((None if std is None else np.where(mask[..., None], std, 0).astype(np.float32), img.affine,
                         out_dir / f"rish_std_{label}.nii", rish.shape))
    if any(std is not None for std, *_ in stds):  # ldm with num_samples > 1: one SD map per shell
        std_files = [save_array(np.zeros(shape, np.float32) if std is None else std, affine, path)
                     for std, affine, path, shape in stds]
    if provenance is None:  # no shell translated (every shell passed through or carried)
        provenance = {"Method": str(method), "RISHOrders": list(RISH_ORDERS)}
    provenance["Shells"] = records
    return {"scale_files": scale_files, "std_files": std_files, "provenance": provenance}
