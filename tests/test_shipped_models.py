"""The models shipped in ``models/``: they load, translate, are honest about their validation, and
the tool that ships them copies weights byte for byte."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bids_dmri_ldm import bundles
from bids_dmri_ldm.config import DEFAULT_METHOD
from bids_dmri_ldm.evaluation.gate import COLUMNS, IDENTITY, losing_columns
from bids_dmri_ldm.methods import load_method

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
LEARNED = {"ldm": "demo", "cnn": "cnn-demo"}


def _validation(method: str) -> dict:
    folder = MODELS / bundles.MODEL_FOLDERS[method].shipped
    if method == "rish-global":
        return json.loads((folder / "rish_global.json").read_text())["validation"]
    return json.loads((folder / "config.json").read_text())["validation"]


@pytest.mark.parametrize("method", ["rish-global", "ldm", "cnn"])
def test_shipped_model_checksums_cover_every_file(method):
    """Every file of a shipped folder is listed in its checksum list and matches it."""
    folder = MODELS / bundles.MODEL_FOLDERS[method].shipped
    listing = bundles.find_checksum_list(folder)
    sums = bundles.read_checksum_list(listing)
    files = {p.name for p in folder.iterdir() if p.is_file() and p != listing}
    assert set(sums) == files
    assert all(bundles.sha256_file(folder / name) == digest for name, digest in sums.items())


@pytest.mark.parametrize("method", ["rish-global", "ldm", "cnn"])
def test_shipped_model_cards_name_no_build_machine_path(method):
    card = (MODELS / bundles.MODEL_FOLDERS[method].shipped / "MODEL_CARD.md").read_text()
    assert not re.search(r"(?:^|[\s`'\"(=])/(?:work|tmp|home|root|scratch|mnt)/", card, re.M)
    assert "simulated" in card.lower()  # the card says what the weights were trained on


@pytest.mark.parametrize("method", ["rish-global", "ldm", "cnn"])
def test_shipped_models_carry_their_validation_table(method):
    table = _validation(method)
    assert set(table["mean"]) >= {IDENTITY, "untouched 3T", method}
    assert list(table["columns"]) == list(COLUMNS)
    assert table["n_participants"] >= 3


def test_default_method_does_not_lose_to_identity_on_its_validation_pairs():
    """The method a user gets without --method must not be worse than doing nothing."""
    assert losing_columns(_validation(DEFAULT_METHOD), DEFAULT_METHOD) == []


def test_shipped_cnn_bundle_translates_a_smooth_brain(monkeypatch):
    """models/cnn-demo loads by default for --method cnn and gives finite scale maps, 1 outside
    the brain, with the strength and gain its calibration recorded."""
    monkeypatch.delenv(bundles.MODELS_ENV, raising=False)
    method = load_method("cnn", None)
    shape = (30, 36, 30)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = sum(g ** 2 for g in grids) < 0.8
    wave = 1 + 0.2 * np.sin(3 * grids[0]) * np.cos(2 * grids[1])
    rish = (np.stack([1.9 * wave, 0.04 * wave, 0.004 * wave], -1) * mask[..., None]).astype(np.float32)
    out = method.predict_scale_maps(rish, mask, np.diag([3.75, 3.75, 3.75, 1.0]))
    assert out.scale.shape == rish.shape and np.isfinite(out.scale).all()
    assert np.all(out.scale[~mask] == 1.0)
    translation = json.loads((MODELS / "cnn-demo" / "config.json").read_text())["translation"]
    assert out.provenance["ScaleStrength"] == translation["scale_strength"]
    assert out.provenance["ScaleGain"] == translation.get("scale_gain", [1.0] * 3)
    for order, (alpha, gain) in enumerate(zip(translation["scale_strength"], out.provenance["ScaleGain"])):
        if alpha == 0:  # no map: one brain-wide factor (1: the order unchanged)
            np.testing.assert_allclose(out.scale[mask][:, order], gain, rtol=1e-6)
    assert 0.3 < np.median(out.scale[mask][:, 0]) < 3.0


def test_ship_model_tool_copies_weights_and_rewrites_only_the_card(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ship_model", ROOT / "tools" / "ship_model.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    source = tmp_path / "trained" / "cnn"
    source.mkdir(parents=True)
    (source / "cnn.safetensors").write_bytes(bytes(range(256)) * 4)
    (source / "config.json").write_text('{"kind": "cnn"}\n')
    (source / "MODEL_CARD.md").write_text("# card\n- command: `run /scratch/x/data OUT`\n")
    (source / "checksums.sha256").write_text("stale  list\n")
    notes = tmp_path / "notes.md"
    notes.write_text("Trained on simulated data.\n")
    target = tmp_path / "models" / "cnn-demo"
    target.parent.mkdir()
    assert tool.main([str(source), str(target), "--provenance", str(notes),
                      "--strip-prefix", "/scratch/x=DATA"]) == 0
    assert (target / "cnn.safetensors").read_bytes() == (source / "cnn.safetensors").read_bytes()
    assert (target / "config.json").read_bytes() == (source / "config.json").read_bytes()
    card = (target / "MODEL_CARD.md").read_text()
    assert "/scratch/x" not in card and "`run DATA/data OUT`" in card
    assert card.endswith("## Shipped bundle\n\nTrained on simulated data.\n")
    sums = bundles.read_checksum_list(target / "checksums.sha256")
    assert set(sums) == {"cnn.safetensors", "config.json", "MODEL_CARD.md"}
    assert sums["MODEL_CARD.md"] == bundles.sha256_file(target / "MODEL_CARD.md")
    # shipping again replaces the folder; nothing is left beside it
    assert tool.main([str(source), str(target), "--provenance", str(notes)]) == 0
    assert sorted(p.name for p in target.parent.iterdir()) == ["cnn-demo"]
