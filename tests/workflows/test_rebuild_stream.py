"""The fast output path: separable resampling, streamed NIfTI writing, int16 + scl_slope output."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from bids_dmri_ldm.core.resample import SeparableResampler, output_grid, resample
from bids_dmri_ldm.core.sh import sh_basis
from bids_dmri_ldm.interfaces import steps
from bids_dmri_ldm.io.nifti import make_nifti, write_nifti_volumes


def _oblique_affine(zoom=(2.5, 2.0, 3.0)):
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [12, -7, 25], degrees=True).as_matrix() @ np.diag(zoom)
    affine[:3, :3] = affine[:3, :3] @ np.diag([-1, 1, 1])  # a flipped axis (LPS-like storage)
    affine[:3, 3] = [31.0, -17.0, 8.0]
    return affine


@pytest.mark.parametrize("order", [3, 1])
def test_separable_resampler_matches_scipy(order):
    """Same values as scipy's 3D affine_transform (core.resample) on an oblique, flipped grid."""
    rng = np.random.default_rng(3)
    volume = rng.normal(size=(9, 7, 6)).astype(np.float32)
    affine = _oblique_affine()
    new_affine, new_shape = output_grid(affine, volume.shape, 1.05)
    resampler = SeparableResampler(affine, volume.shape, new_affine, new_shape, order)
    assert resampler.separable and not resampler.identity
    expected = resample(volume, affine, new_affine, new_shape, order=order)
    np.testing.assert_allclose(resampler(volume), expected, atol=2e-5)
    same = SeparableResampler(affine, volume.shape, affine, volume.shape, 3)
    np.testing.assert_array_equal(same(volume), volume)


def test_write_nifti_volumes_roundtrip_float_and_int16(tmp_path):
    rng = np.random.default_rng(4)
    data = rng.uniform(0, 900, size=(5, 4, 3, 6)).astype(np.float32)
    affine = _oblique_affine()
    path = write_nifti_volumes(tmp_path / "f.nii.gz", data.shape[:3], affine, 6,
                               (data[..., t] for t in range(6)))
    img = nib.load(path)
    reference = make_nifti(data, affine).header
    assert img.get_data_dtype() == np.float32 and img.shape == data.shape
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), data)
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    assert img.header.get_xyzt_units() == reference.get_xyzt_units() == ("mm", "sec")
    assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1

    slope = 1000.0 / 32767
    path = write_nifti_volumes(tmp_path / "i.nii", data.shape[:3], affine, 6,
                               (data[..., t] for t in range(6)), dtype=np.int16, slope=slope)
    img = nib.load(path)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.get_fdata(), data, atol=slope / 2 + 1e-6)
    assert not list(tmp_path.glob(".*tmp*"))  # temporary files replaced

    with pytest.raises(ValueError, match="5 volumes written, 6 announced"):
        write_nifti_volumes(tmp_path / "bad.nii.gz", data.shape[:3], affine, 6,
                            (data[..., t] for t in range(5)))
    assert not (tmp_path / "bad.nii.gz").exists() and not list(tmp_path.glob(".bad*"))


def _rebuilt(s0, b0, coeffs, basis, mask, skull_strip=False):
    """The rebuild's formula in memory: the b0s, then ``S0 * max(C Y(g), 0)`` on each direction."""
    dwi = s0[..., None] * np.maximum(coeffs @ basis.T, 0.0)
    dwi = np.concatenate([b0, dwi], axis=-1).astype(np.float32)
    if skull_strip:
        dwi[~mask] = 0.0
    return dwi


def _plan_file(path, bvals, bvecs, **kwargs):
    from bids_dmri_ldm.core.shells import plan_volumes

    doc = plan_volumes(bvals, bvecs, **kwargs).to_dict()
    doc["tolerance"] = 100.0
    path.write_text(json.dumps(doc))
    return str(path)


