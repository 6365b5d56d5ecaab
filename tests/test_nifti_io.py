"""The NIfTI I/O module: ISA-L gzip writes that nibabel reads byte for byte, streamed reads that
match nibabel's values, atomic writes, corrupt files refused."""
import gzip

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.io import nifti as nio

AFFINE = np.diag([-1.5, 1.5, 2.0, 1.0])


def _image(data, dtype=None):
    img = nib.Nifti1Image(data if dtype is None else data.astype(dtype), AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    return img


def test_save_nifti_writes_nibabels_bytes_in_a_reproducible_gzip(tmp_path):
    data = np.random.default_rng(0).normal(size=(7, 6, 5, 3)).astype(np.float32)
    ours = nio.save_nifti(_image(data), tmp_path / "ours.nii.gz")
    nib.save(_image(data), tmp_path / "nib.nii.gz")
    assert gzip.decompress(ours.read_bytes()) == gzip.decompress((tmp_path / "nib.nii.gz").read_bytes())
    header = ours.read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08" and header[3] & 0x08 == 0  # deflate, no FNAME
    assert header[4:8] == b"\x00\x00\x00\x00"  # mtime 0: the same bytes on every run
    assert ours.read_bytes() == nio.save_nifti(_image(data), tmp_path / "again.nii.gz").read_bytes()
    np.testing.assert_array_equal(nib.load(ours).get_fdata(dtype=np.float32), data)
    plain = nio.save_nifti(_image(data), tmp_path / "plain.nii")
    assert plain.read_bytes() == gzip.decompress(ours.read_bytes())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.nii.gz", "nib.nii.gz", "ours.nii.gz", "plain.nii"]


def test_integer_images_keep_nibabels_scaling(tmp_path):
    data = np.linspace(-3, 7, 4 * 5 * 6).reshape(4, 5, 6)
    img = _image(data)
    img.set_data_dtype(np.int16)  # nibabel picks scl_slope/inter when writing
    nio.save_nifti(img, tmp_path / "a.nii.gz")
    nib.save(img, tmp_path / "b.nii.gz")
    assert gzip.decompress((tmp_path / "a.nii.gz").read_bytes()) == gzip.decompress((tmp_path / "b.nii.gz").read_bytes())


def test_streamed_volumes_quantise_like_numpy(tmp_path):
    rng = np.random.default_rng(1)
    data = (rng.normal(size=(9, 8, 7, 4)) * 1000).astype(np.float32)
    data[0, 0, 0, 0] = 1e9  # clipped to the int16 range
    data[1, 0, 0, 0] = 2.5 * 0.25  # a tie: round half to even, as np.rint
    path = nio.write_nifti_volumes(tmp_path / "q.nii.gz", data.shape[:3], AFFINE, 4,
                                   (data[..., t] for t in range(4)), dtype=np.int16, slope=0.25)
    stored = np.asanyarray(nib.load(path).dataobj.get_unscaled())
    expected = np.clip(np.rint(data / np.float32(0.25)), -32768, 32767).astype(np.int16)
    np.testing.assert_array_equal(stored, expected)
    assert stored[1, 0, 0, 0] == 2 and stored[0, 0, 0, 0] == 32767
    # C-ordered volumes (as the resampler returns them) are written in NIfTI order too
    c_order = [np.ascontiguousarray(data[..., t]) for t in range(4)]
    path = nio.write_nifti_volumes(tmp_path / "c.nii", data.shape[:3], AFFINE, 4, iter(c_order))
    np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), data)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_read_volumes_matches_nibabel(tmp_path, suffix):
    rng = np.random.default_rng(2)
    data = rng.integers(-500, 3000, size=(6, 7, 5, 5)).astype(np.int16)
    img = _image(data)
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / f"s{suffix}"
    nib.save(img, path)
    expected = np.asanyarray(nib.load(path).dataobj)  # nibabel applies slope/intercept
    got, layout = nio.read_nifti_volumes(path, [4, 0, 2])
    assert got.dtype == np.float32 and layout.scaled
    np.testing.assert_allclose(got, expected[..., [4, 0, 2]], rtol=1e-6)
    np.testing.assert_array_equal(layout.affine, nib.load(path).affine)
    with pytest.raises(ValueError, match="cannot be held"):
        nio.read_nifti_volumes(path, [0], dtype=np.int16)
    loaded = nio.load_nifti(path)
    np.testing.assert_allclose(np.asanyarray(loaded.dataobj), expected, rtol=1e-6)
    # big-endian files and 3D images
    big = nib.Nifti1Image(data[..., 0].astype(">f4"), AFFINE)
    nib.save(big, tmp_path / f"big{suffix}")
    vol, layout = nio.read_nifti_volumes(tmp_path / f"big{suffix}")
    assert layout.n_volumes == 1 and vol.shape == data.shape[:3] + (1,)
    np.testing.assert_array_equal(vol[..., 0], data[..., 0])
    unscaled = nio.load_nifti(tmp_path / f"big{suffix}")
    np.testing.assert_array_equal(np.asanyarray(unscaled.dataobj), data[..., 0])


def test_truncated_or_corrupt_gzip_is_refused_even_past_the_wanted_volumes(tmp_path):
    data = np.random.default_rng(3).normal(size=(20, 20, 20, 4)).astype(np.float32)
    path = nio.save_nifti(_image(data), tmp_path / "c.nii.gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])  # the last volume and the gzip trailer are cut
    with pytest.raises(nio.READ_ERRORS):
        nio.read_nifti_volumes(path, [0])  # volume 0 is intact, the file is not
    corrupt = bytearray(raw)
    corrupt[-8] ^= 0xFF  # CRC of the gzip trailer
    path.write_bytes(bytes(corrupt))
    with pytest.raises(nio.READ_ERRORS):
        nio.read_nifti_volumes(path, [0])


def test_failed_write_leaves_the_old_file(tmp_path):
    target = nio.save_nifti(_image(np.ones((2, 2, 2), np.float32)), tmp_path / "x.nii.gz")
    before = target.read_bytes()

    def volumes():
        yield np.zeros((2, 2, 2), np.float32)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        nio.write_nifti_volumes(target, (2, 2, 2), AFFINE, 2, volumes())
    with pytest.raises(ValueError, match="1 volumes written, 2 announced"):
        nio.write_nifti_volumes(target, (2, 2, 2), AFFINE, 2, iter([np.zeros((2, 2, 2))]))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("every_voxel", [True, False])
def test_read_channels_at_every_voxel_or_some(tmp_path, suffix, every_voxel):
    """``(C, n)`` rows in Fortran order as nibabel reads them; every voxel of an uncompressed
    float32 file is a view of its memory map (no copy), else a fresh array."""
    rng = np.random.default_rng(3)
    data = rng.standard_normal((5, 4, 3, 6)).astype(np.float32)
    path = nio.save_array(data, np.eye(4), tmp_path / f"c{suffix}")
    voxels = np.arange(60) if every_voxel else np.array([0, 7, 59])
    got = nio.read_channels_at(nib.load(path), voxels)
    expected = data.reshape(60, 6, order="F").T[:, voxels]
    np.testing.assert_array_equal(got, expected)
    assert got.shape == (6, voxels.size) and got.flags.c_contiguous
    assert isinstance(got.base, np.memmap) == (every_voxel and suffix == ".nii")
