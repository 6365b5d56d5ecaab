"""Hostile input and hostile conditions: what issue 12 found, kept from coming back.

Measured on the main branch before the fixes (issue 12): two runs over the same participants
sharing the default work dir deleted each other's finished outputs; a worker killed with
``kill -9`` hung the run; ``--output-resolution`` accepted any value; models were applied to data
they were not trained for; complex input, a ``sessions`` column in ``participants.tsv``, a
symlink loop, one file with an invalid label, an all-zero affine, ``MagneticFieldStrength: "3T"``
and ×1000 b-values crashed, passed silently or were blamed on the wrong file. Every test here
failed there. It also keeps what held: the input is never modified, no half-written file, reruns
complete, no unpickling or ``eval``.

Speed: tiny simulated datasets (tests/conftest.py), ``--method identity``/``rish-global``; the
process-level tests (concurrency, a killed worker, Ctrl-C) run the command in subprocesses with
generous timeouts that only guard against hangs (nothing here depends on how fast it runs).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.cli.exitcodes import (
    EX_CANTCREAT,
    EX_DATAERR,
    EX_FAILURE,
    EX_TEMPFAIL,
)
from bids_dmri_ldm.cli.run import main

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 300  # only stops a hung test; no assertion depends on time


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _summary(out: Path) -> dict[str, tuple[str, str]]:
    """Rows of the newest participant summary TSV: ``{run: (status, reason)}``."""
    latest = max((out / "logs").glob("participant_*.tsv"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    rows = [line.split("\t") for line in latest.read_text().splitlines()[1:]]
    return {row[0]: (row[1], row[2]) for row in rows}


def _main(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in this process, with its stderr (log records included) captured."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _argv(root: Path, out: Path, work: Path, *extra: str) -> list[str]:
    return [str(root), str(out), "participant", "-w", str(work), "--skip-bids-validation", "--nprocs", "1",
            "--method", "identity", "--output-resolution", "native", *extra]


def _complete(out: Path, stem: str, ses: str | None = None) -> bool:
    from bids_dmri_ldm.bidsio import derivatives as deriv

    folder = out / stem.split("_")[0] / (f"ses-{ses}" if ses else "") / "dwi"
    dwi = folder / f"{stem}_desc-7Tlike_dwi.nii.gz"
    if not dwi.is_file():
        return False
    outputs = deriv.run_outputs(out, dwi.name.replace("_desc-7Tlike", ""))
    return deriv.is_complete(outputs) and np.isfinite(np.asanyarray(nib.load(dwi).dataobj)).all()


# ============================================================================ one hostile dataset
# One participant, one session per hostile run (gradients inherited from the dataset root unless
# a session overrides them), a stray file with an invalid label, a directory symlink loop, and a
# participants.tsv with a "sessions" column as the simulator writes it. One participant-level call
# (every session named with --session-label) exercises them all.
HOSTILE_SESSIONS = ("good", "complex", "zeroaffine", "strength", "bx1000")


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    from conftest import write_bids_dataset

    base = tmp_path_factory.mktemp("hostile")
    ds = write_bids_dataset(base / "bids", sessions=HOSTILE_SESSIONS)
    root = ds.root

    def run_files(ses):
        stem = root / "sub-01" / f"ses-{ses}" / "dwi" / f"sub-01_ses-{ses}_dwi"
        return Path(f"{stem}.nii.gz"), Path(f"{stem}.json"), Path(f"{stem}.bval"), Path(f"{stem}.bvec")

    dwi, *_ = run_files("complex")
    img = nib.load(dwi)
    data = np.asanyarray(img.dataobj)
    nib.save(nib.Nifti1Image((data + 1j * data).astype(np.complex64), img.affine), dwi)
    dwi, *_ = run_files("zeroaffine")
    img = nib.load(dwi)
    zero = nib.Nifti1Image(np.asanyarray(img.dataobj), None, img.header.copy())
    for row in ("srow_x", "srow_y", "srow_z"):
        zero.header[row][:] = 0
    zero.header["sform_code"], zero.header["qform_code"] = 1, 0
    nib.save(zero, dwi)
    assert not nib.load(dwi).affine[:3].any()
    _, sidecar, _, _ = run_files("strength")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(dict(meta, MagneticFieldStrength="3T")))
    _, _, bval, bvec = run_files("bx1000")
    bval.write_text(" ".join(f"{b * 1000:g}" for b in ds.bvals) + "\n")
    bvec.write_text((root / "dwi.bvec").read_text())
    good_dwi, good_json, _, _ = run_files("good")
    stray = good_dwi.with_name("sub-01_ses-good_acq-é_dwi.nii.gz")
    shutil.copy(good_dwi, stray)
    shutil.copy(good_json, stray.with_name("sub-01_ses-good_acq-é_dwi.json"))
    (good_dwi.parent / "loop").symlink_to("..", target_is_directory=True)
    (root / "participants.tsv").write_text("participant_id\tage\tsessions\nsub-01\tn/a\t"
                                           + ",".join(HOSTILE_SESSIONS) + "\n")
    (root / "participants.json").write_text(json.dumps({
        "age": {"Description": "age", "Units": "year"},
        "sessions": {"Description": "sessions of this participant"}}))

    before = _digest(root)
    out, work = base / "out", base / "work"
    code, err = _main(_argv(root, out, work, "--session-label", *HOSTILE_SESSIONS))
    return {"root": root, "out": out, "work": work, "code": code, "err": err, "before": before}


def test_hostile_runs_are_refused_one_by_one_with_exit_65(hostile_run):
    """Every hostile run is refused as bad data (65), the good one is done, and the whole call
    ends with one error line (no traceback, no "unexpected")."""
    assert hostile_run["code"] == EX_DATAERR, hostile_run["err"][-3000:]
    rows = _summary(hostile_run["out"])
    assert rows["sub-01_ses-good"][0] == "done"
    refused = {k: v for k, v in rows.items() if k != "sub-01_ses-good"}
    assert set(refused) == {"sub-01_ses-complex", "sub-01_ses-zeroaffine", "sub-01_ses-strength",
                            "sub-01_ses-bx1000", "sub-01_ses-good_acq-é"}
    assert all(status == "failed (bad-data)" for status, _ in refused.values()), refused
    err = hostile_run["err"]
    errors = [line for line in err.splitlines() if line.startswith("bids-dmri-ldm: error:")]
    assert len(errors) == 1 and "5 of 6 run(s) failed" in errors[0]
    assert "Traceback" not in err and "unexpected" not in err
    assert _complete(hostile_run["out"], "sub-01_ses-good", "good")


def test_complex_input_is_refused(hostile_run):
    reason = _summary(hostile_run["out"])["sub-01_ses-complex"][1]
    assert "complex" in reason and "magnitude" in reason
    assert not (hostile_run["out"] / "sub-01" / "ses-complex").exists()


def test_all_zero_affine_is_bad_data_in_one_line_without_numpy_warnings(hostile_run):
    reason = _summary(hostile_run["out"])["sub-01_ses-zeroaffine"][1]
    assert "affine" in reason and "all zeros" in reason
    assert "RuntimeWarning" not in hostile_run["err"] and "invalid value encountered" not in hostile_run["err"]


def test_field_strength_string_is_bad_data_and_in_the_summary(hostile_run):
    status, reason = _summary(hostile_run["out"])["sub-01_ses-strength"]
    assert status == "failed (bad-data)" and "'3T'" in reason and "number" in reason


def test_bvalues_times_1000_are_blamed_on_the_bval_file(hostile_run):
    reason = _summary(hostile_run["out"])["sub-01_ses-bx1000"][1]
    assert ".bval" in reason and "scaled" in reason and "bvec" not in reason


def test_a_stray_file_with_an_invalid_label_is_refused_alone(hostile_run):
    reason = _summary(hostile_run["out"])["sub-01_ses-good_acq-é"][1]
    assert "'é'" in reason and "acq-" in reason


def test_a_symlink_loop_gives_each_real_run_once(hostile_run):
    """The loop makes pybids see every file again under ever longer paths; each is used once."""
    assert "lead to files already found" in hostile_run["err"]
    assert "Duplicate node name" not in hostile_run["err"]
    assert not list((hostile_run["out"] / "sub-01").rglob("loop"))


def test_session_label_with_a_sessions_column_in_participants_tsv(hostile_run):
    """pybids returns the column's description as a session; every real session is found."""
    from bids_dmri_ldm.bidsio.layout import collect_dwi_runs, load_layout

    layout = load_layout(hostile_run["root"])
    runs = collect_dwi_runs(layout, session_labels=["good", "bx1000"], rejected={})
    assert sorted(run.session for run in runs) == ["bx1000", "good"]
    from bids_dmri_ldm.cli.exitcodes import MissingInputError

    with pytest.raises(MissingInputError, match="session label"):
        collect_dwi_runs(layout, session_labels=["nope"], rejected={})


