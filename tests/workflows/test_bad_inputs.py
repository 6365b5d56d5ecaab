"""Bad input through the command line: one clear reason per run, the other runs still processed,
nothing half-written, the input dataset untouched.

One dataset holds a good session and one session per kind of bad input (gradient files next to a
run override the inherited root-level ``dwi.bval``/``dwi.bvec``), so one participant-level call
exercises them all.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.cli.exitcodes import EX_CANTCREAT, EX_DATAERR, EX_FAILURE, EX_NOINPUT
from bids_dmri_ldm.cli.run import main

BAD_SESSIONS = ("emptybval", "mismatch", "threeD", "nob0", "corrupt", "unwritable")
# "othershells": b = 3000/4000 instead of 1000/2000, processed like any shells (identity covers them)
SESSIONS = ("good", "nan", "othershells") + BAD_SESSIONS
EXPECTED_REASON = {
    "emptybval": "is empty",
    "mismatch": "volumes but the gradient table has",
    "threeD": "must be a 4D image",
    "nob0": "no b0 volume",
    "corrupt": "corrupt or truncated",
    "unwritable": "cannot write",
}


def _run_files(root: Path, ses: str) -> tuple[Path, Path, Path]:
    stem = root / "sub-01" / f"ses-{ses}" / "dwi" / f"sub-01_ses-{ses}_dwi"
    return Path(f"{stem}.nii.gz"), Path(f"{stem}.bval"), Path(f"{stem}.bvec")


def _write_table(stem_bval: Path, stem_bvec: Path, bvals, bvecs) -> None:
    stem_bval.write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    stem_bvec.write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in np.asarray(bvecs).T) + "\n")


def _break_dataset(ds, out: Path) -> None:
    root, bvals, bvecs = ds.root, ds.bvals, ds.bvecs
    dwi, bval, bvec = _run_files(root, "emptybval")
    bval.write_text("")
    bvec.write_text((root / "dwi.bvec").read_text())
    dwi, bval, bvec = _run_files(root, "mismatch")
    _write_table(bval, bvec, bvals[:-1], bvecs[:-1])
    dwi, _, _ = _run_files(root, "threeD")
    img = nib.load(dwi)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine), dwi)
    dwi, bval, bvec = _run_files(root, "nob0")
    b0 = bvals <= 50
    new_vecs = bvecs.copy()
    new_vecs[b0] = [0.0, 0.0, 1.0]
    _write_table(bval, bvec, np.where(b0, 1000.0, bvals), new_vecs)
    dwi, bval, bvec = _run_files(root, "othershells")
    _write_table(bval, bvec, np.where(bvals > 50, bvals + 2000.0, bvals), bvecs)
    dwi, _, _ = _run_files(root, "nan")
    img = nib.load(dwi)
    data = np.asanyarray(img.dataobj).copy()
    data[6, 6, 5, 4] = np.nan
    data[5, 6, 5, :] = np.inf
    nib.save(nib.Nifti1Image(data, img.affine, img.header), dwi)
    dwi, _, _ = _run_files(root, "corrupt")
    raw = dwi.read_bytes()
    dwi.write_bytes(raw[: len(raw) // 2])  # truncated: the header reads, the data do not
    with gzip.open(dwi) as handle:  # the header is still readable (so the failure is in the data)
        assert len(handle.read(348)) == 348
    blocked = out / "sub-01" / "ses-unwritable" / "dwi"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the output folder should be")


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_bad_run_reported_others_processed(make_bids_dataset, tmp_path, capsys):
    ds = make_bids_dataset(sessions=SESSIONS)
    out, work = tmp_path / "out", tmp_path / "work"
    _break_dataset(ds, out)
    before = _digest(ds.root)
    # MultiProc: a failing node must not stop the other runs' nodes.
    rc = main([str(ds.root), str(out), "participant", "-w", str(work), "--skip-bids-validation", "--nprocs", "2",
               "--method", "identity", "--output-resolution", "native"])
    assert rc in (EX_FAILURE, EX_DATAERR)
    err = capsys.readouterr().err
    assert f"{len(BAD_SESSIONS)} of {len(SESSIONS)} run(s) failed" in err
    assert "Traceback" not in err

    summary = max((out / "logs").glob("participant_*.tsv"), key=lambda p: p.stat().st_mtime_ns).read_text().splitlines()
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in summary[1:]}
    assert rows["sub-01_ses-good"][0] == rows["sub-01_ses-nan"][0] == rows["sub-01_ses-othershells"][0] == "done"
    for ses, fragment in EXPECTED_REASON.items():
        status, reason = rows[f"sub-01_ses-{ses}"]
        assert status.startswith("failed"), (ses, status)
        assert fragment in reason, (ses, reason)
        # Nothing half-written for a failed run.
        folder = out / "sub-01" / f"ses-{ses}" / "dwi"
        assert not folder.is_dir() or not any(folder.iterdir()), ses
    assert (out / "logs" / "sub-01_ses-corrupt_dwi_error.log").is_file()
    assert not list(out.rglob(".*.tmp*")), "temporary files left behind"

    # NaN/Inf voxels: out of the brain mask (lambda = 1), their values read as 0, the output finite
    # there and the warning recorded in the sidecar.
    folder = out / "sub-01" / "ses-nan" / "dwi"
    data = np.asanyarray(nib.load(folder / "sub-01_ses-nan_desc-7Tlike_dwi.nii.gz").dataobj)
    mask = np.asanyarray(nib.load(folder / "sub-01_ses-nan_desc-brain_mask.nii.gz").dataobj)
    assert np.all(np.isfinite(data)) and np.all(data[6, 6, 5] >= 0)
    assert mask[6, 6, 5] == 0 and mask[5, 6, 5] == 0
    sidecar = json.loads((folder / "sub-01_ses-nan_desc-7Tlike_dwi.json").read_text())
    assert any("NaN/Inf" in w for w in sidecar["RunWarnings"])
    assert _digest(ds.root) == before, "the input dataset was modified"


def test_missing_bval_rejected_other_run_processed(make_bids_dataset, tmp_path, capsys):
    ds = make_bids_dataset(sessions=("1", "2"), inherit_gradients=False)
    _, bval, _ = _run_files(ds.root, "2")
    bval.unlink()
    out = tmp_path / "out"
    rc = main([str(ds.root), str(out), "participant", "-w", str(tmp_path / "work"), "--skip-bids-validation",
               "--nprocs", "1", "--method", "identity", "--output-resolution", "native"])
    assert rc in (EX_FAILURE, EX_DATAERR)
    assert "no .bval file found" in capsys.readouterr().err
    assert (out / "sub-01" / "ses-1" / "dwi" / "sub-01_ses-1_desc-7Tlike_dwi.json").is_file()
    assert not (out / "sub-01" / "ses-2").exists()


def test_output_dir_not_writable(bids_dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc = main([str(bids_dataset.root), str(blocker / "out"), "participant", "-w", str(tmp_path / "work"),
               "--skip-bids-validation", "--method", "identity"])
    assert rc == EX_CANTCREAT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot" in err[0]


def test_corrupt_model_refused_before_work(bids_dataset, tmp_path, capsys):
    from bids_dmri_ldm.methods import RishGlobalModel, save_rish_global_model

    model_dir = tmp_path / "models" / "rish-global"
    model_file = save_rish_global_model(RishGlobalModel(factors=(1.0, 0.9, 0.8)), model_dir)
    doc = json.loads(model_file.read_text())
    doc["factors"][0] = 2.0
    model_file.write_text(json.dumps(doc))
    out = tmp_path / "out"
    rc = main([str(bids_dataset.root), str(out), "participant", "-w", str(tmp_path / "work"),
               "--skip-bids-validation", "--method", "rish-global", "--model-dir", str(model_dir)])
    assert rc == EX_FAILURE
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "unexpected" not in err
    assert not (out / "sub-01").exists()
    (tmp_path / "empty").mkdir()
    rc = main([str(bids_dataset.root), str(out), "participant", "-w", str(tmp_path / "work"),
               "--skip-bids-validation", "--method", "rish-global", "--model-dir", str(tmp_path / "empty")])
    assert rc == EX_NOINPUT
    assert "no rish-global model" in capsys.readouterr().err


@pytest.mark.parametrize("method, message", [("ldm", "no ldm model bundle")])
def test_unavailable_method(bids_dataset, tmp_path, capsys, method, message):
    (tmp_path / "empty").mkdir()
    rc = main([str(bids_dataset.root), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work"),
               "--skip-bids-validation", "--method", method, "--model-dir", str(tmp_path / "empty")])
    assert rc == EX_NOINPUT
    err = capsys.readouterr().err
    assert message in err and "unexpected" not in err
