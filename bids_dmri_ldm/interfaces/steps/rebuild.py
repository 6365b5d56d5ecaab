"""The 7T-like DWI (step 8): rebuilt from the scaled SH, streamed to disk volume by volume.

The numerics are :mod:`bids_dmri_ldm.core.rebuild`; here the images are read, the carried input
volumes resampled (:class:`~bids_dmri_ldm.core.resample.SeparableResampler`) and the output
written (:func:`~bids_dmri_ldm.io.nifti.write_nifti_volumes`).
"""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from ...core.display import stored_display_voxels
from ...core.gradients import b0_mask
from ...core.rebuild import (
    int16_slope,
    lambda_in_mask,
    output_basis,
    output_volumes,
    scale_rows,
    sh_l_values,
)
from ...core.resample import SeparableResampler
from ...core.sh import RISH_ORDERS
from ...core.shells import MEAN_B0, VolumePlan
from ...io.nifti import read_channels_at, save_array, write_nifti_volumes
from .inputs import read_plan


def rebuild_step(s0_file: str, dwi_file: str, mean_b0_file: str, sh_files: list[str], mask_file: str,
                 plan_file: str, bval_file: str, bvec_file: str, sh_order_max: int, out_dir: str | os.PathLike,
                 integer_output: bool = False, skull_strip: bool = False,
                 report_samples: str | os.PathLike | None = None,
                 scale_files: list[str] | None = None) -> dict[str, str]:
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
    grid; with ``scale_files`` (the shells' scale maps on the output grid, as resampled) Eq. 3 is
    applied here, ``C_hat = lambda_l C`` with ``lambda = max(scale, 0)`` inside the mask and 1
    outside (:func:`scale_by_maps`, the values :func:`~bids_dmri_ldm.interfaces.steps.scale_sh_step`
    takes its predicted RISH from), so that the two steps run side by side; without them the
    coefficients are used as given. ``dwi_file`` (the volumes read, :func:`load_dwi_step`) and
    ``mean_b0_file`` may be on the input grid, in which case each carried volume is resampled
    (cubic B-spline) as it is written. Memory is bounded: the coefficients ``(n_voxels, K)`` of every fitted shell over the
    rebuilt region (the whole grid, or the mask with ``skull_strip``) and a few output volumes
    are held, and the image is streamed to disk volume by volume (:func:`~bids_dmri_ldm.io.nifti.write_nifti_volumes`,
    ISA-L gzip level 1) — never the whole ``(X, Y, Z, N)`` array.

    On-disk type: float32; with ``integer_output`` (the source was stored as integers) int16
    with a ``scl_slope`` (:func:`~bids_dmri_ldm.core.rebuild.int16_slope`, bounded over the rebuilt region), half the size
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
    coeffs = [read_channels_at(nib.load(f), voxels) for f in sh_files]  # (K, n_region) per shell
    if scale_files:
        inside = mask.ravel(order="F")[voxels]
        coeffs = [scale_by_maps(c, nib.load(f), voxels, inside, sh_order_max) for c, f in zip(coeffs, scale_files)]
    s0 = read_channels_at(nib.load(s0_file), voxels)[0]
    basis = output_basis(plan.out_bvecs, plan.out_shell, sh_order_max)
    carried = _CarriedVolumes(plan, nib.load(dwi_file), nib.load(mean_b0_file), shape, affine)
    dtype, slope = (np.int16, int16_slope(carried.max_value(), coeffs, s0, basis, plan.out_shell)) \
        if integer_output else (np.float32, None)
    volumes = output_volumes(plan.out_shell, plan.out_source, carried, coeffs, s0, basis, shape, region, voxels,
                             slope)
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
        "mask_file": save_array(mask.astype(np.uint8), affine, out_dir / "brain_mask.nii.gz", np.uint8),
    }


def scale_by_maps(coeffs: np.ndarray, scale_img: nib.Nifti1Image, voxels: np.ndarray, inside: np.ndarray,
                  sh_order_max: int, orders: tuple[int, ...] = RISH_ORDERS) -> np.ndarray:
    """Eq. 3 on ``coeffs (K, n)`` (the coefficients at Fortran-order flat ``voxels``), with the
    ``len(orders)`` maps of ``scale_img`` there (:func:`~bids_dmri_ldm.core.rebuild.lambda_in_mask`,
    ``inside``: the brain mask at those voxels): a new ``(K, n)`` float32 array."""
    lam = lambda_in_mask(read_channels_at(scale_img, voxels), inside)  # (n_orders, n)
    return scale_rows(coeffs, lam, sh_l_values(sh_order_max), orders)


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
        # the voxels as indices into a volume's flat buffer, in either memory order: one gather
        # instead of numpy's three-array indexing (0.2 ms against 1.7 ms per HCP-size volume)
        self._flat = {order: np.ravel_multi_index(self.index, mask.shape, order=order) for order in "CF"}
        self.b0_index = {int(t) for t in np.atleast_1d(b0_index)}
        self.slope = slope
        # one row per volume, written contiguously; ``signals`` is its (voxels, volumes) view
        self._rows = np.empty((n_volumes, len(self.ijk)), dtype=np.float32)
        self.b0_sum = np.zeros(mask.shape, dtype=np.float64, order="F")  # the volumes' order: 10x faster sums

    @property
    def signals(self) -> np.ndarray:
        """Recorded image values ``(n_voxels, n_volumes)`` float32 (a Fortran-ordered view)."""
        return self._rows.T

    def _at_voxels(self, volume: np.ndarray) -> np.ndarray:
        if volume.flags.f_contiguous:
            return volume.ravel(order="F").take(self._flat["F"])
        if volume.flags.c_contiguous:
            return volume.ravel(order="C").take(self._flat["C"])
        return volume[self.index]

    def observe(self, volumes):
        """Pass ``volumes`` through, recording each."""
        for t, volume in enumerate(volumes):
            values = self._at_voxels(volume)
            if self.slope is not None and np.issubdtype(volume.dtype, np.integer):
                values = values.astype(np.float32) * np.float32(self.slope)
            self._rows[t] = values
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