def test_every_refused_run_has_an_error_log(hostile_run):
    logs = hostile_run["out"] / "logs"
    for name in ("sub-01_ses-complex_dwi", "sub-01_ses-zeroaffine_dwi", "sub-01_ses-strength_dwi",
                 "sub-01_ses-bx1000_dwi", "sub-01_ses-good_acq-é_dwi"):
        text = (logs / f"{name}_error.log").read_text()
        assert text.splitlines()[1].startswith("reason: "), name
    assert not (logs / "sub-01_ses-good_dwi_error.log").exists()


def test_the_input_dataset_is_untouched_and_nothing_half_written(hostile_run):
    assert _digest(hostile_run["root"]) == hostile_run["before"]
    assert not list(hostile_run["out"].rglob(".*.tmp*"))
    for image in hostile_run["out"].rglob("*.nii.gz"):
        assert np.isfinite(np.asanyarray(nib.load(image).dataobj)).all(), image


# ============================================================================ messages
def test_long_validator_locations_are_shortened():
    """A symlink loop made the validator's summary a 660-character line."""
    from bids_dmri_ldm.bidsio.validate import summarise_errors

    deep = "/sub-01/dwi" + "/loop/dwi" * 60
    report = {"issues": {"issues": [{"severity": "error", "code": "SYMLINK_CYCLE", "location": deep},
                                    {"severity": "error", "code": "NOT_INCLUDED", "location": "/sub-01/dwi/loop/"}]}}
    count, line = summarise_errors(report)
    assert count == 2 and "SYMLINK_CYCLE x1" in line and "…" in line
    assert len(line) < 160


