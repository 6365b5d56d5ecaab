"""Participant report rendered from small synthetic derivatives in tmp_path."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.reports import build_participant_report, participant
from bids_dmri_ldm.reports.html import report_section
from bids_dmri_ldm.reports.participant import (
    find_derivative,
    find_gradient_file,
    load_run,
    regenerate_reports,
    summary_numbers,
)

from .conftest import decode_png, parse_report
from .synthetic import ORDERS, WM_LAMBDA

RUN_PARTS = ("RISH L0", "RISH L2", "RISH L4", "FA and colour FA", "Brain mask",
             "Uncertainty", "Summary numbers", "Settings and provenance", "Warnings")


def _titles(parsed):
    return [text for tag, text in parsed.headings if tag == "h3"]


def _assert_self_contained(path):
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"https?://", text), "report references an external URL"
    parsed = parse_report(path)
    for src in parsed.images:
        decode_png(src)
    return parsed


def test_report_has_every_section_and_decodable_images(dataset):
    path = build_participant_report(dataset["out"], "sub-01")
    assert path == dataset["out"] / "sub-01.html"
    parsed = _assert_self_contained(path)
    assert ("h2", "sub-01_res-2") in parsed.headings
    titles = _titles(parsed)
    for part in RUN_PARTS:
        assert any(t.startswith(part) for t in titles), (part, titles)
    assert parsed.errors == []
    # 3 RISH mosaics, FA, mask, uncertainty
    assert len(parsed.images) == 6
    sizes = [decode_png(src).size for src in parsed.images]
    assert all(w > 600 and h > 100 for w, h in sizes)
    text = path.read_text(encoding="utf-8")
    assert "sha256:0123abcd" in text and "ddim_steps" in text  # provenance table
    assert "12 voxels with NaN/Inf were set to 0" in text  # warnings of the run


def test_summary_numbers_have_the_known_medians(dataset):
    run = load_run(dataset["dwi"])
    assert run.problems == {}
    rows = dict(summary_numbers(run.scale, run.mask, run.fa_in, ORDERS))
    for order in ORDERS:
        # WM-like voxels (FA > 0.4) are the synthetic white-matter core, lambda = WM_LAMBDA there
        assert rows[f"median λ{order} in WM-like voxels"] == pytest.approx(WM_LAMBDA[order], abs=1e-6)
        assert rows[f"median λ{order} in brain"] == pytest.approx(1.0)  # the core is < half the brain
    assert rows["brain voxels"] == int(dataset["mask"].sum())


def test_fa_and_directions_of_input_and_output(dataset):
    run = load_run(dataset["dwi"])
    wm, mask = dataset["wm"], dataset["mask"]
    # data are LAS on disk; the report works in the closest canonical (RAS) orientation
    wm_ras, mask_ras = wm[::-1], mask[::-1]
    fitted = np.isfinite(run.fa_out) & np.isfinite(run.fa_in)
    core = fitted & wm_ras
    gm = fitted & mask_ras & ~wm_ras
    from scipy import ndimage

    inner = ndimage.binary_erosion(wm_ras, iterations=2) & core  # away from the coarse input's edges
    assert inner.sum() > 50
    # prolate tensor 1.7/0.3 um^2/ms (FA 0.80) in, 1.7/0.25 out (FA 0.84); isotropic grey matter
    assert np.median(run.fa_in[inner]) == pytest.approx(0.80, abs=0.02)
    assert np.median(run.fa_out[inner]) == pytest.approx(0.84, abs=0.02)
    assert np.median(run.fa_out[gm]) < 0.05
    # principal direction: voxel x in the left half, y in the right half
    x_world = nib.affines.apply_affine(nib.as_closest_canonical(nib.load(dataset["dwi"])).affine,
                                       np.argwhere(inner))[:, 0]
    evec = run.evec_out[inner]
    assert np.all(np.abs(evec[x_world < -1][:, 0]) > 0.99)
    assert np.all(np.abs(evec[x_world > 1][:, 1]) > 0.99)
    np.testing.assert_allclose(np.abs(run.evec_in[inner & (run.fa_in > 0.5)]).max(axis=1), 1, atol=0.01)


def test_failing_figure_is_replaced_by_its_error_and_logged(dataset, caplog):
    # a scale map on the wrong grid: the RISH mosaics fail, everything else renders
    bad = dataset["names"]["scale"]
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5, 3), np.float32), np.eye(4)), bad)
    with caplog.at_level(logging.WARNING, logger="bids_dmri_ldm.reports"):
        path = build_participant_report(dataset["out"], "01")
    parsed = _assert_self_contained(path)
    titles = _titles(parsed)
    for part in RUN_PARTS:
        assert any(t.startswith(part) for t in titles)
    # 3 RISH sections + the summary (needs lambda) show the error; FA, mask, uncertainty render
    assert len(parsed.errors) == 4
    assert all("scale" in e and "(5, 5, 5)" in e for e in parsed.errors)
    assert len(parsed.images) == 3
    assert "cannot load scale" in caplog.text
    assert "could not be made" in caplog.text


def test_missing_optional_map_and_missing_source(dataset, caplog):
    dataset["names"]["uncertainty"].unlink()
    dataset["source"].unlink()
    path = build_participant_report(dataset["out"], "01")
    parsed = _assert_self_contained(path)
    titles = _titles(parsed)
    assert not any(t.startswith("Uncertainty") for t in titles)  # optional: no section, no error
    # without the 3T source there is no input FA: that section says why, the rest renders
    assert len(parsed.errors) == 1 and "source DWI" in parsed.errors[0]
    assert len(parsed.images) == 4
    text = path.read_text(encoding="utf-8")
    assert "WM-like" not in text.split("Summary numbers")[1].split("</table>")[0]


def test_report_section_wrapper_turns_exceptions_into_messages(caplog):
    def broken():
        raise ZeroDivisionError("odd volume")

    with caplog.at_level(logging.WARNING, logger="bids_dmri_ldm.reports"):
        section = report_section("Broken part", broken)
    assert section.error == "ZeroDivisionError: odd volume"
    assert "odd volume" in section.render() and "Broken part" in section.render()
    assert "Broken part" in caplog.text
    ok = report_section("Fine part", lambda: ["<p>x</p>"])
    assert ok.error is None and ok.render().endswith("<p>x</p>")


def test_corrupt_derivative_never_raises(dataset):
    dataset["dwi"].write_bytes(b"not a nifti")
    path = build_participant_report(dataset["out"], "01")
    parsed = _assert_self_contained(path)
    assert any("FA" in e or "7Tlike" in e for e in parsed.errors)
    assert len(parsed.images) == 4  # RISH x3 and uncertainty still render


def test_regenerate_reports_for_listed_and_all_subjects(dataset, monkeypatch):
    assert regenerate_reports(dataset["out"], ["sub-01"]) == [dataset["out"] / "sub-01.html"]
    assert (dataset["out"] / "sub-01.html").stat().st_size > 10_000
    assert not list(dataset["out"].glob(".sub-01.html.*"))  # no temp file left behind
    # without labels: every sub-* folder of the derivatives
    (dataset["out"] / "sub-02").mkdir()
    called = []
    monkeypatch.setattr(participant, "build_participant_report",
                        lambda out, label: called.append(label) or out / f"{label}.html")
    paths = regenerate_reports(dataset["out"])
    assert called == ["sub-01", "sub-02"]
    assert paths == [dataset["out"] / "sub-01.html", dataset["out"] / "sub-02.html"]


def test_eigenvector_components_follow_axis_permutations():
    # voxel axis 0 points along world y, axis 1 along world -x: the colour of a fibre along
    # voxel axis 0 must be green (anterior-posterior), along voxel axis 1 red
    affine = np.array([[0, -2.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    ornt = nib.orientations.io_orientation(affine)
    evec = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]])
    np.testing.assert_array_equal(participant._canonical_vectors(evec, ornt),
                                  [[0, 1, 0], [1, 0, 0], [0, 0, 1]])


def test_warnings_of_the_run_are_read_from_the_logs(dataset):
    logs = dataset["out"] / "logs"
    logs.mkdir()
    (logs / "bids-dmri-ldm_participant_20260101-000000_1.log").write_text(
        "10:00:00 INFO    bids_dmri_ldm: sub-01: done\n"
        "10:00:01 WARNING bids_dmri_ldm.interfaces: sub-01_dwi.nii.gz: 7 voxel(s) with NaN/Inf "
        "values are masked out\n"
        "10:00:02 WARNING bids_dmri_ldm: sub-02_dwi.nii.gz: another participant\n")
    run = load_run(dataset["dwi"])
    assert "sub-01_dwi.nii.gz: 7 voxel(s) with NaN/Inf values are masked out" in run.warnings
    assert not any("sub-02" in w for w in run.warnings)
    text = build_participant_report(dataset["out"], "01").read_text(encoding="utf-8")
    assert "7 voxel(s) with NaN/Inf" in text


def test_tensor_fit_survives_non_finite_voxels():
    """A NaN or inf value in a raw scan gives finite FA/directions and leaves the other voxels exact."""
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((30, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvals = np.r_[0.0, np.full(30, 1000.0)]
    bvecs = np.vstack([np.zeros(3), dirs])
    evals = np.array([1.7e-3, 0.3e-3, 0.3e-3])  # prolate along x: FA 0.80
    adc = (dirs ** 2) @ evals
    good = np.r_[1.0, np.exp(-1000.0 * adc)]
    signals = np.vstack([good, good, good])
    signals[1, 5] = np.nan
    signals[2, 7] = np.inf
    fa, evec = participant.fit_tensor_at(signals, bvals, bvecs)
    assert np.all(np.isfinite(fa)) and np.all(np.isfinite(evec))
    expected = np.sqrt(0.5) * np.linalg.norm(evals - evals.mean()) / np.sqrt((evals ** 2).sum()) * np.sqrt(3)
    assert fa[0] == pytest.approx(expected, abs=1e-3) and abs(evec[0, 0]) == pytest.approx(1.0, abs=1e-3)


def test_report_uses_the_rebuilds_samples_of_that_exact_file(dataset, tmp_path, caplog):
    """What the rebuild records while writing the 7T-like DWI (ReportSamples) gives the report
    the same output FA and mean b0 as reading the file back; samples of another file are ignored."""
    from bids_dmri_ldm.interfaces.steps import ReportSamples

    dwi = Path(dataset["dwi"])
    img = nib.load(dwi)
    mask = np.asanyarray(nib.load(find_derivative(dwi, "mask")).dataobj) > 0
    b0 = np.flatnonzero(np.loadtxt(find_derivative(dwi, "bval")) < 50)
    samples = ReportSamples(mask, img.affine, b0, img.shape[3])
    volumes = (np.asarray(img.dataobj[..., t], dtype=np.float32) for t in range(img.shape[3]))
    for _ in samples.observe(volumes):
        pass
    recorded = samples.save(tmp_path / "report_samples.npz", dwi)
    read = load_run(dwi)
    with caplog.at_level(logging.DEBUG, logger="bids_dmri_ldm.reports"):
        reused = load_run(dwi, extra={"sample_files": [recorded]})
    assert "output signal from the rebuild's samples" in caplog.text
    caplog.clear()
    assert reused.problems == read.problems == {}
    np.testing.assert_allclose(reused.fa_out, read.fa_out, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(reused.mean_b0, read.mean_b0, rtol=1e-6)
    assert np.isfinite(reused.fa_out).sum() > 100
    other = tmp_path / "other.nii.gz"
    other.write_bytes(dwi.read_bytes()[:-8] + b"\0" * 8)  # another file (its gzip trailer differs)
    stale = samples.save(tmp_path / "stale.npz", other)
    with np.load(stale) as z:
        assert z["dwi_tail"].tobytes() != dwi.read_bytes()[-8:]
    with caplog.at_level(logging.DEBUG, logger="bids_dmri_ldm.reports"):
        fallback = load_run(dwi, extra={"sample_files": [stale]})
    assert "rebuild's samples" not in caplog.text
    np.testing.assert_allclose(fallback.fa_out, read.fa_out, atol=1e-5, equal_nan=True)


def test_report_reads_the_source_signal_from_the_load_steps_copy(dataset, tmp_path, caplog):
    """A load step's uncompressed copy of the source volumes (write_source_copy_record) gives the
    report the same input FA as inflating the source; a copy of a source changed since, or one
    without the volumes needed, is ignored."""
    import os

    from bids_dmri_ldm.interfaces.steps.inputs import write_source_copy_record

    dwi, source = Path(dataset["dwi"]), Path(dataset["source"])
    src = nib.load(source)
    values = np.asarray(src.dataobj, dtype=np.float32)
    keep = list(range(src.shape[3]))
    copy = tmp_path / "dwi_read.nii"
    nib.save(nib.Nifti1Image(values, src.affine), copy)
    record = write_source_copy_record(tmp_path / "source_copy.json", source, copy, keep)
    read = load_run(dwi)
    with caplog.at_level(logging.DEBUG, logger="bids_dmri_ldm.reports"):
        reused = load_run(dwi, extra={"source_copies": [record]})
    assert "source signal of" in caplog.text
    assert reused.problems == read.problems == {}
    assert np.isfinite(reused.fa_in).sum() > 100
    np.testing.assert_allclose(reused.fa_in, read.fa_in, atol=1e-5, equal_nan=True)
    anisotropic = np.nan_to_num(read.fa_in) > 0.2  # elsewhere the direction is ill-defined
    assert anisotropic.sum() > 10
    np.testing.assert_allclose(np.abs(reused.evec_in[anisotropic]), np.abs(read.evec_in[anisotropic]), atol=1e-4)

    partial = tmp_path / "partial.nii"  # the first b0, which the report fits, is not in this copy
    assert np.loadtxt(find_gradient_file(source, ".bval"))[0] < 50
    nib.save(nib.Nifti1Image(values[..., 1:], src.affine), partial)
    without = write_source_copy_record(tmp_path / "partial.json", source, partial, keep[1:])

    def ignored(stale):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="bids_dmri_ldm.reports"):
            fallback = load_run(dwi, extra={"source_copies": [stale]})
        np.testing.assert_allclose(fallback.fa_in, read.fa_in, atol=1e-5, equal_nan=True)
        return "source signal of" not in caplog.text

    assert ignored(without)
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the source changed since
    assert ignored(record)
