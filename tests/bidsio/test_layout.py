"""BIDS input: runs, inheritance, selection, 3T/7T roles, pairing, masks, validation."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.bidsio import validate as validate_module
from bids_dmri_ldm.bidsio.gradients import find_gradient_file
from bids_dmri_ldm.bidsio.layout import DWIRun, collect_dwi_runs, load_layout
from bids_dmri_ldm.bidsio.pairing import (
    is_source,
    is_target,
    pair_runs,
    source_runs,
    split_by_field_strength,
)
from bids_dmri_ldm.bidsio.validate import summarise_errors, validate_dataset
from bids_dmri_ldm.cli.exitcodes import BidsAppError


@pytest.fixture(scope="module")
def shared_layout(shared_bids_dataset):
    return load_layout(shared_bids_dataset.root)


def _stems(runs):
    return [run.stem for run in runs]


# --------------------------------------------------------------------------- collection
def test_root_level_gradients_and_metadata_are_inherited(shared_bids_dataset, shared_layout):
    runs = collect_dwi_runs(shared_layout, ["01"], ["1"])
    assert _stems(runs) == ["sub-01_ses-1_acq-3T", "sub-01_ses-1_acq-7T"]
    root = shared_bids_dataset.root
    for run in runs:
        assert run.bval == root / "dwi.bval" and run.bvec == root / "dwi.bvec"
        assert run.metadata["PhaseEncodingDirection"] == "j-"  # from root dwi.json
        assert run.entities["subject"] == "01" and run.entities["session"] == "1"
        assert run.mask is None  # raw dataset: the workflow computes the mask
    assert [run.field_strength for run in runs] == [3.0, 7.0]
    assert [run.metadata["EchoTime"] for run in runs] == [0.0895, 0.0712]


def test_gradients_next_to_the_image(make_bids_dataset):
    ds = make_bids_dataset(inherit_gradients=False)
    (run,) = collect_dwi_runs(load_layout(ds.root))
    assert run.bval == ds.root / "sub-01" / "dwi" / "sub-01_dwi.bval"
    assert run.bvec.name == "sub-01_dwi.bvec"
    bvals = np.loadtxt(run.bval)
    assert bvals.shape == ds.bvals.shape and np.allclose(bvals, ds.bvals)
    assert np.allclose(np.loadtxt(run.bvec).T, ds.bvecs, atol=1e-7)


def test_nearer_gradient_file_overrides_the_root_one(make_bids_dataset):
    ds = make_bids_dataset(subjects=("01", "02"))
    override = ds.root / "sub-02" / "dwi" / "sub-02_dwi.bval"
    override.write_text(" ".join(["0"] * len(ds.bvals)) + "\n")
    runs = collect_dwi_runs(load_layout(ds.root))
    assert [run.bval for run in runs] == [ds.root / "dwi.bval", override]
    assert [run.bvec for run in runs] == [ds.root / "dwi.bvec"] * 2
    # the report's lookup (file names, no pybids) is the same rule and finds the same files
    assert [find_gradient_file(run.dwi, ".bval") for run in runs] == [ds.root / "dwi.bval", override]
    assert [find_gradient_file(run.dwi, ".bvec") for run in runs] == [ds.root / "dwi.bvec"] * 2


def test_session_level_gradients_apply_to_that_session_only(make_bids_dataset):
    ds = make_bids_dataset(sessions=("1", "2"), inherit_gradients=False)
    for ses in ("1", "2"):
        for ext in ("bval", "bvec"):
            (ds.root / "sub-01" / f"ses-{ses}" / "dwi" / f"sub-01_ses-{ses}_dwi.{ext}").unlink()
    session_bval = ds.root / "sub-01" / "ses-1" / "sub-01_ses-1_dwi.bval"
    session_bval.write_text(" ".join(f"{b:g}" for b in ds.bvals) + "\n")
    session_bval.with_suffix(".bvec").write_text("\n".join(
        " ".join(f"{v:.8f}" for v in row) for row in ds.bvecs.T) + "\n")
    rejected = {}
    (run,) = collect_dwi_runs(load_layout(ds.root), rejected=rejected)
    assert run.session == "1" and run.bval == session_bval
    assert list(rejected) == ["sub-01_ses-2"]  # ses-1's file does not apply to ses-2
    assert find_gradient_file(run.dwi, ".bval") == session_bval
    ses2 = ds.root / "sub-01" / "ses-2" / "dwi" / "sub-01_ses-2_dwi.nii.gz"
    with pytest.raises(FileNotFoundError, match="no .bval file for sub-01_ses-2_dwi.nii.gz"):
        find_gradient_file(ses2, ".bval")  # the same rule in the report's lookup


def test_sibling_gradients_with_other_entities_never_apply(tmp_path):
    _write_qsiprep_like(tmp_path / "qsiprep")
    (tmp_path / "qsiprep" / "sub-01" / "dwi" / "sub-01_space-T1w_desc-preproc_dwi.bval").unlink()
    rejected = {}
    runs = collect_dwi_runs(load_layout(tmp_path / "qsiprep"), rejected=rejected)
    assert _stems(runs) == ["sub-01_acq-b"]  # acq-b's table is not used for the other run
    assert "no .bval file found" in rejected["sub-01"]


def test_all_runs_and_session_filter(shared_layout):
    assert len(collect_dwi_runs(shared_layout)) == 8
    runs = collect_dwi_runs(shared_layout, session_labels=["2"])
    assert {run.session for run in runs} == {"2"} and len(runs) == 4


def test_filter_file_queries(shared_layout):
    runs = collect_dwi_runs(shared_layout, ["02"], filters={"dwi": {"acquisition": "7T"}})
    assert _stems(runs) == ["sub-02_ses-1_acq-7T", "sub-02_ses-2_acq-7T"]
    # null = entity absent: every run here has a session, so nothing matches
    with pytest.raises(BidsAppError, match="no DWI run") as info:
        collect_dwi_runs(shared_layout, filters={"dwi": {"session": None}})
    assert info.value.exit_code == 18
    # "*" = entity present
    assert len(collect_dwi_runs(shared_layout, filters={"dwi": {"acquisition": "*"}})) == 8
    # metadata keys filter too (value as written in the sidecar)
    runs = collect_dwi_runs(shared_layout, filters={"dwi": {"MagneticFieldStrength": 7.0}})
    assert {run.field_strength for run in runs} == {7.0}


def test_labels_and_filter_must_overlap(shared_layout):
    with pytest.raises(BidsAppError) as info:
        collect_dwi_runs(shared_layout, ["01"], filters={"dwi": {"subject": "02"}})
    assert info.value.exit_code == 18


@pytest.mark.parametrize(
    "kwargs, code, text",
    [
        ({"participant_labels": ["03"]}, 66, "participant label(s) 03 not found"),
        ({"participant_labels": ["01"], "session_labels": ["3"]}, 66, "available: 1, 2"),
        ({"filters": {"dwi": {"acquisition": "9T"}}}, 18, "acquisition=9T"),
    ],
)
def test_selection_errors(shared_layout, kwargs, code, text):
    with pytest.raises(BidsAppError) as info:
        collect_dwi_runs(shared_layout, **kwargs)
    assert info.value.exit_code == code
    assert text in str(info.value)


def test_missing_gradients(make_bids_dataset):
    ds = make_bids_dataset(subjects=("01", "02"), inherit_gradients=False)
    (ds.root / "sub-02" / "dwi" / "sub-02_dwi.bvec").unlink()
    layout = load_layout(ds.root)
    with pytest.raises(BidsAppError, match="sub-02: no .bvec file found") as info:
        collect_dwi_runs(layout)
    assert info.value.exit_code == 65
    rejected = {}
    assert _stems(collect_dwi_runs(layout, rejected=rejected)) == ["sub-01"]
    assert list(rejected) == ["sub-02"]


def test_malformed_field_strength(make_bids_dataset):
    ds = make_bids_dataset()
    sidecar = ds.root / "sub-01" / "dwi" / "sub-01_dwi.json"
    sidecar.write_text(json.dumps({"MagneticFieldStrength": "strong"}))
    with pytest.raises(BidsAppError, match="not a positive number") as info:
        collect_dwi_runs(load_layout(ds.root))
    assert info.value.exit_code == 65


def test_database_dir_is_written_and_reused(make_bids_dataset, tmp_path):
    ds = make_bids_dataset()
    db = tmp_path / "db"
    first = collect_dwi_runs(load_layout(ds.root, db))
    assert any(db.iterdir())
    second = collect_dwi_runs(load_layout(ds.root, db))
    assert first == second


def test_database_dir_of_another_dataset_is_refused(make_bids_dataset, tmp_path):
    first, second = make_bids_dataset(), make_bids_dataset()
    db = tmp_path / "db"
    load_layout(first.root, db)
    with pytest.raises(BidsAppError, match="indexes another dataset") as info:
        load_layout(second.root, db)
    assert info.value.exit_code == 64


def test_not_a_bids_dataset(tmp_path):
    with pytest.raises(BidsAppError) as info:
        load_layout(tmp_path)
    assert info.value.exit_code == 66


# --------------------------------------------------------------------------- roles
def test_split_by_field_strength(shared_layout):
    runs = collect_dwi_runs(shared_layout)
    source, target, unknown = split_by_field_strength(runs)
    assert len(source) == len(target) == 4 and unknown == []
    assert all(is_source(r) and r.field_strength < 5 for r in source)
    assert all(is_target(r) and r.field_strength >= 5 for r in target)
    assert source_runs(runs) == source


def test_roles_filter_keeps_source_runs_only(shared_layout):
    runs = collect_dwi_runs(shared_layout, ["01"], roles=("source",))
    assert _stems(runs) == ["sub-01_ses-1_acq-3T", "sub-01_ses-2_acq-3T"]


def test_unknown_field_strength_needs_a_filter(make_bids_dataset):
    ds = make_bids_dataset(field_strengths=(3.0, 7.0), write_field_strength=False)
    layout = load_layout(ds.root)
    runs = collect_dwi_runs(layout)
    assert [run.role for run in runs] == [None, None]
    with pytest.raises(BidsAppError, match="--bids-filter-file") as info:
        source_runs(runs)
    assert info.value.exit_code == 65
    # participant level: a "dwi" filter selecting the 3T runs makes them source runs
    runs = collect_dwi_runs(layout, filters={"dwi": {"acquisition": "3T"}})
    assert _stems(source_runs(runs)) == ["sub-01_acq-3T"]
    # group level: "source" and "target" queries name both
    runs = collect_dwi_runs(layout, filters={"source": {"acquisition": "3T"},
                                             "target": {"acquisition": "7T"}})
    assert [run.role for run in runs] == ["source", "target"]
    assert [(s.stem, t.stem) for s, t in pair_runs(runs)] == [("sub-01_acq-3T", "sub-01_acq-7T")]


# --------------------------------------------------------------------------- pairing
def test_pairs_match_sessions(shared_layout):
    pairs = pair_runs(collect_dwi_runs(shared_layout))
    assert [(s.stem, t.stem) for s, t in pairs] == [
        ("sub-01_ses-1_acq-3T", "sub-01_ses-1_acq-7T"),
        ("sub-01_ses-2_acq-3T", "sub-01_ses-2_acq-7T"),
        ("sub-02_ses-1_acq-3T", "sub-02_ses-1_acq-7T"),
        ("sub-02_ses-2_acq-3T", "sub-02_ses-2_acq-7T"),
    ]


def _run(subject, session, strength, **entities):
    ents = {"subject": subject, "session": session, **entities, "suffix": "dwi"}
    name = "_".join(f"{k}-{v}" for k, v in (("sub", subject), ("ses", session)) if v)
    return DWIRun(dwi=Path(f"/d/{name}_dwi.nii.gz"), bval=Path("/d/dwi.bval"),
                  bvec=Path("/d/dwi.bvec"), entities=ents, field_strength=strength,
                  role="source" if strength < 5 else "target")


def test_pairs_across_sessions_and_unpaired_participants():
    runs = [_run("01", "3T", 3.0), _run("01", "7T", 7.0),   # HCP-like: one session per scanner
            _run("02", "a", 3.0),                            # no 7T: not paired
            _run("03", "b", 7.0)]                            # no 3T: not paired
    pairs = pair_runs(runs)
    assert [(s.session, t.session) for s, t in pairs] == [("3T", "7T")]


def test_no_pairs_names_what_was_found():
    runs = [_run("02", "a", 3.0), _run("03", "b", 7.0)]
    with pytest.raises(BidsAppError) as info:
        pair_runs(runs)
    assert info.value.exit_code == 18
    message = str(info.value)
    assert "1 source" in message and "[02]" in message and "[03]" in message


def test_stem_and_hashable():
    run = _run("01", "2", 3.0, acquisition="x", run=3)
    assert run.stem == "sub-01_ses-2_acq-x_run-3"
    assert run.subject == "01" and run.session == "2"
    assert len({run, run}) == 1


# --------------------------------------------------------------------------- masks
def _write_qsiprep_like(root: Path) -> None:
    """A minimal derivatives dataset laid out like qsiprep's output."""
    (root / "sub-01" / "dwi").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({
        "Name": "qsiprep output", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "qsiprep", "Version": "1.0.0"}]}))
    folder = root / "sub-01" / "dwi"
    img = nib.Nifti1Image(np.ones((4, 4, 4, 3), np.float32), np.eye(4))
    for acq in ("", "_acq-b"):
        stem = folder / f"sub-01{acq}_space-T1w_desc-preproc_dwi"
        nib.save(img, f"{stem}.nii.gz")
        Path(f"{stem}.bval").write_text("0 1000 1000\n")
        Path(f"{stem}.bvec").write_text("0 1 0\n0 0 1\n0 0 0\n")
        Path(f"{stem}.json").write_text('{"MagneticFieldStrength": 3}')
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)),
                 folder / f"sub-01{acq}_space-T1w_desc-brain_mask.nii.gz")
    # a mask in another space must not be picked
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)),
             folder / "sub-01_space-MNI_desc-brain_mask.nii.gz")