@pytest.mark.parametrize("bvals, fragment", [
    ([0, 5000, 1e6, 1e6], "scaled (by 1000)"),
    ([0, 0.005, 1, 2], "ms/µm²"),
])
def test_bvalues_in_the_wrong_unit_are_named(bvals, fragment):
    from bids_dmri_ldm.core.gradients import GradientError, check_gradients

    bvecs = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    with pytest.raises(GradientError, match=re.escape(fragment)):
        check_gradients(np.array(bvals, float), bvecs, 4)


def test_a_zero_bvec_names_the_volume_and_its_bvalue():
    from bids_dmri_ldm.core.gradients import GradientError, check_gradients

    bvecs = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    with pytest.raises(GradientError, match=r"volume 1, b=1000"):
        check_gradients(np.array([0, 1000, 1000, 1000.0]), bvecs, 4)


def test_no_usable_temp_dir_is_73_before_any_work(bids_dataset, tmp_path, monkeypatch):
    """docker run --read-only without --tmpfs /tmp: say what to mount, exit 73, write nothing."""
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [str(tmp_path / "no" / "such" / "dir")])
    out = tmp_path / "out"
    code, err = _main(_argv(bids_dataset.root, out, tmp_path / "work"))
    assert code == EX_CANTCREAT
    assert "--tmpfs /tmp" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "work").exists()


