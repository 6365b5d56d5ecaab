"""Scaling the SH coefficients (Eq. 3) and rebuilding the DWI from them, streamed (numpy + torch).

The numerics of the participant level's last two steps, on arrays: no file is read or written
here (:mod:`bids_dmri_ldm.interfaces.steps.rebuild` reads the images and streams the volumes
yielded here to disk with :func:`~bids_dmri_ldm.io.nifti.write_nifti_volumes`).

Each output volume (:class:`~bids_dmri_ldm.core.shells.VolumePlan`) is either rebuilt from its
shell's scaled SH, ``S0 * max(sum_lm C_hat_lm Y_lm(g), 0)`` on its direction ``g``, or an input
volume carried through (a b0, a volume of a shell not SH-fitted, or the mean b0), given by the
caller already on the output grid. Coefficients are ``(K, n_region)`` float32 per shell: the
region's voxels in NIfTI (Fortran) order, one contiguous row per coefficient.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .resample import read_only_tensor
from .sh import n_coefficients, order_slots, scale_coefficient, sh_basis

if TYPE_CHECKING:  # torch is imported where it is used: the main process loads this module, never torch
    import torch


#: Output volumes rebuilt per matrix product (bounds the ``(batch, n_region)`` temporary).
REBUILD_BATCH_BYTES = 256 * 2**20

#: Voxels rebuilt per pass of :func:`output_volumes` (a ``(b, m)`` float32 block of ~1 MB for a
#: batch of ten volumes: it stays in the CPU cache through the product, clip, S0 and rounding).
REBUILD_CHUNK_VOXELS = 1 << 15

#: Headroom for cubic B-spline overshoot of the resampled b0 volumes above the input's maximum.
B0_OVERSHOOT = 1.5


def sh_l_values(sh_order_max: int) -> np.ndarray:
    """The order ``l`` of each SH coefficient ``(K,)`` (dipy's ordering)."""
    return sh_basis(np.array([[0.0, 0.0, 1.0]]), sh_order_max)[2]


def lambda_in_mask(scale: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The lambda of Eq. 3 from a scale map: ``max(scale, 0)`` where ``inside`` (the brain mask,
    broadcast against ``scale``) and 1 elsewhere, float32. The scale files hold, outside the
    mask, the nearest value inside (so that resampling does not blend lambda with 1 at the edge):
    that value is never applied."""
    return np.where(inside, np.maximum(scale, 0.0), 1.0).astype(np.float32, copy=False)


def scale_rows(coeffs: np.ndarray, lam: np.ndarray, l_values: np.ndarray, orders: Sequence[int]) -> np.ndarray:
    """Eq. 3 on coefficients stored as rows: ``coeffs (K, n)`` (:func:`sh_l_values` order),
    ``lam (len(orders), n)``; a new ``(K, n)`` float32 array ``lambda_l C_lm`` (the same float32
    products as :func:`scale_channels`)."""
    scaled = np.array(coeffs, dtype=np.float32)  # a copy: ``coeffs`` may be a read-only memory map
    for c, slot in enumerate(order_slots(l_values, orders)):
        if slot is not None:
            scaled[c] = scale_coefficient(scaled[c], lam.T, slot)  # lam.T: (n, n_orders), orders last
    return scaled


def scale_channels(channels: Iterable[np.ndarray], l_values: np.ndarray, lam: np.ndarray,
                   orders: Sequence[int], rish_source: np.ndarray, rish_predicted: np.ndarray
                   ) -> Iterator[np.ndarray]:
    """Eq. 3 one coefficient volume at a time: yield ``C_hat_lm = lambda_l C_lm``.

    ``channels`` yields the ``K`` coefficient volumes ``(X, Y, Z)`` in :func:`sh_l_values` order;
    ``lam`` is ``(X, Y, Z, len(orders))``; an order without a scale map keeps lambda = 1. The RISH
    features (Eq. 1) of the source and of the scaled coefficients are accumulated, as they pass,
    into ``rish_source`` and ``rish_predicted`` (``(X, Y, Z, len(orders))``, zero on entry), so
    that ``RISH_predicted = lambda^2 RISH_source`` holds voxel by voxel.
    """
    for coeff, k in zip(channels, order_slots(l_values, orders)):
        scaled = scale_coefficient(coeff, lam, k)  # Eq. 3
        if k is not None:
            rish_source[..., k] += np.square(coeff)  # Eq. 1
            rish_predicted[..., k] += np.square(scaled)
        yield scaled


def output_basis(out_bvecs: np.ndarray, out_shell: np.ndarray, sh_order_max: int) -> np.ndarray:
    """SH basis ``(N_out, K)`` float32 on the output directions; zero rows for carried volumes
    (``out_shell < 0``)."""
    dw = np.asarray(out_shell) >= 0
    basis = np.zeros((np.size(out_shell), n_coefficients(sh_order_max)), dtype=np.float32)
    if dw.any():
        basis[dw] = sh_basis(np.asarray(out_bvecs)[dw], sh_order_max)[0]
    return basis


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


def output_volumes(out_shell: np.ndarray, out_source: np.ndarray, carried: Callable[[int], np.ndarray],
                   coeffs: list[np.ndarray], s0: np.ndarray, basis: np.ndarray, shape, region, voxels,
                   slope: float | None = None) -> Iterator[np.ndarray]:
    """Yield the output volumes ``(X, Y, Z)`` in the output table's order; zero outside ``region``
    (the whole grid unless skull-stripped). ``coeffs[k]`` is shell ``k``'s ``(K, n_region)``,
    ``s0`` ``(n_region,)``, ``voxels`` the region's Fortran-order flat indices; ``carried(source)``
    returns input volume ``source`` on the output grid (float32, a fresh array), for the rows
    with ``out_shell < 0``.

    Carried volumes are float32 (quantised by the writer). Consecutive volumes of one shell are
    rebuilt together into one output block ``(b, n)`` (at most :data:`REBUILD_BATCH_BYTES`):
    each row is one volume in NIfTI order, contiguous, yielded as a Fortran-ordered view (no
    copy, no transpose). The block is filled :data:`REBUILD_CHUNK_VOXELS` voxels at a time, in
    torch: ``Y_batch (b, K) @ C (K, m)``, clipped at 0, times S0 and, with ``slope`` (int16
    output), ``rint(. * (S0 / slope))`` clipped to int16 — every pass on a block that stays in
    the CPU cache, instead of six passes over the whole ``(b, n)`` float32 batch in memory (the
    rebuild's largest cost, measured). ``S0 / slope`` is taken once, so a value within a float32
    rounding of a half-quantum may round to the neighbouring integer (1/32767 of the range).

    A yielded volume is valid until the next one is requested: the block (and, for a region
    smaller than the grid, the volume it is scattered into) is one buffer reused for every batch,
    not fresh memory whose every page is faulted in and zeroed again (~0.2 s per 256 MB batch).
    Consumers that keep volumes copy them (the NIfTI writer does).
    """
    import torch
    n_out = np.size(out_shell)
    n_vox = int(np.prod(shape))
    everywhere = voxels.size == region.size
    dtype = np.dtype(np.float32 if slope is None else np.int16)
    batch = max(1, REBUILD_BATCH_BYTES // max(1, dtype.itemsize * voxels.size))
    coeffs_t = [read_only_tensor(c) for c in coeffs]  # may be read-only memory maps: only read
    s0_t = torch.from_numpy(s0) if slope is None else torch.from_numpy(s0) / np.float32(slope)
    basis_t = torch.from_numpy(np.ascontiguousarray(basis, dtype=np.float32))
    block = scattered = None  # the reused buffers, allocated when first needed
    j = 0
    while j < n_out:
        k = int(out_shell[j])
        if k < 0:
            volume = carried(int(out_source[j]))
            if not everywhere:
                volume[~region] = 0.0
            yield volume
            j += 1
            continue
        stop = j + 1
        while stop < n_out and stop - j < batch and int(out_shell[stop]) == k:
            stop += 1
        if block is None:
            block = np.empty((min(batch, n_out), voxels.size), dtype=dtype)
        values = block[:stop - j]
        _fill_rebuilt(torch.from_numpy(values), basis_t[j:stop], coeffs_t[k], s0_t, slope is not None)
        for c in range(values.shape[0]):
            if everywhere:  # voxels = 0 .. n_vox - 1 in Fortran order: no scatter needed
                yield values[c].reshape(shape, order="F")
                continue
            if scattered is None:
                scattered = np.zeros(n_vox, dtype=dtype)  # outside the region: 0, never written
            scattered[voxels] = values[c]
            yield scattered.reshape(shape, order="F")
        j = stop


def _fill_rebuilt(out: torch.Tensor, basis: torch.Tensor, coeffs: torch.Tensor, s0: torch.Tensor,
                  quantise: bool) -> None:
    """``out (b, n) = max(basis (b, K) @ coeffs (K, n), 0) * s0 (n,)``, rounded and clipped to
    int16 when ``quantise`` (``s0`` is then ``S0 / slope``), :data:`REBUILD_CHUNK_VOXELS` columns
    at a time."""
    import torch
    n = coeffs.shape[1]
    values = out.numpy()
    for start in range(0, n, REBUILD_CHUNK_VOXELS):
        chunk = slice(start, min(start + REBUILD_CHUNK_VOXELS, n))
        block = torch.matmul(basis, coeffs[:, chunk])
        block.clamp_(min=0.0).mul_(s0[chunk])
        if quantise:
            block.round_().clamp_(max=32767.0)
        # numpy's float32 -> int16 cast: ~2x faster than torch's; the values are integers in range
        values[:, chunk] = block.numpy()