def test_streamed_rebuild_resamples_b0_and_matches_in_memory(tmp_path):
    """rebuild_step on the output grid with b0s on the input grid == the in-memory rebuild with
    the b0s resampled first, in every voxel (zero outside the mask only when skull-stripped); the
    int16 output agrees within half its slope."""
    rng = np.random.default_rng(5)
    affine = _oblique_affine((3.0, 3.0, 3.0))
    in_shape = (6, 5, 4)
    new_affine, shape = output_grid(affine, in_shape, 1.5)
    dirs = rng.normal(size=(20, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    basis = sh_basis(dirs, 4)[0]
    coeffs = rng.normal(0, 0.05, shape + (15,)).astype(np.float32)
    coeffs[..., 0] = 0.4 * np.sqrt(4 * np.pi)
    s0 = rng.uniform(400, 1200, shape).astype(np.float32)
    mask = np.zeros(shape, dtype=bool)
    mask[2:-2, 1:-1, 1:-2] = True
    b0_in = rng.uniform(300, 1300, in_shape + (2,)).astype(np.float32)
    read = np.concatenate([b0_in, rng.uniform(0, 900, in_shape + (20,))], axis=-1).astype(np.float32)
    files = {}
    for name, array, aff in (("s0", s0, new_affine), ("sh", coeffs, new_affine), ("read", read, affine),
                             ("mean_b0", b0_in.mean(-1), affine), ("mask", mask.astype(np.uint8), new_affine)):
        files[name] = str(tmp_path / f"{name}.nii")
        nib.save(make_nifti(array, aff, np.uint8 if name == "mask" else np.float32), files[name])
    bvals = np.r_[0, 0, np.full(20, 1000.0)]
    bvecs = np.vstack([np.zeros((2, 3)), dirs])
    bval, bvec = tmp_path / "t.bval", tmp_path / "t.bvec"
    bval.write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    bvec.write_text("\n".join(" ".join(f"{v:.10f}" for v in row) for row in bvecs.T) + "\n")
    plan = _plan_file(tmp_path / "plan.json", bvals, bvecs)

    def rebuild(out, **kwargs):
        return steps.rebuild_step(files["s0"], files["read"], files["mean_b0"], [files["sh"]], files["mask"], plan,
                                  str(bval), str(bvec), 4, tmp_path / out, **kwargs)

    b0_out = np.stack([resample(b0_in[..., t], affine, new_affine, shape) for t in range(2)], axis=-1)
    expected = _rebuilt(s0, np.maximum(b0_out, 0), coeffs, basis.astype(np.float32), mask)
    out = rebuild("f")
    img = nib.load(out["dwi_file"])
    assert img.shape == shape + (22,) and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, new_affine, atol=1e-6)
    np.testing.assert_allclose(img.get_fdata(dtype=np.float32), expected, rtol=1e-4, atol=1e-2)

    out16 = rebuild("i", integer_output=True)
    img16 = nib.load(out16["dwi_file"])
    slope = float(img16.dataobj.slope)  # nibabel moves scl_slope to the array proxy on load
    assert img16.get_data_dtype() == np.int16 and 0 < slope < 1300 * 1.5 / 32767 * 4
    np.testing.assert_allclose(img16.get_fdata(dtype=np.float32), expected, atol=slope / 2 + 1e-2)
    assert np.count_nonzero(img16.get_fdata() == 0) == 0  # every voxel rebuilt, none lost to the mask

    stripped = rebuild("s", integer_output=True, skull_strip=True)
    expected = _rebuilt(s0, np.maximum(b0_out, 0), coeffs, basis.astype(np.float32), mask, skull_strip=True)
    img_s = nib.load(stripped["dwi_file"])
    assert np.all(img_s.get_fdata()[~mask] == 0)
    np.testing.assert_allclose(img_s.get_fdata(dtype=np.float32), expected, atol=float(img_s.dataobj.slope) / 2 + 1e-2)


def test_streamed_gzip_header_is_reproducible(tmp_path):
    """No file name and mtime 0 in the gzip header (BIDS validator GZIP_HEADER_* warnings)."""
    data = np.ones((2, 2, 2, 2), np.float32)
    path = write_nifti_volumes(tmp_path / "a.nii.gz", (2, 2, 2), np.eye(4), 2, (data[..., t] for t in range(2)))
    header = path.read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b" and header[3] & 0x08 == 0  # FNAME flag unset
    assert header[4:8] == b"\x00\x00\x00\x00"  # MTIME
    np.testing.assert_array_equal(nib.load(path).get_fdata(), data)