def test_cuda_on_the_cpu_image_names_the_cuda_image(monkeypatch):
    import torch

    from bids_dmri_ldm.ml import device

    monkeypatch.setenv(device.IMAGE_VARIANT_ENV, "cpu")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(device.DeviceUnavailableError) as err:
        device.resolve_device("cuda")
    assert "CUDA image" in str(err.value) and "pass the GPU to the container" not in str(err.value)
    monkeypatch.delenv(device.IMAGE_VARIANT_ENV)
    with pytest.raises(device.DeviceUnavailableError, match="pass the GPU to the container"):
        device.resolve_device("cuda")


def test_the_image_records_its_torch_variant():
    text = (REPO / "Dockerfile").read_text()
    runtime = text[text.index("AS runtime"):]
    assert re.search(r"^ARG TORCH_VARIANT=cuda$", runtime, re.M)
    assert re.search(r"BIDS_DMRI_LDM_TORCH_VARIANT=\$\{TORCH_VARIANT\}", runtime)


def test_docs_state_the_exit_codes_and_output_type():
    usage = (REPO / "docs" / "usage.md").read_text()
    table = {line.split("|")[1].strip(): line for line in usage.splitlines() if re.match(r"^\| \d+ \|", line)}
    assert "model bundle that is corrupt" in table["1"]
    assert "memory" in table["73"] and "--tmpfs /tmp" in table["73"]
    assert "group-level" in table["75"]
    assert "Two runs sharing a work or output directory" in usage
    outputs = (REPO / "docs" / "outputs.md").read_text()
    assert "int16 + scl_slope" in outputs


# ============================================================================ model / data
def _shipped(name: str) -> Path:
    return REPO / "models" / name


def test_shipped_models_record_what_they_were_trained_for():
    from bids_dmri_ldm.methods import load_rish_global_model
    from bids_dmri_ldm.ml.bundle import verify_bundle

    expected = {"shells": [1000.0], "sh_order_max": 4, "rish_orders": [0, 2, 4], "signal_normalisation": "S/S0"}
    for name in ("demo", "cnn-demo"):  # ldm and cnn bundles: one shell each
        verify_bundle(_shipped(name))
        assert json.loads((_shipped(name) / "config.json").read_text())["trained_for"] == expected
    model = load_rish_global_model(_shipped("rish-global"))  # rish-global: every shell it was fitted for
    expected = {**expected, "shells": [1000.0, 2000.0]}
    assert json.loads((_shipped("rish-global") / "rish_global.json").read_text())["trained_for"] == expected
    assert model.trained_for == expected


@pytest.mark.parametrize("method, extra, named", [
    ("rish-global", ["--shell", "3000"], ["b=1000", "--shell 3000"]),
    ("rish-global", ["--sh-order", "6"], ["SH order: model 4", "--sh-order 6"]),
    ("ldm", ["--shell", "2000"], ["b=1000", "--shell 2000"]),
    ("cnn", ["--shell", "2000"], ["b=1000", "--shell 2000"]),
])
def test_a_model_trained_for_other_data_is_refused_before_any_work(bids_dataset, tmp_path, method, extra,
                                                                   named):
    out = tmp_path / "out"
    code, err = _main([str(bids_dataset.root), str(out), "participant", "-w", str(tmp_path / "work"),
                       "--skip-bids-validation", "--nprocs", "1", "--method", method, *extra])
    assert code == EX_DATAERR
    line = [line for line in err.splitlines() if line.startswith("bids-dmri-ldm: error:")]
    assert len(line) == 1 and "trained for other data" in line[0]
    assert all(fragment in line[0] for fragment in named), line[0]
    assert not (out / "sub-01").exists()


def test_a_model_that_records_nothing_is_used_with_a_warning(caplog):
    from bids_dmri_ldm.config import RunConfig
    from bids_dmri_ldm.workflows.base import check_model_matches

    config = RunConfig(bids_dir=Path("."), output_dir=Path("."), analysis_level="participant",
                       work_dir=Path("."), method="ldm")
    with caplog.at_level(logging.WARNING):
        check_model_matches(type("Old", (), {"trained_for": None})(), config, Path("old"))
    assert "does not record" in caplog.text


