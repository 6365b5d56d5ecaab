"""The plain functions behind the participant-level interfaces, without nipype, on tiny NIfTIs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.core.resample import grid_changes
from bids_dmri_ldm.core.sh import sh_basis
from bids_dmri_ldm.interfaces import steps
from bids_dmri_ldm.interfaces.steps import InputDataError

AFFINE = np.diag([-2.0, 2.0, 2.0, 1.0])


def _directions(n: int, seed: int = 0) -> np.ndarray:
    i = np.arange(n) + 0.5
    z = 1 - i / n
    phi = np.pi * (1 + 5**0.5) * i
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def write_run(folder: Path, data: np.ndarray, bvals, bvecs, name="sub-01_dwi"):
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), folder / f"{name}.nii.gz")
    (folder / f"{name}.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    (folder / f"{name}.bvec").write_text("\n".join(" ".join(f"{v:.8f}" for v in row) for row in np.asarray(bvecs).T))
    return tuple(str(folder / f"{name}{ext}") for ext in (".nii.gz", ".bval", ".bvec"))


def band_limited_run(tmp_path, shape=(5, 4, 3), n_dirs=30, seed=0):
    """DWI whose attenuation is exactly an order-4 SH series (so the fit is exact)."""
    rng = np.random.default_rng(seed)
    bvecs = np.vstack([np.zeros((2, 3)), _directions(n_dirs)])
    bvals = np.r_[0, 5, np.full(n_dirs, 1000.0)]
    basis, _, l_values = sh_basis(bvecs[2:], 4)
    coeffs = rng.normal(0, 0.02, shape + (basis.shape[1],))
    coeffs[..., 0] = 0.5 * np.sqrt(4 * np.pi)  # mean attenuation 0.5
    att = coeffs @ basis.T
    assert 0.05 < att.min() and att.max() < 0.95
    s0 = rng.uniform(500, 1500, shape)
    data = np.concatenate([np.stack([s0, s0], -1), s0[..., None] * att], axis=-1).astype(np.float32)
    return write_run(tmp_path / "in", data, bvals, bvecs), data, coeffs, l_values


def test_check_run_inputs_errors(tmp_path):
    bvecs = np.vstack([np.zeros((1, 3)), _directions(20)])
    bvals = np.r_[0, np.full(20, 1000.0)]
    data = np.ones((3, 3, 3, 21), np.float32)
    dwi, bval, bvec = write_run(tmp_path / "ok", data, bvals, bvecs)
    summary = steps.check_run_inputs(dwi, bval, bvec)
    assert summary.shape == (3, 3, 3, 21) and summary.plan.b0_index.size == 1

    cases = {
        "no .bval file found": (dwi, None, bvec, {}),
        "is empty": write_run(tmp_path / "e", data, bvals, bvecs)[:1] + (str(tmp_path / "e" / "x.bval"), bvec),
        "21 volumes but the gradient table has 20": write_run(tmp_path / "m", data, bvals[:-1], bvecs[:-1]),
        "must be a 4D image": write_run(tmp_path / "3d", data[..., 0], bvals, bvecs),
        "no b0 volume": write_run(tmp_path / "nb0", data, np.full(21, 1000.0), _directions(21)),
        "--shell 1000: no shell within 100 s/mm² (shells available: 3000 (20 directions))":
            write_run(tmp_path / "ns", data, np.r_[0, np.full(20, 3000.0)], bvecs),
        "needs at least 15": write_run(tmp_path / "few", data[..., :11], bvals[:11], bvecs[:11]),
    }
    (tmp_path / "e" / "x.bval").write_text("")
    for fragment, args in cases.items():
        args = args[:3]
        with pytest.raises(InputDataError, match=re.escape(fragment)) as info:
            steps.check_run_inputs(*args, steps.ShellOptions(shells=(1000.0,)))
        assert "\n" not in str(info.value)


def test_iter_volumes_corrupt_and_scaled(tmp_path):
    data = np.arange(2 * 2 * 2 * 3, dtype=np.int16).reshape(2, 2, 2, 3)
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, tmp_path / "s.nii.gz")
    vols = dict(steps.iter_volumes(tmp_path / "s.nii.gz"))
    assert sorted(vols) == [0, 1, 2] and all(v.dtype == np.float32 for v in vols.values())
    np.testing.assert_allclose(np.stack([vols[2], vols[0]], -1), data[..., [2, 0]] * 0.5 + 10.0)
    big = np.random.default_rng(0).normal(size=(20, 20, 20, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(big, AFFINE), tmp_path / "c.nii.gz")
    raw = (tmp_path / "c.nii.gz").read_bytes()
    (tmp_path / "c.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputDataError, match="corrupt or truncated"):
        list(steps.iter_volumes(tmp_path / "c.nii.gz"))


def _select_and_load(dwi, bval, bvec, work, **options):
    sel = steps.select_shells_step(dwi, bval, bvec, steps.ShellOptions(**options).to_dict(), work)
    return sel, steps.load_dwi_step(dwi, sel["plan_file"], work)


def test_load_dwi_masks_nan(tmp_path, caplog):
    (dwi, bval, bvec), data, _, _ = band_limited_run(tmp_path)
    bad = data.copy()
    bad[1, 1, 1, 3] = np.nan
    bad[2, 2, 2, 0] = -np.inf
    dwi = write_run(tmp_path / "nan", bad, np.loadtxt(bval), np.loadtxt(bvec).T)[0]
    _, loaded = _select_and_load(dwi, bval, bvec, tmp_path / "w")
    assert loaded["n_bad_voxels"] == 2 and "NaN/Inf" in caplog.text
    clean = np.asanyarray(nib.load(loaded["dwi_file"]).dataobj)
    assert np.all(np.isfinite(clean)) and clean.shape == data.shape
    mask = steps.brain_mask_step(loaded["mean_b0_file"], loaded["bad_voxels_file"], tmp_path / "w",
                                 mask_file=_ones_mask(tmp_path, data.shape[:3]))
    mask_data = np.asanyarray(nib.load(mask["mask_file"]).dataobj)
    assert mask["n_voxels"] == mask_data.size - 2 and mask_data[1, 1, 1] == 0 and mask_data[2, 2, 2] == 0


def _ones_mask(tmp_path, shape, affine=AFFINE):
    path = tmp_path / f"mask_{len(list(tmp_path.glob('mask_*')))}.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), affine), path)
    return str(path)


def _loaded_run(tmp_path):
    (dwi, bval, bvec), data, _, _ = band_limited_run(tmp_path, shape=(8, 7, 6))
    return _select_and_load(dwi, bval, bvec, tmp_path / "w")[1], data.shape[:3]


def _save_mask(tmp_path, data, affine, name):
    path = tmp_path / f"{name}_mask.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return str(path)


def test_given_mask_on_another_grid_is_resampled_nearest(tmp_path):
    """A mask on a finer, shifted grid is brought onto the DWI grid through the two affines: each
    DWI voxel takes the mask value at the nearest mask voxel of its centre (world space)."""
    loaded, shape = _loaded_run(tmp_path)
    fine = np.diag([-1.0, 1.0, 1.0, 1.0])
    fine[:3, 3] = [0.5, -1.5, 0.5]  # DWI voxel (i, j, k) centre = fine voxel (2i + .5, 2j + 1.5, 2k - .5)
    fine_shape = (2 * shape[0] + 2, 2 * shape[1] + 4, 2 * shape[2] + 2)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in fine_shape], indexing="ij"), -1)
    centre = np.array([8.0, 7.0, 6.0])
    mask_fine = (np.linalg.norm(ijk - centre, axis=-1) <= 5.5).astype(np.uint8)
    out = steps.brain_mask_step(loaded["mean_b0_file"], loaded["bad_voxels_file"], tmp_path / "w",
                                mask_file=_save_mask(tmp_path, mask_fine, fine, "fine"))
    got = np.asanyarray(nib.load(out["mask_file"]).dataobj) > 0
    dwi_ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = dwi_ijk @ AFFINE[:3, :3].T + AFFINE[:3, 3]
    src = np.rint((world - fine[:3, 3]) @ np.linalg.inv(fine[:3, :3]).T + 1e-6).astype(int)
    expected = mask_fine[tuple(src.reshape(-1, 3).T)].reshape(shape) > 0
    np.testing.assert_array_equal(got, expected)
    assert 0 < got.sum() < got.size and out["warnings"] == []


@pytest.mark.parametrize("case, fragment", [
    ("empty", "the brain mask is empty"),
    ("fourd", "a brain mask must be a 3D image; found shape (8, 7, 6, 2)"),
    ("far", "its grid does not overlap the DWI's field of view"),
    ("outside", "its brain voxels lie outside the DWI's field of view"),
])
def test_bad_given_masks_are_one_line_input_errors(tmp_path, case, fragment):
    loaded, shape = _loaded_run(tmp_path)
    far = AFFINE.copy()
    far[:3, 3] = [500.0, 500.0, 500.0]
    big = np.zeros((20, 20, 20), np.uint8)
    big[-2:, -2:, -2:] = 1  # brain voxels only where the DWI grid is not
    big_affine = AFFINE.copy()
    big_affine[:3, 3] = [4.0, -4.0, -4.0]
    masks = {"empty": (np.zeros(shape, np.uint8), AFFINE), "fourd": (np.ones(shape + (2,), np.uint8), AFFINE),
             "far": (np.ones(shape, np.uint8), far), "outside": (big, big_affine)}
    data, affine = masks[case]
    with pytest.raises(InputDataError, match=re.escape(fragment)) as info:
        steps.brain_mask_step(loaded["mean_b0_file"], loaded["bad_voxels_file"], tmp_path / "w",
                              mask_file=_save_mask(tmp_path, data, affine, case))
    assert "\n" not in str(info.value)


def test_given_mask_single_volume_4d_and_non_binary_values(tmp_path):
    """A 4D mask with one volume is squeezed; values other than 0/1 are thresholded > 0 with one
    warning line naming them (NaN counted, never brain)."""
    loaded, shape = _loaded_run(tmp_path)
    single = np.ones(shape + (1,), np.uint8)
    out = steps.brain_mask_step(loaded["mean_b0_file"], loaded["bad_voxels_file"], tmp_path / "w",
                                mask_file=_save_mask(tmp_path, single, AFFINE, "single"))
    assert out["n_voxels"] == int(np.prod(shape)) and out["warnings"] == []
    prob = np.zeros(shape, np.float32)
    prob[2:6, 2:5, 1:4] = 0.3
    prob[3, 3, 2] = 2.0
    prob[0, 0, 0] = np.nan
    prob[1, 1, 1] = -1.0
    out = steps.brain_mask_step(loaded["mean_b0_file"], loaded["bad_voxels_file"], tmp_path / "w",
                                mask_file=_save_mask(tmp_path, prob, AFFINE, "prob"))
    got = np.asanyarray(nib.load(out["mask_file"]).dataobj) > 0
    np.testing.assert_array_equal(got, prob > 0)
    assert len(out["warnings"]) == 1 and "\n" not in out["warnings"][0]
    assert "values other than 0 and 1 (values from -1 to 2, 1 NaN/Inf)" in out["warnings"][0]


def _scale_file(work, lam, shape):
    scale_file = str(work / "scale_in.nii")
    nib.save(nib.Nifti1Image(np.broadcast_to(np.asarray(lam, np.float32), shape + (3,)).copy(), AFFINE), scale_file)
    return scale_file


def _rebuild(fitted, loaded, scale_files, mask_file, sel, work, **kwargs):
    """The rebuild of the workflow: the fitted SH and the scale maps (Eq. 3 applied there)."""
    return steps.rebuild_step(fitted["s0_file"], loaded["dwi_file"], loaded["mean_b0_file"], fitted["sh_files"],
                              mask_file, sel["plan_file"], sel["bval_file"], sel["bvec_file"], 4, work,
                              scale_files=scale_files, **kwargs)


@pytest.mark.parametrize("lam", [(1.0, 1.0, 1.0), (0.9, 0.6, 0.3)])
def test_fit_scale_rebuild_known_answer(tmp_path, lam):
    """A band-limited signal: lambda = 1 gives it back exactly; other lambdas give S0 * B (lambda C)."""
    (dwi, bval, bvec), data, coeffs, l_values = band_limited_run(tmp_path)
    work = tmp_path / "w"
    sel, loaded = _select_and_load(dwi, bval, bvec, work)
    mask_file = _ones_mask(tmp_path, data.shape[:3])
    fitted = steps.fit_rish_step(loaded["dwi_file"], sel["plan_file"], 4, work)
    assert len(fitted["sh_files"]) == len(fitted["rish_files"]) == 1
    np.testing.assert_allclose(np.asanyarray(nib.load(fitted["sh_files"][0]).dataobj), coeffs, atol=1e-5)
    scale_files = [_scale_file(work, lam, data.shape[:3])]
    scaled = steps.scale_sh_step(fitted["sh_files"], scale_files, mask_file, 4, work)
    rish_src = np.asanyarray(nib.load(scaled["rish_source_file"]).dataobj)
    rish_pred = np.asanyarray(nib.load(scaled["rish_predicted_file"]).dataobj)
    np.testing.assert_allclose(rish_pred, rish_src * np.square(lam), rtol=1e-5)  # Eq. 1-3
    out = _rebuild(fitted, loaded, scale_files, mask_file, sel, work)
    rebuilt = np.asanyarray(nib.load(out["dwi_file"]).dataobj)
    per_coeff = np.asarray(lam)[[{0: 0, 2: 1, 4: 2}[int(l)] for l in l_values]]
    basis = sh_basis(np.loadtxt(bvec).T[2:], 4)[0]
    expected = data[..., :2].mean(-1, keepdims=True) * ((coeffs * per_coeff) @ basis.T)
    np.testing.assert_allclose(rebuilt[..., :2], data[..., :2], rtol=1e-6)  # b0s carried as they are
    np.testing.assert_allclose(rebuilt[..., 2:], np.clip(expected, 0, None), rtol=2e-4, atol=1e-2)
    np.testing.assert_allclose(np.loadtxt(out["bval_file"]), np.loadtxt(bval))


@pytest.mark.parametrize("skull_strip", [False, True])
def test_lambda_only_inside_the_mask_and_every_voxel_rebuilt(tmp_path, skull_strip):
    """The mask decides only where lambda applies: outside it the source signal comes back (lambda
    = 1, even where the scale file says otherwise); no voxel is zero unless ``skull_strip``."""
    (dwi, bval, bvec), data, coeffs, l_values = band_limited_run(tmp_path, shape=(6, 5, 4))
    work = tmp_path / "w"
    sel, loaded = _select_and_load(dwi, bval, bvec, work)
    mask = np.zeros(data.shape[:3], np.uint8)
    mask[1:4, 1:4, 1:3] = 1
    mask_file = _save_mask(tmp_path, mask, AFFINE, "partial")
    fitted = steps.fit_rish_step(loaded["dwi_file"], sel["plan_file"], 4, work)
    np.testing.assert_allclose(np.asanyarray(nib.load(fitted["sh_files"][0]).dataobj), coeffs, atol=1e-5)  # every voxel
    lam = np.asarray((0.9, 0.6, 0.3), np.float32)
    scale_files = [_scale_file(work, lam, data.shape[:3])]
    scaled = steps.scale_sh_step(fitted["sh_files"], scale_files, mask_file, 4, work / "s", skull_strip=skull_strip)
    inside = mask > 0
    written_scale = np.asanyarray(nib.load(scaled["scale_file"]).dataobj)
    np.testing.assert_allclose(written_scale[inside], np.broadcast_to(lam, (inside.sum(), 3)))
    np.testing.assert_array_equal(written_scale[~inside], 1.0)
    rish_src = np.asanyarray(nib.load(scaled["rish_source_file"]).dataobj)
    rish_pred = np.asanyarray(nib.load(scaled["rish_predicted_file"]).dataobj)
    np.testing.assert_allclose(rish_pred[inside], rish_src[inside] * np.square(lam), rtol=1e-5)
    if skull_strip:
        assert np.all(rish_src[~inside] == 0) and np.all(rish_pred[~inside] == 0)
    else:
        np.testing.assert_allclose(rish_pred[~inside], rish_src[~inside], rtol=1e-6)
        assert np.all(rish_src[..., 0] > 0)
    out = _rebuild(fitted, loaded, scale_files, mask_file, sel, work / "r", skull_strip=skull_strip)
    rebuilt = np.asanyarray(nib.load(out["dwi_file"]).dataobj)
    per_coeff = lam[[{0: 0, 2: 1, 4: 2}[int(l)] for l in l_values]]
    basis = sh_basis(np.loadtxt(bvec).T[2:], 4)[0]
    s0 = data[..., :2].mean(-1, keepdims=True)
    expected = np.where(inside[..., None], s0 * ((coeffs * per_coeff) @ basis.T), s0 * (coeffs @ basis.T))
    expected = np.concatenate([data[..., :2], np.clip(expected, 0, None)], axis=-1)
    if skull_strip:
        expected[~inside] = 0.0
    else:
        np.testing.assert_allclose(rebuilt[~inside], data[~inside], rtol=2e-4, atol=1e-2)  # the source comes back
        assert np.count_nonzero(rebuilt == 0) == 0
    np.testing.assert_allclose(rebuilt, expected, rtol=2e-4, atol=1e-2)


def test_resample_step(tmp_path):
    img_file = str(tmp_path / "v.nii")
    vol = np.random.default_rng(1).uniform(size=(6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, AFFINE), img_file)
    same = steps.resample_step(img_file, None, tmp_path / "a")
    np.testing.assert_array_equal(np.asanyarray(nib.load(same).dataobj), vol)
    assert not grid_changes(AFFINE, vol.shape, None)
    assert grid_changes(AFFINE, vol.shape, 1.05)
    assert not grid_changes(AFFINE, vol.shape, 2.0)
    fine = nib.load(steps.resample_step(img_file, 1.05, tmp_path / "b", clip_min=0.0))
    assert fine.shape == (11, 10, 8)
    np.testing.assert_allclose(np.abs(np.diag(fine.affine)[:3]), 1.05)
    assert np.asanyarray(fine.dataobj).min() >= 0
    mask = nib.load(steps.resample_step(_ones_mask(tmp_path, vol.shape), 1.05, tmp_path / "c", kind="mask"))
    assert set(np.unique(np.asanyarray(mask.dataobj))) == {1}


def test_crash_reason():
    from bids_dmri_ldm.workflows.outcomes import crash_reason

    text = """Node: x
