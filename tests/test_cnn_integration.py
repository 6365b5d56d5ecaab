"""``--method cnn`` (the paper's CNN baseline) end to end: group-level training, the participant
level with the trained bundle, provenance, refusal of a tampered bundle, no pairs."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_dmri_ldm.cli.exitcodes import EX_DATAERR, EX_FAILURE, EX_USAGE
from bids_dmri_ldm.cli.run import main
from bids_dmri_ldm.methods import CnnMethod, load_method

torch.set_num_threads(1)


def tiny_cnn_config() -> dict:
    """The cnn-demo config shrunk to a 16^3 grid, small channels and two epochs (the best one kept)."""
    from bids_dmri_ldm.ml.modelconfig import load_config, validate_config

    cfg = copy.deepcopy(load_config("cnn-demo"))
    cfg["name"] = "tiny-cnn"
    cfg["grid"] = [16, 16, 16]
    cfg["cnn"].update(channels=[4, 8], strides=[2], num_res_units=1)
    cfg["training"]["epochs"]["cnn"] = 2
    cfg["training"]["select_epoch"] = "best-validation"
    return validate_config(cfg)


def run_cli(bids_dir: Path, out: Path, work: Path, level: str, *extra: str) -> int:
    return main([str(bids_dir), str(out), level, "-w", str(work), "--skip-bids-validation", "--nprocs", "1",
                 *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two paired participants + a 3T-only one, trained with the tiny cnn config."""
    from conftest import write_bids_dataset

    root = tmp_path_factory.mktemp("cnn")
    ds = write_bids_dataset(root / "bids", subjects=("01", "02"), field_strengths=(3.0, 7.0), snr=30.0)
    write_bids_dataset(ds.root, subjects=("03",), field_strengths=(3.0,), snr=30.0, seed=3)
    config_file = root / "tiny.json"
    config_file.write_text(json.dumps(tiny_cnn_config()))
    out, work = root / "out", root / "work"
    code = run_cli(ds.root, out, work, "group", "--method", "cnn", "--config", str(config_file))
    return ds, out, work, code


def test_group_cnn_training_writes_a_verified_bundle(trained):
    from bids_dmri_ldm.ml.bundle import load_bundle

    _, out, work, code = trained
    assert code == 0
    bundle = load_bundle(out / "models" / "cnn")
    assert bundle.method == "cnn" and set(bundle.networks) == {"cnn"}
    data = bundle.config["training_data"]
    assert data["n_paired"] == 2 and data["n_3t"] == 3 and "affines" in data["pairing"]
    assert bundle.config["trained_for"]["shells"] == [1000.0] and bundle.config["trained_for"]["sh_order_max"] == 4
    assert len(data["validation_participants"]) == 1
    kept = data["epoch_kept"]  # the epoch of the lowest validation loss, its weights beside the checkpoint
    assert kept["rule"] == "lowest validation loss" and kept["of"] == 2 and kept["epoch"] in (1, 2)
    assert len(list(work.rglob("cnn/best.safetensors"))) == 1
    scale = data["calibration"]["scale_smoothing"]  # chosen on the validation pair, gains fitted on both
    assert (scale["n_pairs"], scale["n_fit_pairs"]) == (1, 2)
    assert bundle.config["translation"]["scale_gain"] == scale["gain"]
    table = bundle.config["validation"]
    assert table["model"] == "cnn" and set(table["mean"]) == {"untouched 3T", "identity", "rish-global", "cnn"}
    assert all(set(v) == set(table["columns"]) and len(v) == 8 for v in table["mean"].values())
    assert (out / "training" / "losses_cnn.csv").is_file() and (out / "group_training.html").is_file()
    card = (out / "models" / "cnn" / "MODEL_CARD.md").read_text()
    assert "CNN baseline" in card and "tiny-cnn" in card
    html = (out / "group_training.html").read_text()
    assert 'alt="example reconstructions"' in html and len(list((out / "training").glob("sub-*_example.npz"))) == 1