def test_brain_mask_from_a_derivatives_dataset(tmp_path):
    _write_qsiprep_like(tmp_path / "qsiprep")
    runs = collect_dwi_runs(load_layout(tmp_path / "qsiprep"))
    assert [r.dwi.name for r in runs] == ["sub-01_acq-b_space-T1w_desc-preproc_dwi.nii.gz",
                                          "sub-01_space-T1w_desc-preproc_dwi.nii.gz"]
    assert [r.mask.name for r in runs] == ["sub-01_acq-b_space-T1w_desc-brain_mask.nii.gz",
                                           "sub-01_space-T1w_desc-brain_mask.nii.gz"]
    assert runs[1].bval.name == "sub-01_space-T1w_desc-preproc_dwi.bval"
    assert _stems(runs) == ["sub-01_acq-b", "sub-01"]  # space/desc are not part of the stem


# --------------------------------------------------------------------------- fixtures
def test_synthetic_dataset_has_the_documented_tensor(bids_dataset):
    """The factory's known answer: DTI recovers the principal direction in white matter."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    img = nib.load(bids_dataset.dwi_files[0])
    data = np.asarray(img.dataobj)
    assert data.shape == (12, 12, 10, 39)
    assert np.linalg.det(img.affine[:3, :3]) < 0  # FSL bvecs = voxel axes
    gtab = gradient_table(bids_dataset.bvals, bvecs=bids_dataset.bvecs, b0_threshold=50)
    fit = TensorModel(gtab).fit(data, mask=bids_dataset.wm_mask)
    evecs = fit.evecs[bids_dataset.wm_mask][:, :, 0]
    cosines = np.abs(evecs @ bids_dataset.principal_direction)
    assert cosines.min() > 0.9999
    assert np.allclose(fit.fa[bids_dataset.wm_mask], fit.fa[bids_dataset.wm_mask][0])
    assert 0.7 < fit.fa[bids_dataset.wm_mask][0] < 0.85
    assert np.all(data[~bids_dataset.brain_mask] == 0)


def test_small64d_comes_from_the_dipy_wheel(small64d_bids):
    import dipy
    from dipy.data import get_fnames

    dipy_dir = Path(dipy.__file__).resolve().parent
    for path in get_fnames(name="small_64D"):
        assert dipy_dir in Path(path).resolve().parents  # shipped file, nothing fetched
    root, dwi, bvals, bvecs = small64d_bids
    assert np.isnan(bvecs[0]).all() and bvals[0] == 0
    (run,) = collect_dwi_runs(load_layout(root))
    assert run.field_strength == 3.0 and run.dwi == dwi
    written = np.loadtxt(run.bvec)
    assert written.shape == (3, 65) and np.isnan(written[:, 0]).all()
    assert np.allclose(written[:, 1:].T, bvecs[1:], atol=1e-7)
    assert abs(np.linalg.det(nib.load(run.dwi).affine[:3, :3])) == pytest.approx(8.0)


def test_fixtures_pass_the_official_validator(shared_bids_dataset, small64d_bids, validator,
                                              tmp_path):
    assert validate_dataset(shared_bids_dataset.root, tmp_path) is True
    assert validate_dataset(small64d_bids[0], tmp_path) is True


# --------------------------------------------------------------------------- validator
def test_validator_skipped_or_missing(bids_dataset, tmp_path, monkeypatch, caplog):
    assert validate_dataset(bids_dataset.root, tmp_path, skip=True) is False
    monkeypatch.setattr(validate_module, "find_validator", lambda: None)
    with caplog.at_level("WARNING"):
        assert validate_dataset(bids_dataset.root, tmp_path) is False
    assert "not installed" in caplog.text


def test_error_summary_lists_the_first_codes():
    report = {"issues": {"issues": [
        {"code": "A", "severity": "error", "location": "/sub-01/x.nii.gz"},
        {"code": "A", "severity": "error", "location": "/sub-02/x.nii.gz"},
        {"code": "B", "severity": "error"},
        {"code": "W", "severity": "warning", "location": "/README"},
    ]}}
    assert summarise_errors(report) == (3, "A x2 (e.g. /sub-01/x.nii.gz); B x1")