def test_the_rish_global_hash_covers_every_listed_file(tmp_path):
    """The shipped model lists its card too: an edited card is refused, and the recorded hash is
    that of the checksum list."""
    from bids_dmri_ldm.methods import MethodError, load_rish_global_model, sha256_file

    copy = tmp_path / "rish-global"
    shutil.copytree(_shipped("rish-global"), copy)
    assert load_rish_global_model(copy).sha256 == sha256_file(copy / "SHA256SUMS")
    (copy / "MODEL_CARD.md").write_text("edited\n")
    with pytest.raises(MethodError, match="MODEL_CARD.md"):
        load_rish_global_model(copy)


def test_the_ldm_hash_changes_with_the_weights_not_only_the_config(tmp_path):
    """Two bundles with the same config.json and other weights get different SHA-256s, so a
    later run does not skip outputs made with other weights as complete."""
    import torch
    from ml.conftest import tiny_bundle_config, tiny_config

    from bids_dmri_ldm.methods import LdmMethod
    from bids_dmri_ldm.ml.bundle import load_bundle, model_card, save_bundle
    from bids_dmri_ldm.ml.networks import build_all

    cfg = tiny_bundle_config(tiny_config())
    bundles = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        bundles.append(load_bundle(save_bundle(tmp_path / f"b{seed}", cfg, build_all(cfg), model_card(cfg))))
    assert bundles[0].config_sha256 == bundles[1].config_sha256
    assert bundles[0].sha256 != bundles[1].sha256
    assert LdmMethod(bundle=bundles[0]).sha256 == bundles[0].sha256


def test_the_group_level_records_trained_for_in_the_ldm_bundle(make_bids_dataset, tmp_path, monkeypatch):
    """What train_all receives (and writes into config.json) holds the run's shell and SH order."""
    from bids_dmri_ldm.cli.parser import parse_args
    from bids_dmri_ldm.cli.run import _collect
    from bids_dmri_ldm.ml import training
    from bids_dmri_ldm.workflows import group

    ds = make_bids_dataset(subjects=("01",), field_strengths=(3.0, 7.0), snr=30.0)
    config = parse_args([str(ds.root), str(tmp_path / "out"), "group", "-w", str(tmp_path / "work"),
                         "--skip-bids-validation", "--method", "ldm", "--shell", "1000", "--sh-order", "6"])
    runs, _ = _collect(config, roles=None)
    seen = {}

    def fake_train_all(rish_3t, rish_7t, cfg, *args, **kwargs):
        seen["cfg"] = cfg
        return None

    monkeypatch.setattr(training, "train_all", fake_train_all)
    assert group.train_ldm(config, runs) == 0
    assert seen["cfg"]["trained_for"] == {"shells": [1000.0], "sh_order_max": 6, "rish_orders": [0, 2, 4],
                                          "signal_normalisation": "S/S0"}


# ============================================================================ memory
def test_output_resolution_is_bounded():
    from bids_dmri_ldm.cli.exitcodes import UsageError
    from bids_dmri_ldm.cli.parser import _build_parser

    parser = _build_parser()
    for value in ("1e-6", "0.05", "25"):
        with pytest.raises(UsageError, match="between 0.1 and 20"):
            parser.parse_args(["b", "o", "participant", "--output-resolution", value])
    assert parser.parse_args(["b", "o", "participant", "--output-resolution", "0.1"]).output_resolution == 0.1


