import numpy as np
import pytest

from bids_dmri_ldm.core.gradients import GradientError, check_gradients, load_gradients, select_shell


def write(tmp_path, bvals, bvecs):
    np.savetxt(tmp_path / "dwi.bval", np.atleast_2d(bvals), fmt="%g")
    np.savetxt(tmp_path / "dwi.bvec", np.asarray(bvecs).T, fmt="%.6f")
    return tmp_path / "dwi.bval", tmp_path / "dwi.bvec"


def table():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(8, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    bvals = np.array([0, 5, 1000, 1000, 995, 1010, 2000, 2000, 1000, 1000])
    bvecs = np.vstack([[np.nan] * 3, [0, 0, 0], v])
    return bvals, bvecs


def test_round_trip_nan_b0_rows_and_shell_selection(tmp_path):
    bvals, bvecs = table()
    bvals_r, bvecs_r = load_gradients(*write(tmp_path, bvals, bvecs))
    clean = check_gradients(bvals_r, bvecs_r, 10)
    assert np.all(clean[:2] == 0)
    np.testing.assert_allclose(np.linalg.norm(clean[2:], axis=1), 1, atol=1e-5)
    sel = select_shell(bvals_r, clean, 1000, 100)
    assert list(sel.b0_index) == [0, 1]
    assert list(sel.shell_index) == [2, 3, 4, 5, 8, 9]
    assert list(sel.index) == [0, 1, 2, 3, 4, 5, 8, 9]
    assert sel.bvecs_shell.shape == (6, 3) and abs(sel.shell_bval - 1000.8) < 0.1


def test_errors(tmp_path):
    bvals, bvecs = table()
    with pytest.raises(GradientError, match="volumes"):
        check_gradients(bvals, bvecs, 11)
    with pytest.raises(GradientError, match="not found"):
        load_gradients(tmp_path / "nope.bval", tmp_path / "nope.bvec")
    (tmp_path / "empty.bval").write_text("")
    (tmp_path / "empty.bvec").write_text("")
    with pytest.raises(GradientError, match="empty"):
        load_gradients(tmp_path / "empty.bval", tmp_path / "empty.bvec")
    with pytest.raises(GradientError, match="no b0"):
        select_shell(np.array([1000.0, 1000.0]), np.eye(3)[:2])
    with pytest.raises(GradientError, match="b=3000"):
        select_shell(bvals, check_gradients(bvals, bvecs, 10), 3000)
    bad = bvecs.copy()
    bad[3] = [0.2, 0.2, 0.2]
    with pytest.raises(GradientError, match="unit"):
        check_gradients(bvals, bad, 10)
    bad[3] = np.nan
    with pytest.raises(GradientError, match="NaN"):
        check_gradients(bvals, bad, 10)