def test_participant_cnn_run_records_the_model(trained, tmp_path):
    ds, out, _, code = trained
    assert code == 0
    pout = tmp_path / "pout"
    assert run_cli(ds.root, pout, tmp_path / "w", "participant", "--method", "cnn", "--model-dir",
                   str(out / "models"), "--participant-label", "01", "--output-resolution", "native") == 0
    folder = pout / "sub-01" / "dwi"
    sidecar = json.loads(next(folder.glob("*_desc-7Tlike_dwi.json")).read_text())
    assert sidecar["Method"] == "cnn" and sidecar["Model"]["Name"] == "tiny-cnn"
    assert len(sidecar["Model"]["SHA256"]) == 64
    scale = np.asanyarray(nib.load(next(folder.glob("*_desc-scale_dwimap.nii.gz"))).dataobj)
    assert np.isfinite(scale).all() and (scale > 0).all()


def test_tampered_cnn_bundle_is_refused(trained, tmp_path, capsys):
    ds, out, _, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(out / "models" / "cnn", bad)
    weights = bad / "cnn.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert run_cli(ds.root, tmp_path / "o", tmp_path / "w", "participant", "--method", "cnn",
                   "--model-dir", str(bad)) == EX_FAILURE
    err = capsys.readouterr().err
    assert "cnn.safetensors" in err and "checksum" in err


def test_an_ldm_bundle_is_not_a_cnn(tmp_path):
    from bids_dmri_ldm.bundles import resolve_model_dir
    from bids_dmri_ldm.methods import MethodError

    shipped_ldm = resolve_model_dir("ldm", None)
    with pytest.raises(MethodError, match="is a ldm bundle, not cnn"):
        load_method("cnn", shipped_ldm)


def test_cnn_scale_maps_do_not_depend_on_the_storage_order(trained):
    """The same RISH maps stored with x flipped, and with y and z swapped, give the same scale
    maps after undoing the change (the network always sees canonical RAS order)."""
    _, out, _, _ = trained
    method = load_method("cnn", out / "models")
    assert isinstance(method, CnnMethod)
    _assert_orientation_proof(method)


def _assert_orientation_proof(method) -> None:
    rng = np.random.default_rng(0)
    shape = (14, 16, 12)
    g = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = (g[0] ** 2 + g[1] ** 2 + g[2] ** 2) < 0.8
    wave = 1 + 0.3 * np.sin(3 * g[0]) * np.cos(2 * g[1]) + 0.1 * rng.standard_normal(shape)
    rish = np.where(mask[..., None], np.stack([3 * wave, 0.2 * wave ** 2, 0.03 * wave ** 3], -1), 0).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    base = method.predict_scale_maps(rish, mask, affine).scale
    flip_x = np.diag([-1.0, 1, 1, 1])
    flip_x[0, 3] = shape[0] - 1
    flipped = method.predict_scale_maps(rish[::-1], mask[::-1], affine @ flip_x).scale[::-1]
    np.testing.assert_allclose(flipped, base, rtol=1e-5, atol=1e-6)
    swap = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    swapped = method.predict_scale_maps(np.swapaxes(rish, 1, 2), np.swapaxes(mask, 1, 2), affine @ swap).scale
    np.testing.assert_allclose(np.swapaxes(swapped, 1, 2), base, rtol=1e-5, atol=1e-6)
    assert np.abs(base[mask] - 1).max() > 1e-4  # a model that changes something


def test_ldm_scale_maps_do_not_depend_on_the_storage_order(tmp_path):
    """The same for the shipped ldm bundle (deterministic DDIM)."""
    method = load_method("ldm", None, {"ddim_steps": 3})
    _assert_orientation_proof(method)


def test_group_cnn_without_pairs_is_a_data_error(make_bids_dataset, tmp_path, capsys):
    ds = make_bids_dataset(subjects=("01", "02"))
    assert run_cli(ds.root, tmp_path / "out", tmp_path / "work", "group", "--method", "cnn") == EX_DATAERR
    err = capsys.readouterr().err
    assert "3T and 7T" in err and "01" in err and "02" in err


def test_group_cnn_refuses_an_ldm_config(make_bids_dataset, tmp_path, capsys):
    ds = make_bids_dataset(subjects=("01",), field_strengths=(3.0, 7.0))
    assert run_cli(ds.root, tmp_path / "out", tmp_path / "work", "group", "--method", "cnn",
                   "--config", "demo") == EX_USAGE
    assert "is a ldm configuration" in capsys.readouterr().err