def test_a_grid_too_large_for_the_memory_is_refused_before_any_work(bids_dataset, tmp_path):
    """12x12x10 voxels of 2 mm at 0.1 mm is 240x240x200 voxels: about 2.5 GiB for this run, more
    than the 0.5 GiB given; refused (73) with the number and what to change, nothing computed."""
    out, work = tmp_path / "out", tmp_path / "work"
    argv = _argv(bids_dataset.root, out, work, "--mem-gb", "0.5")
    argv[argv.index("native")] = "0.1"
    code, err = _main(argv)
    assert code == EX_CANTCREAT
    status, reason = _summary(out)["sub-01"]
    assert status == "failed (resources)"
    assert "240x240x200" in reason and "512.0 MiB is available" in reason and "--output-resolution" in reason
    needed = float(re.search(r"needs about ([\d.]+) GiB", reason).group(1))
    assert 1.0 < needed < 10.0
    assert (out / "logs" / "sub-01_dwi_error.log").is_file()
    assert not (work / "bids_dmri_ldm_wf").exists()  # no step ran


def test_memory_estimate_follows_the_grid():
    from bids_dmri_ldm.workflows.resources import PROCESS_BYTES, estimate_run_memory

    native = estimate_run_memory((10, 10, 10, 20), 2, 12, 4, (10, 10, 10), n_b0=2, n_fitted=1)
    half = estimate_run_memory((10, 10, 10, 20), 2, 12, 4, (20, 20, 20), n_b0=2, n_fitted=1)
    k = 15  # SH coefficients of order 4
    assert native.steps["load"] == PROCESS_BYTES + 1000 * (2 + 45)  # streamed: one volume at a time
    assert native.steps["fit"] == PROCESS_BYTES + 4 * 1000 * (2 * 12 + 2 * k)  # one shell at a time
    # the output-grid term grows with the number of output voxels (x8), the others do not
    grid_term = lambda e: e.steps["grid"] - PROCESS_BYTES - 4 * 1000 * k - 256 * 2**20  # noqa: E731
    assert grid_term(half) == 8 * grid_term(native)
    assert half.steps["load"] == native.steps["load"] and half.peak >= native.peak
    # the rebuild holds every fitted shell's coefficients on the output grid
    three = estimate_run_memory((10, 10, 10, 20), 2, 12, 4, (20, 20, 20), n_b0=2, n_fitted=3)
    assert three.steps["rebuild"] - half.steps["rebuild"] == 4 * 8000 * 2 * k


def test_heavy_nodes_are_scheduled_with_their_memory(bids_dataset, tmp_path):
    from bids_dmri_ldm.bidsio.layout import collect_dwi_runs, load_layout
    from bids_dmri_ldm.cli.parser import parse_args
    from bids_dmri_ldm.workflows.base import init_single_run_wf, plan_run, run_settings

    config = parse_args(_argv(bids_dataset.root, tmp_path / "out", tmp_path / "work"))
    run = collect_dwi_runs(load_layout(bids_dataset.root))[0]
    plan = plan_run(run, config)
    workflow = init_single_run_wf(plan, config, run_settings(config, None))
    memory = {node.name: node.mem_gb for node in workflow._get_all_nodes()}
    assert memory["rebuild"] == pytest.approx(plan.memory.steps["rebuild"] / 2**30)
    assert memory["scale_sh"] == pytest.approx(plan.memory.steps["grid"] / 2**30)
    assert memory["load_dwi"] == pytest.approx(plan.memory.steps["load"] / 2**30)


# ============================================================================ ownership
def test_foreign_crash_files_in_the_shared_work_dir_do_not_fail_a_finished_run(make_bids_dataset, tmp_path,
                                                                            monkeypatch):
    """Another process's crash files (same run, same work dir) are not this run's: the run stays
    done and its outputs stay (on main they made it delete its 12 finished files)."""
    from bids_dmri_ldm.workflows import base

    ds = make_bids_dataset()
    out, work = tmp_path / "out", tmp_path / "work"
    real = base._execute

    def execute_then_another_process_crashes(plans, *args, **kwargs):
        real(plans, *args, **kwargs)
        for plan in plans:  # what a second process over the same run writes meanwhile
            for folder in (work / "crash" / plan.wf_name, work / "crash" / plan.wf_name / "20990101-000000_1"):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "crash-x-root-fit_rish-1.txt").write_text("Traceback\nValueError: not this one\n")

    monkeypatch.setattr(base, "_execute", execute_then_another_process_crashes)
    code, err = _main(_argv(ds.root, out, work))
    assert code == 0, err[-2000:]
    assert _summary(out)["sub-01"][0] == "done"
    assert _complete(out, "sub-01")