Traceback (most recent call last):
  File "a.py", line 1, in f
    raise InputDataError("bad")
bids_dmri_ldm.interfaces.steps.InputDataError: sub-01_dwi.nii.gz: the image has 3 volumes but the gradient table has 2
"""
    assert crash_reason(text) == ("InputDataError",
                                  "sub-01_dwi.nii.gz: the image has 3 volumes but the gradient table has 2")
    assert crash_reason("nothing useful")[0] == "RuntimeError"


@pytest.mark.parametrize("slope", [1.0, 0.5])
def test_load_dwi_streams_the_volumes_read_and_keeps_stored_integers(tmp_path, slope):
    """One streamed pass: the volumes read in input order, the stored integers kept when the file
    has no scaling (float32 image values otherwise), means as nibabel's values give; the SH fit
    and RISH of the integer file equal those of the same values stored as float32."""
    rng = np.random.default_rng(4)
    n_dirs = 20
    bvals = np.r_[0, np.full(n_dirs, 1000.0), 0, np.full(n_dirs, 2000.0)]  # b0s between the shells
    bvecs = np.vstack([np.zeros((1, 3)), _directions(n_dirs), np.zeros((1, 3)), _directions(n_dirs, 1)])
    data = rng.integers(200, 2000, size=(6, 5, 4, bvals.size)).astype(np.int16)
    dwi, bval, bvec = write_run(tmp_path / "in", data, bvals, bvecs)
    img = nib.Nifti1Image(data, AFFINE)
    img.header.set_slope_inter(slope, 0.0)
    nib.save(img, dwi)
    values = np.asanyarray(nib.load(dwi).dataobj).astype(np.float64)
    sel, out = _select_and_load(dwi, bval, bvec, tmp_path / "work")
    plan, _ = steps.read_plan(sel["plan_file"])
    read = nib.load(out["dwi_file"])
    assert read.get_data_dtype() == (np.int16 if slope == 1.0 else np.float32)
    np.testing.assert_allclose(np.asanyarray(read.dataobj), values[..., plan.read_index], rtol=1e-6)
    np.testing.assert_allclose(nib.load(out["mean_b0_file"]).get_fdata(), values[..., [0, n_dirs + 1]].mean(-1),
                               rtol=1e-6)
    np.testing.assert_allclose(nib.load(out["mean_dwi_file"]).get_fdata(), values[..., plan.mask_index].mean(-1),
                               rtol=1e-6)
    assert out["integer_input"] and out["n_bad_voxels"] == 0
    fitted = steps.fit_rish_step(out["dwi_file"], sel["plan_file"], 4, tmp_path / "work")
    floats = write_run(tmp_path / "f", values.astype(np.float32), bvals, bvecs)[0]
    sel_f, out_f = _select_and_load(floats, bval, bvec, tmp_path / "work_f")
    assert nib.load(out_f["dwi_file"]).get_data_dtype() == np.float32
    fitted_f = steps.fit_rish_step(out_f["dwi_file"], sel_f["plan_file"], 4, tmp_path / "work_f")
    assert len(fitted["sh_files"]) == 2
    for key in ("sh_files", "rish_files"):
        for a, b in zip(fitted[key], fitted_f[key]):
            np.testing.assert_allclose(nib.load(a).get_fdata(), nib.load(b).get_fdata(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("integer_output", [False, True])
def test_rebuild_records_the_report_samples_of_the_written_file(tmp_path, integer_output):
    """What the rebuild records for the report (ReportSamples) is the written file's signal at the
    displayed voxels and the mean of its b0 volumes, wherever they are in the output (here
    between two shells), in image values also for int16 output (to within half a quantum)."""
    rng = np.random.default_rng(7)
    n_dirs = 20
    bvals = np.r_[0, np.full(n_dirs, 1000.0), 0, np.full(n_dirs, 2000.0)]
    bvecs = np.vstack([np.zeros((1, 3)), _directions(n_dirs), np.zeros((1, 3)), _directions(n_dirs, 1)])
    shape = (7, 6, 5)
    s0 = rng.uniform(800, 1200, shape)
    data = np.concatenate([s0[..., None], s0[..., None] * rng.uniform(0.3, 0.6, shape + (n_dirs,)),
                           s0[..., None], s0[..., None] * rng.uniform(0.1, 0.3, shape + (n_dirs,))], axis=-1)
    dwi, bval, bvec = write_run(tmp_path / "in", data.astype(np.int16), bvals, bvecs)
    work = tmp_path / "w"
    sel, loaded = _select_and_load(dwi, bval, bvec, work)
    mask_file = _ones_mask(tmp_path, shape)
    fitted = steps.fit_rish_step(loaded["dwi_file"], sel["plan_file"], 4, work)
    lam = _scale_file(work, (0.9, 0.6, 0.3), shape)
    out = _rebuild(fitted, loaded, [lam, lam], mask_file, sel, work / "r", integer_output=integer_output,
                   report_samples=work / steps.REPORT_SAMPLES)
    img = nib.load(out["dwi_file"])
    assert img.get_data_dtype() == (np.int16 if integer_output else np.float32)
    values = np.asanyarray(img.dataobj)
    half_quantum = float(img.dataobj.slope) / 2 if integer_output else 0.0
    with np.load(work / steps.REPORT_SAMPLES) as recorded:
        ijk, signals, mean_b0 = recorded["ijk"], recorded["signals"], recorded["mean_b0"]
        assert int(recorded["dwi_bytes"]) == Path(out["dwi_file"]).stat().st_size
    assert len(ijk) > 10 and signals.shape == (len(ijk), bvals.size)
    np.testing.assert_allclose(signals, values[tuple(ijk.T)], rtol=1e-6, atol=half_quantum + 1e-3)
    b0 = np.flatnonzero(np.loadtxt(out["bval_file"]) < 50)
    assert list(b0) == [0, n_dirs + 1]
    np.testing.assert_allclose(mean_b0, values[..., b0].mean(-1), rtol=1e-6, atol=half_quantum + 1e-3)


def test_report_samples_read_the_same_voxels_whatever_the_memory_order():
    """ReportSamples gathers the displayed voxels from a volume's flat buffer: C-ordered,
    Fortran-ordered and strided volumes give the values of plain indexing, int16 volumes times
    the slope; b0 volumes are averaged."""
    rng = np.random.default_rng(3)
    shape = (9, 8, 7)
    mask = np.zeros(shape, bool)
    mask[2:7, 1:7, 1:6] = True
    samples = steps.ReportSamples(mask, np.eye(4), [0], 4, slope=0.5)
    assert len(samples.ijk) > 10
    base = rng.uniform(0, 100, shape).astype(np.float32)
    stored = rng.integers(0, 200, shape).astype(np.int16)
    wide = rng.uniform(0, 100, (9, 16, 7)).astype(np.float32)
    volumes = [np.ascontiguousarray(base), np.asfortranarray(stored), wide[:, ::2], np.asfortranarray(base)]
    passed = list(samples.observe(iter(volumes)))
    assert all(a is b for a, b in zip(passed, volumes))
    index = tuple(samples.ijk.T)
    expected = np.stack([base[index], stored[index] * np.float32(0.5), wide[:, ::2][index], base[index]], axis=1)
    assert samples.signals.shape == (len(samples.ijk), 4)
    np.testing.assert_array_equal(samples.signals, expected)
    np.testing.assert_array_equal(samples.b0_sum, base)


def test_load_dwi_records_its_copy_of_the_source_for_the_report(tmp_path):
    """The load step's record names the source as it is (resolved path, size, modification time)
    and its uncompressed copy, whose volumes are the source's volumes read, in that order."""
    (dwi, bval, bvec), _, _, _ = band_limited_run(tmp_path)
    work = tmp_path / "work"
    sel = steps.select_shells_step(dwi, bval, bvec, steps.ShellOptions().to_dict(), work)
    out = steps.load_dwi_step(dwi, sel["plan_file"], work, source_record=tmp_path / steps.SOURCE_COPY)
    record = json.loads((tmp_path / steps.SOURCE_COPY).read_text())
    plan, _ = steps.read_plan(sel["plan_file"])
    stat = Path(dwi).stat()
    assert record == {"source": str(Path(dwi).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "copy": str(Path(out["dwi_file"]).resolve()), "read_index": [int(t) for t in plan.read_index]}
    assert not record["copy"].endswith(".gz")
    np.testing.assert_allclose(np.asanyarray(nib.load(record["copy"]).dataobj),
                               nib.load(dwi).get_fdata()[..., plan.read_index], rtol=1e-6)


def test_rebuild_scales_exactly_as_the_coefficients_scaled_beforehand(tmp_path):
    """Eq. 3 inside the rebuild (scale_files) writes the very bytes of a rebuild from coefficients
    scaled beforehand with lambda = max(scale, 0) in the mask and 1 outside (negative and
    out-of-mask scale values included)."""
    (dwi, bval, bvec), data, _, l_values = band_limited_run(tmp_path, shape=(6, 5, 4))
    work = tmp_path / "w"
    sel, loaded = _select_and_load(dwi, bval, bvec, work)
    mask = np.zeros(data.shape[:3], np.uint8)
    mask[1:5, 1:4, :3] = 1
    mask_file = _save_mask(tmp_path, mask, AFFINE, "partial")
    fitted = steps.fit_rish_step(loaded["dwi_file"], sel["plan_file"], 4, work)
    scale = np.random.default_rng(5).uniform(-0.2, 1.5, data.shape[:3] + (3,)).astype(np.float32)
    scale_file = str(work / "scale_any.nii")
    nib.save(nib.Nifti1Image(scale, AFFINE), scale_file)
    lam = np.where(mask[..., None] > 0, np.maximum(scale, 0.0), 1.0).astype(np.float32)
    sh = np.asanyarray(nib.load(fitted["sh_files"][0]).dataobj).astype(np.float32)
    slots = [{0: 0, 2: 1, 4: 2}[int(l)] for l in l_values]
    prescaled = str(work / "sh_prescaled.nii")
    nib.save(nib.Nifti1Image((sh * lam[..., slots]).astype(np.float32), AFFINE), prescaled)
    inside = _rebuild(fitted, loaded, [scale_file], mask_file, sel, work / "inside")
    given = steps.rebuild_step(fitted["s0_file"], loaded["dwi_file"], loaded["mean_b0_file"], [prescaled], mask_file,
                               sel["plan_file"], sel["bval_file"], sel["bvec_file"], 4, work / "given")
    np.testing.assert_array_equal(np.asanyarray(nib.load(inside["dwi_file"]).dataobj),
                                  np.asanyarray(nib.load(given["dwi_file"]).dataobj))
    assert not np.allclose(np.asanyarray(nib.load(inside["dwi_file"]).dataobj)[..., 2:], data[..., 2:], rtol=1e-3)


def test_the_scale_map_step_makes_one_distance_transform_beside_the_prediction(simulated_dataset, tmp_path,
                                                                                monkeypatch):
    """ldm: the fill's nearest-inside index is computed once, in a thread other than the step's own
    (beside the prediction), and the maps written are those of the fill's own transform (the shells
    passed through too); rish-global, whose maps are one value inside the mask, computes none."""
    import threading

    from conftest import simulated_scan

    from bids_dmri_ldm.interfaces.steps import fit
    from bids_dmri_ldm.methods import LdmMethod, MethodOptions

    root = simulated_dataset(4.0)
    folder = root / "sub-01" / "ses-3T" / "dwi"
    files = [str(folder / f"sub-01_ses-3T_dwi.{e}") for e in ("nii.gz", "bval", "bvec")]
    work = tmp_path / "w"
    # b = 1000 translated (what the shipped models cover), b = 2000 and 3000 passed through
    sel = steps.select_shells_step(*files, steps.ShellOptions(covered=(1000.0,)).to_dict(), work)
    loaded = steps.load_dwi_step(files[0], sel["plan_file"], work)
    fitted = steps.fit_rish_step(loaded["dwi_file"], sel["plan_file"], 4, work)
    *_, brain, affine = simulated_scan(root, "3T")
    mask_file = _save_mask(tmp_path, brain.astype(np.uint8), affine, "brain")
    in_main_thread = []
    original = fit.nearest_inside_index

    def recorded(mask):
        in_main_thread.append(threading.current_thread() is threading.main_thread())
        return original(mask)

    monkeypatch.setattr(fit, "nearest_inside_index", recorded)

    def scale_maps(method, name):
        out = fit.predict_scale_step(fitted["rish_files"], mask_file, method, None, MethodOptions(omp_nthreads=1),
                                     sel["plan_file"], tmp_path / name)
        return [np.asanyarray(nib.load(f).dataobj) for f in out["scale_files"]]

    beside = scale_maps("ldm", "beside")
    assert in_main_thread == [False] and len(beside) == 3
    assert np.ptp(beside[0][..., 0]) > 0 and np.all(beside[1] == 1)  # b = 1000 varies; b = 2000: lambda = 1
    monkeypatch.setattr(LdmMethod, "varying_maps", False)  # each fill makes its own transform
    for got, expected in zip(beside, scale_maps("ldm", "inline"), strict=True):
        np.testing.assert_array_equal(got, expected)
    in_main_thread.clear()
    scale_maps("rish-global", "rish_global")
    assert in_main_thread == []
