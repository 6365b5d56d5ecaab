"""Group-level training report from CSV/JSON files and from in-memory data."""

from __future__ import annotations

import json
import re

import numpy as np

from bids_dmri_ldm.reports import build_training_report

from .conftest import decode_png, parse_report


def _write_training_outputs(root):
    root.mkdir(parents=True, exist_ok=True)
    for stage, start in (("vqvae3t", 1.0), ("ldm", 0.5)):
        lines = ["epoch,train_loss,val_loss"]
        lines += [f"{e},{start / (e + 1):.5f},{start / (e + 1) * 1.1:.5f}" for e in range(6)]
        (root / f"loss_{stage}.csv").write_text("\n".join(lines) + "\n")
    lines = ["stage,epoch,nmse_l0,ssim_l0"]
    lines += [f"ldm,{e},{0.3 - 0.02 * e:.3f},{0.8 + 0.01 * e:.3f}" for e in range(6)]
    (root / "validation_metrics.csv").write_text("\n".join(lines) + "\n")
    model = root / "models" / "trained"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({
        "grid": [16, 16, 16], "epochs": {"vqvae3t": 6},
        "training_data": {"participants_3t": 5, "participants_paired": 3, "validation": ["sub-03"]}}))


def test_training_report_from_files(tmp_path):
    _write_training_outputs(tmp_path)
    path = build_training_report(tmp_path)
    assert path == tmp_path / "group_training.html"
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"https?://", text)
    parsed = parse_report(path)
    titles = [t for tag, t in parsed.headings if tag == "h2"]
    assert titles == ["Validation gate: the model against identity on held-out pairs",
                      "Loss curves per stage", "Validation metrics per epoch",
                      "Example reconstructions (validation participants)", "Training data",
                      "Configuration"]
    for src in parsed.images:
        decode_png(src)
    assert len(parsed.images) == 2  # loss curves + one validation stage
    # no example volumes were saved and the config has no validation table: those parts say so
    # instead of failing the report
    assert len(parsed.errors) == 2 and "no validation table" in parsed.errors[0] and "example" in parsed.errors[1]
    assert "participants_paired" in text and "sub-03" in text


def test_training_report_from_arrays(tmp_path):
    epochs = np.arange(4)
    vol = np.random.default_rng(0).uniform(size=(10, 10, 8, 3)).astype(np.float32)
    path = build_training_report(
        tmp_path,
        losses={"sr": {"epoch": epochs, "train_loss": np.linspace(1, 0.1, 4)}},
        validation={"sr": {"epoch": epochs, "nmse_fa": np.linspace(0.2, 0.1, 4)}},
        examples=[{"label": "sub-07", "source": vol, "prediction": vol * 0.9, "target": vol}],
        data_summary={"paired participants": 2},
        config={"lr": 1e-4, "validation": {
            "model": "ldm", "n_participants": 2, "columns": ["nmse_L0", "ssim_L0"],
            "mean": {"identity": {"nmse_L0": 0.1, "ssim_L0": 0.9}, "ldm": {"nmse_L0": 0.2, "ssim_L0": 0.8}},
            "loses_to_identity": ["nmse_L0", "ssim_L0"]}})
    parsed = parse_report(path)
    assert parsed.errors == []
    text = path.read_text(encoding="utf-8")
    assert "ldm LOSES to identity in NMSE L0, SSIM L0" in text and "0.2000" in text
    assert len(parsed.images) == 3
    for src in parsed.images:
        decode_png(src)


def test_training_report_with_malformed_csv_still_written(tmp_path):
    (tmp_path / "loss_vqvae3t.csv").write_text("epoch,train_loss\n")  # header only
    path = build_training_report(tmp_path)
    parsed = parse_report(path)
    assert path.exists() and len(parsed.errors) == 6
    assert any("loss" in e for e in parsed.errors)


def test_training_report_from_the_group_level_layout(tmp_path):
    # the layout ml/training.py writes: training/losses_<stage>.csv, model/config.json
    (tmp_path / "training").mkdir()
    for stage in ("sr", "ldm", "vqvae3t"):
        rows = ["epoch,train_loss,val_loss,seconds"] + [f"{e},{1 / (e + 1)},{1.2 / (e + 1)},{30 + e}"
                                                       for e in range(4)]
        (tmp_path / "training" / f"losses_{stage}.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"orders": [0, 2, 4], "training_data": {"n_paired": 3, "validation_participants": ["07"]}}))
    from bids_dmri_ldm.reports import training

    losses = training.load_curves(training._discover(tmp_path, "losses"))
    assert list(training.order_stages(losses)) == ["vqvae3t", "ldm", "sr"]
    assert list(training.loss_columns(losses["ldm"])) == ["epoch", "train_loss", "val_loss"]
    parsed = parse_report(build_training_report(tmp_path))
    # loss curves + validation loss of each stage (no metrics file: taken from val_loss)
    assert len(parsed.images) == 4
    assert len(parsed.errors) == 2 and "example" in parsed.errors[1]
    for src in parsed.images:
        decode_png(src)