def test_a_run_locked_by_another_process_is_waited_for_then_done(make_bids_dataset, tmp_path):
    """sub-01 is held by "another process" (a lock taken here): the call does sub-02 first, then
    waits for sub-01 and, the holder gone without finishing, translates it itself."""
    from bids_dmri_ldm.bidsio.locks import RunLock

    ds = make_bids_dataset(subjects=("01", "02"))
    out, work = tmp_path / "out", tmp_path / "work"
    holder = RunLock(out, "sub-01_dwi")
    assert holder.acquire()
    events = []

    class ReleaseWhenWaited(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if "waited for after the other runs" in message:
                events.append(("deferred", _complete(out, "sub-02")))
            if "waiting for the other process" in message:
                events.append(("waiting", _complete(out, "sub-02")))
                holder.release()

    handler = ReleaseWhenWaited()
    logging.getLogger("bids_dmri_ldm").addHandler(handler)
    try:
        code, err = _main(_argv(ds.root, out, work))
    finally:
        logging.getLogger("bids_dmri_ldm").removeHandler(handler)
        holder.release()
    assert code == 0, err[-2000:]
    assert events == [("deferred", False), ("waiting", True)]  # sub-02 was done before the wait
    assert {k: v[0] for k, v in _summary(out).items()} == {"sub-01": "done", "sub-02": "done"}
    assert _complete(out, "sub-01") and _complete(out, "sub-02")


def test_a_second_group_level_process_gets_75(bids_dataset, tmp_path):
    from bids_dmri_ldm.bidsio.locks import RunLock

    out = tmp_path / "out"
    holder = RunLock(out, "group")
    assert holder.acquire()
    try:
        code, err = _main([str(bids_dataset.root), str(out), "group", "-w", str(tmp_path / "work"),
                           "--skip-bids-validation", "--method", "rish-global"])
    finally:
        holder.release()
    assert code == EX_TEMPFAIL and "another group-level process (pid" in err and "output directory" in err
    # training checkpoints live in the work dir: another output dir with the same work dir waits too
    holder = RunLock(tmp_path / "work", "group", folder="locks")
    assert holder.acquire()
    try:
        code, err = _main([str(bids_dataset.root), str(tmp_path / "out2"), "group", "-w", str(tmp_path / "work"),
                           "--skip-bids-validation", "--method", "rish-global"])
    finally:
        holder.release()
    assert code == EX_TEMPFAIL and "work directory" in err


def test_a_run_lock_is_released_when_its_holder_is_killed(tmp_path):
    """The kernel releases the lock of a process killed with SIGKILL: no stale lock blocks a rerun."""
    from bids_dmri_ldm.bidsio.locks import RunLock

    code = ("import sys, time; from bids_dmri_ldm.bidsio.locks import RunLock; "
            f"lock = RunLock({str(tmp_path)!r}, 'sub-01_dwi'); assert lock.acquire(); print('locked', flush=True); "
            "time.sleep(3600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = RunLock(tmp_path, "sub-01_dwi")
        assert not lock.acquire(blocking=False)
        assert lock.holder().startswith(f"pid {holder.pid} on ")
    finally:
        holder.kill()
        holder.wait(timeout=HANG_GUARD_S)
    assert lock.acquire(blocking=False)  # released by the kernel at the holder's death
    lock.release()
    assert lock.path.is_file()  # lock files stay (deleting one could give a run two owners)


def _cli(out: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "run.py"), str(root), str(out), "participant", "--skip-bids-validation",
            "--method", "identity", "--output-resolution", "native", *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIDS_DMRI_LDM_TEST_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def test_two_identical_commands_at_once_end_with_every_output(make_bids_dataset, tmp_path):
    """The same command twice at once, with the shared default work dir (OUTPUT_DIR/../work):
    both succeed and every output is present and valid."""
    ds = make_bids_dataset(subjects=("01", "02"))
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cli(out, ds.root, "--nprocs", "1"), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [proc.communicate(timeout=HANG_GUARD_S) for proc in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    assert (tmp_path / "work").is_dir()  # the default work dir was shared
    summaries = [p.read_text() for p in (out / "logs").glob("participant_*.tsv")]
    assert len(summaries) == 2
    for text in summaries:
        assert all(row.split("\t")[1] in ("done", "skipped") for row in text.splitlines()[1:])
    for sub in ("01", "02"):
        folder = out / f"sub-{sub}" / "dwi"
        assert _complete(out, f"sub-{sub}")
        files = sorted(p.name for p in folder.iterdir())
        assert len(files) == 12 and not [f for f in files if f.startswith(".")], files
        for image in folder.glob("*.nii.gz"):
            assert np.isfinite(np.asanyarray(nib.load(image).dataobj)).all()


def test_a_killed_worker_fails_its_run_and_the_others_finish(make_bids_dataset, tmp_path):
    """kill -9 of the worker running sub-01's SH fit: noticed, sub-01 failed (exit 1) with the
    reason and an error log, sub-02 done; no worker left behind; nothing on stdout (nipype's
    INFO lines, with -vv, go to stderr and the log file). A rerun then completes sub-01."""
    ds = make_bids_dataset(subjects=("01", "02"))
    before = _digest(ds.root)
    out = tmp_path / "out"
    proc = subprocess.run(_cli(out, ds.root, "--nprocs", "2", "-vv"), capture_output=True, text=True,
                          timeout=HANG_GUARD_S, env=_env(BIDS_DMRI_LDM_TEST_KILL_NODE="sub_01_dwi_wf.dwi_7tlike_wf.fit_rish"))
    assert proc.returncode == EX_FAILURE, proc.stderr[-3000:]
    rows = _summary(out)
    assert rows["sub-02"][0] == "done" and rows["sub-01"][0] == "failed"
    assert "killed by SIGKILL" in rows["sub-01"][1]
    assert "killed by SIGKILL" in (out / "logs" / "sub-01_dwi_error.log").read_text()
    assert not (out / "sub-01").exists() and _complete(out, "sub-02")
    assert proc.stdout == ""
    assert "nipype.workflow" in proc.stderr
    log = next((out / "logs").glob("bids-dmri-ldm_participant_*.log")).read_text()
    assert "nipype.workflow" in log and "[Node] Finished" in log
    assert _digest(ds.root) == before
    # a rerun (same default work dir) completes sub-01 and keeps sub-02 as it was
    code, err = _main(_argv(ds.root, out, tmp_path / "work"))
    assert code == 0, err[-2000:]
    assert {k: v[0] for k, v in _summary(out).items()} == {"sub-01": "done", "sub-02": "skipped"}


def test_ctrl_c_ends_the_run_while_a_worker_is_busy(make_bids_dataset, tmp_path):
    """SIGINT to the command's process group while a worker runs a node that never ends: exit
    130 with one line, and no process of the group is left."""
    ds = make_bids_dataset()
    marker = tmp_path / "hanging"
    proc = subprocess.Popen(_cli(tmp_path / "out", ds.root, "--nprocs", "2"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=_env(BIDS_DMRI_LDM_TEST_HANG_NODE=f"sub_01_dwi_wf.dwi_7tlike_wf.fit_rish={marker}"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the hanging node never started"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "bids-dmri-ldm: error: interrupted"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


# ============================================================================ what already held
def test_no_unpickling_eval_or_shell_in_the_package():
    pattern = re.compile(r"pickle\.loads?\(|(?<![\w.])eval\(|(?<![\w.])exec\(|shell=True|torch\.load\(|yaml\.load\(")
    found = [f"{path.relative_to(REPO)}:{number}" for path in sorted((REPO / "bids_dmri_ldm").rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line.split("#", 1)[0]) and "``" not in line]
    assert not found, found
