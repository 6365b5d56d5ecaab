"""``main()``: one-line errors with BIDS exit codes, and dispatch to the two levels.

The levels themselves (``workflows.base.run_participant``, ``workflows.group.run_group``) are
tested by their own modules; here they are replaced by recorders to check what ``main`` hands
them and how it turns their answers into an exit status.
"""
from __future__ import annotations

import sys
import types

import pytest

from bids_dmri_ldm.cli.run import main
from bids_dmri_ldm.ml import device as device_module


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch):
    monkeypatch.setattr(device_module, "cuda_available", lambda: False)


@pytest.fixture
def fake_levels(monkeypatch):
    """Replace both level modules; ``calls`` records (level, config, runs)."""
    calls = []
    answers = {"participant": None, "group": 0}

    def run_participant(config, runs, rejected=None):
        calls.append(("participant", config, list(runs)))
        if callable(answers["participant"]):
            return answers["participant"](runs)
        return {run.stem: "ok" for run in runs}

    def run_group(config, runs):
        calls.append(("group", config, list(runs)))
        return answers["group"]

    base = types.ModuleType("bids_dmri_ldm.workflows.base")
    base.run_participant = run_participant
    group = types.ModuleType("bids_dmri_ldm.workflows.group")
    group.run_group = run_group
    monkeypatch.setitem(sys.modules, "bids_dmri_ldm.workflows.base", base)
    monkeypatch.setitem(sys.modules, "bids_dmri_ldm.workflows.group", group)
    return calls, answers


