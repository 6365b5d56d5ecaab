"""The report reads a derivative map from the RISH-map step's uncompressed per-shell maps only
when the derivative is the recorded file (a hard link) and nothing recorded changed since."""
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.interfaces import steps
from bids_dmri_ldm.reports.participant import load

SHAPE = (6, 5, 4)
AFFINE = np.diag([-2.0, 2.0, 2.0, 1.0])


def _save(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), AFFINE), str(path))
    return str(path)


@pytest.fixture
def two_shells(tmp_path):
    """The RISH-map step on two shells (six channels per stacked map), with its record."""
    rng = np.random.default_rng(7)
    sh = [_save(tmp_path / f"sh{k}.nii", rng.normal(size=SHAPE + (15,))) for k in range(2)]
    scale = [_save(tmp_path / f"scale{k}.nii", rng.uniform(0.5, 1.5, SHAPE + (3,))) for k in range(2)]
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:5, 1:4, 1:3] = 1
    mask_file = str(tmp_path / "mask.nii")
    nib.save(nib.Nifti1Image(mask, AFFINE), mask_file)
    record = tmp_path / steps.MAP_COPIES
    out = steps.scale_sh_step(sh, scale, mask_file, 4, tmp_path / "scale_sh", map_record=record)
    assert len(out["shell_map_files"]) == 6 and all(os.path.isfile(f) for f in out["shell_map_files"])
    return out, record


def _derivative(tmp_path, work_file, how):
    target = tmp_path / "out" / f"sub-01_{how}_dwimap.nii.gz"
    target.parent.mkdir(exist_ok=True)
    (os.link if how == "link" else shutil.copyfile)(work_file, target)
    return target


def _no_inflating(path):
    raise AssertionError(f"{path} inflated")


@pytest.mark.parametrize("role", ["scale_file", "rish_source_file", "rish_predicted_file"])
def test_a_hard_linked_map_is_read_from_its_per_shell_maps(two_shells, tmp_path, monkeypatch, role):
    out, record = two_shells
    expected = np.asanyarray(nib.load(out[role]).dataobj)
    assert expected.shape == SHAPE + (6,)
    derivative = _derivative(tmp_path, out[role], "link")
    monkeypatch.setattr(load, "load_nifti", _no_inflating)
    img = load._map_from_copies(derivative, [tmp_path / "missing.json", record])
    assert np.array_equal(np.asanyarray(img.dataobj), expected)  # both shells, in order
    np.testing.assert_array_equal(load._load_map(derivative, SHAPE, [record]),
                                  load._canonical(nib.load(out[role]))[0])


def test_a_copy_or_a_changed_per_shell_map_is_inflated_instead(two_shells, tmp_path):
    out, record = two_shells
    copied = _derivative(tmp_path, out["scale_file"], "copy")
    assert load._map_from_copies(copied, [record]) is None
    linked = _derivative(tmp_path, out["scale_file"], "link")
    assert load._map_from_copies(linked, [record]) is not None
    part = json.loads(record.read_text())["maps"][0]["copies"][1]["path"]
    stat = os.stat(part)
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten since
    assert load._map_from_copies(linked, [record]) is None
    expected = load._canonical(nib.load(out["scale_file"]))[0]
    np.testing.assert_array_equal(load._load_map(linked, SHAPE, [record]), expected)  # inflated
    record.write_text("{not json")
    assert load._map_from_copies(linked, [record]) is None
