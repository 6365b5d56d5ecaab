"""The reports hooked into the participant level: a run writes ``sub-<label>.html`` (with the
run's warnings from its sidecar), ``--reports-only`` rebuilds it from the derivatives alone, and
the participant exit status names the kind of failure."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.cli.exitcodes import EX_CANTCREAT, EX_DATAERR, EX_FAILURE, EX_NOINPUT
from bids_dmri_ldm.cli.run import failure_exit_code, main

from .conftest import decode_png, parse_report


def _add_nan_voxel(dwi_path):
    img = nib.load(dwi_path)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    centre = tuple(s // 2 for s in data.shape[:3])
    data[centre + (5,)] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine, img.header), dwi_path)


def _args(bids, out, work, *extra):
    return [str(bids), str(out), "participant", "-w", str(work), "--skip-bids-validation",
            "--method", "identity", "--nprocs", "1", *extra]


def test_participant_run_writes_report_and_reports_only_rebuilds_it(make_bids_dataset, tmp_path):
    bids = make_bids_dataset()  # b0s, b=1000 and six b=2000 volumes (carried: too few directions)
    dwi_path = next(bids.root.rglob("*_dwi.nii.gz"))
    _add_nan_voxel(dwi_path)
    out, work = tmp_path / "out", tmp_path / "work"

    assert main(_args(bids.root, out, work)) == 0
    report = out / "sub-01.html"
    assert report.is_file()
    parsed = parse_report(report)
    assert len(parsed.images) >= 4  # RISH, scale, mask mosaics (FA of a NaN input: see the report)
    sizes = [decode_png(src).size for src in parsed.images]  # every <img> is a decodable PNG
    assert all(w > 10 and h > 10 for w, h in sizes)

    sidecar = json.loads(next(out.rglob("*_desc-7Tlike_dwi.json")).read_text())
    warnings = sidecar["RunWarnings"]
    assert any("the b=2000 shell (6 volumes) is carried through unchanged" in w for w in warnings), warnings
    nan_warning = "1 voxel(s) with NaN/Inf values are set to 0 and left out of the brain mask"
    assert any(nan_warning in w for w in warnings), warnings
    text = report.read_text(encoding="utf-8")
    assert "carried through unchanged" in text and "NaN/Inf" in text  # shown in the report

    dwi_out = next(out.rglob("*_desc-7Tlike_dwi.nii.gz"))
    before = dwi_out.stat().st_mtime_ns
    report.unlink()
    assert main(_args(bids.root, out, work, "--reports-only")) == 0
    assert report.is_file() and len(parse_report(report).images) == len(parsed.images)
    assert dwi_out.stat().st_mtime_ns == before  # nothing recomputed


def test_reports_only_without_derivatives_is_66(bids_dataset, tmp_path, capsys):
    rc = main(_args(bids_dataset.root, tmp_path / "out", tmp_path / "work", "--reports-only"))
    assert rc == EX_NOINPUT
    assert "no derivatives to report on" in capsys.readouterr().err


def test_report_failure_never_fails_the_run(bids_dataset, tmp_path, monkeypatch):
    from bids_dmri_ldm import reports

    def broken(*args, **kwargs):
        raise RuntimeError("figure backend exploded")

    monkeypatch.setattr(reports, "build_participant_report", broken)
    out = tmp_path / "out"
    assert main(_args(bids_dataset.root, out, tmp_path / "work")) == 0
    assert next(out.rglob("*_desc-7Tlike_dwi.nii.gz")).is_file()
    assert not (out / "sub-01.html").exists()
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "participant report could not be written" in logs and "figure backend exploded" in logs


@pytest.mark.parametrize("statuses, code", [
    (["failed (bad-data): no b0", "failed (bad-data): corrupt"], EX_DATAERR),
    (["failed (cannot-write): read-only"], EX_CANTCREAT),
    (["failed (bad-data): no b0", "failed (cannot-write): read-only"], EX_FAILURE),
    (["failed: RuntimeError: boom"], EX_FAILURE),
])
def test_failure_exit_code(statuses, code):
    assert failure_exit_code(statuses) == code


def test_bad_data_only_exits_65(bids_dataset, tmp_path):
    next(bids_dataset.root.rglob("*dwi.bval")).write_text("")  # the run's (inherited) bval: empty
    rc = main(_args(bids_dataset.root, tmp_path / "out", tmp_path / "work"))
    assert rc == EX_DATAERR


def test_nipype_lines_logged_once(capsys):
    """With -vv a nipype record reaches the terminal once (not also through nipype's own
    stdout handler)."""
    import logging

    from nipype import logging as nipype_logging

    from bids_dmri_ldm.cli.run import setup_logging

    root = logging.getLogger()
    try:
        setup_logging(2)
        nipype_logging.getLogger("nipype.workflow").setLevel(logging.INFO)
        nipype_logging.getLogger("nipype.workflow").info("node line 7f3a")
        captured = capsys.readouterr()
        assert (captured.out + captured.err).count("node line 7f3a") == 1
        # nipype's own stdout handler (created at import, so capsys may not see it) is gone
        assert not [h for h in logging.getLogger("nipype").handlers if type(h) is logging.StreamHandler]
    finally:
        for handler in [h for h in root.handlers if getattr(h, "_bids_dmri_ldm", False)]:
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
