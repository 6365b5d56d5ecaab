"""tools/export_rish_features.py and tools/train_from_features.py: features out of BIDS, a
bundle out of the features (the GPU-node training path without the BIDS stack)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from ml.conftest import (  # tests/ml is a package; pytest puts tests/ on sys.path
    synthetic_rish,
    tiny_config,
    with_affine,
)

from bids_dmri_ldm.ml.bundle import load_bundle

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_export_features_match_the_group_level_cache(shared_bids_dataset, tmp_path):
    export = _load_tool("export_rish_features")
    out = tmp_path / "features.npz"
    assert export.main([str(out), str(shared_bids_dataset.root), "-w", str(tmp_path / "work")]) == 0
    with np.load(out) as data:
        keys = sorted(data.files)
        rish, mask = data["3T/01/rish"], data["3T/01/mask"]
    # participants 01 and 02, each with a 3T and a 7T run (the first session's pair)
    assert keys == sorted(f"{role}/{sub}/{kind}" for role in ("3T", "7T") for sub in ("01", "02")
                          for kind in ("affine", "mask", "rish"))
    assert rish.dtype == np.float32 and rish.shape == (*mask.shape, 3) and mask.dtype == bool
    assert mask.any() and np.isfinite(rish).all() and (rish >= 0).all() and (rish[mask][:, 0] > 0).any()
    # the cached features the group level trains on: the second export reads the same cache
    cache = list((tmp_path / "work" / "ldm_rish_cache").glob("*.npz"))
    assert len(cache) == 4
    out2 = tmp_path / "again.npz"
    export.main([str(out2), str(shared_bids_dataset.root), "-w", str(tmp_path / "work")])
    with np.load(out2) as again:
        np.testing.assert_array_equal(again["3T/01/rish"], rish)


def test_export_prefixes_participants_of_several_datasets(shared_bids_dataset, tmp_path):
    export = _load_tool("export_rish_features")
    arrays = export.export_features([shared_bids_dataset.root, shared_bids_dataset.root], tmp_path)
    assert {k.split("/")[1] for k in arrays} == {"d0-01", "d0-02", "d1-01", "d1-02"}


def test_export_refuses_a_dataset_simulated_for_held_out_evaluation(shared_bids_dataset, tmp_path, capsys):
    import shutil

    shifted = tmp_path / "shifted"
    shutil.copytree(shared_bids_dataset.root, shifted)
    description = json.loads((shifted / "dataset_description.json").read_text())
    (shifted / "dataset_description.json").write_text(json.dumps({**description, "SimulationPhysicsPreset": "shifted"}))
    export = _load_tool("export_rish_features")
    out = tmp_path / "features.npz"
    assert export.main([str(out), str(shared_bids_dataset.root), str(shifted), "-w", str(tmp_path / "work")]) == 65
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "held-out" in err and str(shifted) in err
    assert not out.exists() and not (tmp_path / "work").exists()


def _write_features(path: Path) -> None:
    arrays = {}
    for role, n, ratio in (("3T", 5, (1.0, 1.0, 1.0)), ("7T", 4, (0.85, 0.75, 0.7))):
        for i in range(n):
            rish, mask, affine = with_affine(synthetic_rish(i, ratio=ratio))
            arrays[f"{role}/p{i}/rish"], arrays[f"{role}/p{i}/mask"], arrays[f"{role}/p{i}/affine"] = rish, mask, affine
    np.savez_compressed(path, **arrays)


class FakeClock:
    """A clock that advances ``step`` seconds each time it is read (no wall-clock dependence)."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_train_from_features_writes_a_loadable_bundle_with_the_epochs_run(tmp_path):
    train = _load_tool("train_from_features")
    features = tmp_path / "features.npz"
    _write_features(features)
    r3, r7 = train.load_features(features)
    assert sorted(r3) == [f"p{i}" for i in range(5)] and sorted(r7) == [f"p{i}" for i in range(4)]
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(tiny_config()))
    out = tmp_path / "out"
    # the clock passes 1 s per reading: the probe alone spends the 0.5 s budget
    rc = train.main([str(features), str(out), "--config", str(cfg_file), "--device", "cpu",
                     "--epochs", "vqvae3t=2", "vqvae7t=1", "sr=1", "--budget", "ldm=0.5",
                     "--probe-epochs", "2", "--name", "tiny-tool"], clock=FakeClock(1.0))
    assert rc == 0
    bundle = load_bundle(out / "model")
    epochs = bundle.config["training"]["epochs"]
    # fixed counts as given; the budgeted stage ran its probe only
    assert epochs == {"vqvae3t": 2, "vqvae7t": 1, "ldm": 2, "sr": 1}
    assert bundle.config["name"] == "tiny-tool"
    # what the bundle was trained for (the export's defaults), checked at the participant level
    assert bundle.config["trained_for"] == {"shells": [1000.0], "sh_order_max": 4, "rish_orders": [0, 2, 4],
                                            "signal_normalisation": "S/S0"}
    summary = json.loads((out / "train_summary.json").read_text())
    assert {s: v["epochs"] for s, v in summary["stages"].items()} == epochs
    assert "train_from_features.py" in (out / "model" / "MODEL_CARD.md").read_text()


def test_train_from_features_refuses_a_bad_stage_name(tmp_path):
    train = _load_tool("train_from_features")
    with pytest.raises(SystemExit, match="STAGE=VALUE"):
        train.main([str(tmp_path / "f.npz"), str(tmp_path / "out"), "--epochs", "vqvae=3"])


def test_a_budget_extends_a_stage_beyond_its_probe_and_resumes_from_it(tmp_path, monkeypatch):
    """A budget larger than the probe runs more epochs than the probe, in resumed chunks sized by
    the epoch time; the recorded history is one continuous run (epochs numbered 1..N).

    Time is injected (the clock passes 1 s per reading, every epoch counts 0.25 s), so the
    numbers are exact on any machine: after the 2 probe epochs 20 - 1 = 19 s are left, the
    next chunk is min(19, 20) // 0.25 = 76 epochs, capped by --max-epochs 6."""
    train = _load_tool("train_from_features")
    monkeypatch.setattr(train, "epoch_seconds", lambda work, stage: [0.25] * len(train._history(work, stage)))
    features = tmp_path / "features.npz"
    _write_features(features)
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(tiny_config()))
    out = tmp_path / "out"
    assert train.main([str(features), str(out), "--config", str(cfg_file), "--device", "cpu",
                       "--epochs", "vqvae3t=1", "vqvae7t=1", "sr=1", "--budget", "ldm=20",
                       "--probe-epochs", "2", "--max-epochs", "6"], clock=FakeClock(1.0)) == 0
    history = json.loads((out / "work" / "ldm" / "state.json").read_text())["history"]
    assert len(history) == 6
    assert [row["epoch"] for row in history] == list(range(1, 7))
    assert load_bundle(out / "model").config["training"]["epochs"]["ldm"] == 6
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["stages"]["ldm"]["epochs"] == 6