def _argv(ds, tmp_path, level="participant", *extra):
    return [str(ds.root), str(tmp_path / "out"), level, "-w", str(tmp_path / "work"),
            "--skip-bids-validation", *extra]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("bids-dmri-ldm: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_participant_level_gets_only_source_runs(make_bids_dataset, tmp_path, fake_levels):
    calls, _ = fake_levels
    ds = make_bids_dataset(subjects=("01", "02"), sessions=("1", "2"), field_strengths=(3.0, 7.0))
    assert main(_argv(ds, tmp_path, "participant", "--participant-label", "02",
                      "--session-label", "ses-2")) == 0
    (level, config, runs), = calls
    assert level == "participant"
    assert [run.stem for run in runs] == ["sub-02_ses-2_acq-3T"]
    assert runs[0].field_strength == 3.0
    assert config.participant_labels == ["02"] and config.session_labels == ["2"]


def test_a_failed_run_gives_exit_1_after_all_runs(make_bids_dataset, tmp_path, fake_levels, capsys):
    calls, answers = fake_levels
    ds = make_bids_dataset(subjects=("01", "02"))
    answers["participant"] = lambda runs: {runs[0].stem: "failed: no b0 volume",
                                           runs[1].stem: "ok"}
    assert main(_argv(ds, tmp_path)) == 1
    assert len(calls[0][2]) == 2  # both runs were attempted
    line = _one_error_line(capsys.readouterr().err)
    assert "1 of 2 run(s) failed" in line and "sub-01" in line


def test_run_without_gradients_fails_but_others_run(make_bids_dataset, tmp_path, fake_levels, capsys):
    calls, _ = fake_levels
    ds = make_bids_dataset(subjects=("01", "02"), inherit_gradients=False)
    (ds.root / "sub-01" / "dwi" / "sub-01_dwi.bval").unlink()
    assert main(_argv(ds, tmp_path)) == 65  # bad data (the other run: "ok")
    assert [run.stem for run in calls[0][2]] == ["sub-02"]
    err = capsys.readouterr().err
    assert "no .bval file found" in err and "sub-01" in _one_error_line(err)


def test_group_level_checks_pairs_then_dispatches(make_bids_dataset, tmp_path, fake_levels):
    calls, answers = fake_levels
    ds = make_bids_dataset(subjects=("01", "02"), field_strengths=(3.0, 7.0))
    answers["group"] = 0
    assert main(_argv(ds, tmp_path, "group")) == 0
    level, _, runs = calls[0]
    assert level == "group" and len(runs) == 4  # source and target runs
    answers["group"] = 1
    assert main(_argv(ds, tmp_path, "group")) == 1


def test_group_level_without_pairs_is_a_data_error(make_bids_dataset, tmp_path, fake_levels, capsys):
    calls, _ = fake_levels
    ds = make_bids_dataset(subjects=("01",), field_strengths=(3.0,))
    assert main(_argv(ds, tmp_path, "group")) == 65
    assert "both 3T and 7T" in _one_error_line(capsys.readouterr().err)
    assert calls == []


@pytest.mark.parametrize(
    "extra, code, text",
    [
        (["--participant-label", "07"], 66, "participant label(s) 07 not found"),
        (["--session-label", "9"], 66, "session label(s) 9 not found"),
    ],
)
def test_unknown_labels(make_bids_dataset, tmp_path, fake_levels, capsys, extra, code, text):
    ds = make_bids_dataset(sessions=("1",))
    assert main(_argv(ds, tmp_path, "participant", *extra)) == code
    assert text in _one_error_line(capsys.readouterr().err)


def test_filter_selecting_nothing(make_bids_dataset, tmp_path, fake_levels, capsys):
    ds = make_bids_dataset()
    flt = tmp_path / "f.json"
    flt.write_text('{"dwi": {"acquisition": "none"}}')
    assert main(_argv(ds, tmp_path, "participant", "--bids-filter-file", str(flt))) == 18
    assert "no DWI run" in _one_error_line(capsys.readouterr().err)


def test_only_7t_runs_at_participant_level(make_bids_dataset, tmp_path, fake_levels, capsys):
    ds = make_bids_dataset(field_strengths=(7.0,))
    assert main(_argv(ds, tmp_path)) == 18
    _one_error_line(capsys.readouterr().err)


def test_missing_field_strength_needs_a_filter(make_bids_dataset, tmp_path, fake_levels, capsys):
    calls, _ = fake_levels
    ds = make_bids_dataset(write_field_strength=False)
    assert main(_argv(ds, tmp_path)) == 65
    assert "--bids-filter-file" in _one_error_line(capsys.readouterr().err)
    flt = tmp_path / "f.json"
    flt.write_text('{"dwi": {"subject": "01"}}')
    assert main(_argv(ds, tmp_path, "participant", "--bids-filter-file", str(flt))) == 0
    assert len(calls[-1][2]) == 1


def test_missing_level_module_is_a_clear_error(make_bids_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bids_dmri_ldm.workflows.base", None)
    ds = make_bids_dataset()
    assert main(_argv(ds, tmp_path)) == 1
    assert "participant level is not available" in _one_error_line(capsys.readouterr().err)


def test_unexpected_error_one_line_and_traceback_only_with_v(
        make_bids_dataset, tmp_path, fake_levels, capsys):
    _, answers = fake_levels
    ds = make_bids_dataset()

    def boom(runs):
        raise RuntimeError("disk on fire")

    answers["participant"] = boom
    assert main(_argv(ds, tmp_path)) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "RuntimeError: disk on fire" in line and "-v" in line
    assert main(_argv(ds, tmp_path, "participant", "-v")) == 1
    assert "Traceback" in capsys.readouterr().err


def test_keyboard_interrupt_exits_130(make_bids_dataset, tmp_path, fake_levels):
    _, answers = fake_levels
    ds = make_bids_dataset()

    def interrupted(runs):
        raise KeyboardInterrupt

    answers["participant"] = interrupted
    assert main(_argv(ds, tmp_path)) == 130


def test_usage_error_through_main(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path / "o"), "participant", "--nprocs", "0"]) == 64
    line = _one_error_line(capsys.readouterr().err)
    assert "--nprocs" in line


def test_log_file_written(make_bids_dataset, tmp_path, fake_levels):
    ds = make_bids_dataset()
    assert main(_argv(ds, tmp_path)) == 0
    logs = list((tmp_path / "out" / "logs").glob("bids-dmri-ldm_participant_*.log"))
    assert len(logs) == 1 and "1 source run(s): sub-01" in logs[0].read_text()


def test_invalid_dataset_exits_16(make_bids_dataset, tmp_path, fake_levels, validator, capsys):
    calls, _ = fake_levels
    ds = make_bids_dataset()
    (ds.root / "sub-01" / "dwi" / "sub-01_badentity_dwi.nii.gz").write_bytes(b"not nifti")
    argv = [str(ds.root), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work")]
    assert main(argv) == 16
    line = _one_error_line(capsys.readouterr().err)
    assert "not valid BIDS" in line and "--skip-bids-validation" in line
    assert calls == []


def test_bare_call_prints_usage_and_exits_64(capsys):
    from bids_dmri_ldm.cli.run import main

    assert main([]) == 64
    err = capsys.readouterr().err
    assert err.startswith("usage: bids-dmri-ldm") and "bids_dir" in err
    assert "bids-dmri-ldm: error:" in err
