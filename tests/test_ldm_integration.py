"""``--method ldm`` end to end: participant level with a model bundle, group-level training.

Every model here is tiny (16^3 grid, 8 channels, made by the ml code in the test), so the whole
file runs in seconds on a CPU. The science of the networks is tested in ``tests/ml``; here: the
scale-map formula of both references (known answers), the smoothing, the derivatives and their
provenance, the bundle checks, the group-level errors, the RISH cache and a CLI training run.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bids_dmri_ldm.cli.exitcodes import EX_DATAERR, EX_FAILURE
from bids_dmri_ldm.cli.run import main
from bids_dmri_ldm.core.smooth import smooth_in_mask
from bids_dmri_ldm.methods import LdmMethod, load_method

torch.set_num_threads(1)


def tiny_training_config() -> dict:
    """tests/ml's tiny config (16^3 grid, 8 channels, one epoch per stage) with 4 DDIM steps and
    no t0/guidance calibration, so CLI training runs stay short."""
    from ml.conftest import (
        tiny_config,  # tests/ml is a package; pytest puts tests/ on sys.path
    )

    from bids_dmri_ldm.ml.modelconfig import validate_config

    cfg = tiny_config()
    cfg["translation"]["ddim_steps"] = 4
    cfg["training"].update(calibrate_t0=[], calibrate_guidance=[])
    return validate_config(cfg)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    """An untrained, complete tiny bundle (random but fixed weights)."""
    from bids_dmri_ldm.ml.bundle import model_card, save_bundle
    from bids_dmri_ldm.ml.networks import build_all

    cfg = tiny_training_config()
    norm = {"method": "log-percentile", "orders": [0, 2, 4], "eps": [1e-4, 1e-6, 1e-7],
            "low": [-3.0, -8.0, -10.0], "high": [1.0, -1.0, -3.0], "background": -1.0}
    cfg = dict(cfg, normalisation=norm, latent_scale=1.0, training_data={"n_3t": 0},
               software={"torch": torch.__version__}, created="2026-01-01T00:00:00+00:00")
    torch.manual_seed(0)
    nets = build_all(cfg)
    with torch.no_grad():  # MONAI zero-initialises the UNet's output conv: make it non-trivial
        for p in nets["unet"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_bundle(tmp_path_factory.mktemp("bundle") / "tiny", cfg, nets, model_card(cfg))


def _normalisation_ok(bundle_dir: Path) -> None:
    from bids_dmri_ldm.ml.bundle import load_bundle

    load_bundle(bundle_dir)  # raises if the normalisation keys do not fit the schema


def run_cli(bids_dir: Path, out: Path, work: Path, level: str, *extra: str) -> int:
    return main([str(bids_dir), str(out), level, "-w", str(work), "--skip-bids-validation", "--nprocs", "1",
                 *extra])


# --------------------------------------------------------------------------- scale maps (known answers)


def test_scale_maps_use_the_chosen_reference(tiny_bundle, monkeypatch):
    """lambda = sqrt(pred / input) for 'input', sqrt(pred / round trip) for 'roundtrip'; 1 outside."""
    from bids_dmri_ldm.ml import inference

    _normalisation_ok(tiny_bundle)
    shape = (6, 7, 5, 3)
    rng = np.random.default_rng(0)
    rish = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    pred = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    recon = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    mask = np.zeros(shape[:3], bool)
    mask[1:5, 1:6, 1:4] = True

    def fake_translate(rish_3t, mask_, bundle, **kwargs):
        return inference.Translation(pred, None, recon, {"CropBox": [[0, 6], [0, 7], [0, 5]]})

    monkeypatch.setattr(inference, "translate_rish", fake_translate)
    for reference, denominator in (("input", rish), ("roundtrip", recon)):
        method = load_method("ldm", tiny_bundle, {"scale_reference": reference})
        out = method.predict_scale_maps(rish, mask, np.eye(4))
        expected = np.sqrt(pred / (denominator + method.tau))
        np.testing.assert_allclose(out.scale[mask], expected[mask], rtol=1e-5)
        assert np.all(out.scale[~mask] == 1.0)
        assert out.provenance["ScaleReference"] == reference


def test_smoothing_keeps_constants_and_does_not_leak():
    """Mask-normalised smoothing: a constant stays constant up to the brain edge; outside values
    (here 100) do not enter; a noisy field gets a smaller spread."""
    mask = np.zeros((20, 20, 20), bool)
    mask[4:16, 4:16, 4:16] = True
    const = np.where(mask[..., None], 0.8, 100.0).astype(np.float32).repeat(2, -1)
    out = smooth_in_mask(const, mask, [1.5, 1.5, 1.5])
    np.testing.assert_allclose(out[mask], 0.8, rtol=1e-5)
    noisy = (0.8 + 0.1 * np.random.default_rng(1).standard_normal((20, 20, 20, 1))).astype(np.float32)
    assert smooth_in_mask(noisy, mask, [1.5] * 3)[mask].std() < 0.5 * noisy[mask].std()


def test_bad_scale_options_refused(tiny_bundle):
    from bids_dmri_ldm.methods import MethodError

    with pytest.raises(MethodError, match="scale_reference"):
        load_method("ldm", tiny_bundle, {"scale_reference": "nonsense"})
    with pytest.raises(MethodError, match="scale_smoothing"):
        load_method("ldm", tiny_bundle, {"scale_smoothing": -1})


# --------------------------------------------------------------------------- participant level


def test_ldm_participant_run_writes_valid_derivatives_with_provenance(make_bids_dataset, tiny_bundle, tmp_path,
                                                                      validator):
    """--method ldm --num-samples 2: every derivative plus the SD map, provenance of the model and
    its settings in the sidecars, valid BIDS derivatives; the same seed gives the same output."""
    ds = make_bids_dataset(snr=30.0)
    out, work = tmp_path / "out", tmp_path / "work"
    args = ("--method", "ldm", "--model-dir", str(tiny_bundle), "--num-samples", "2", "--seed", "7",
            "--ddim-steps", "3", "--t0", "20", "20", "20", "--guidance", "0.5", "1", "2",
            "--output-resolution", "native")
    assert run_cli(ds.root, out, work, "participant", *args) == 0
    folder = out / "sub-01" / "dwi"
    std_file = folder / "sub-01_model-rish_desc-7TlikeStd_dwimap.nii.gz"
    scale_file = folder / "sub-01_model-rish_desc-scale_dwimap.nii.gz"
    assert std_file.is_file() and (folder / "sub-01_desc-7Tlike_dwi.nii.gz").is_file()
    mask = np.asanyarray(nib.load(folder / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    std = np.asanyarray(nib.load(std_file).dataobj)
    assert std.shape == (*mask.shape, 3) and np.all(std >= 0) and std[mask].max() > 0 and np.all(std[~mask] == 0)
    scale = np.asanyarray(nib.load(scale_file).dataobj)
    assert np.all(np.isfinite(scale)) and np.all(scale[~mask] == 1.0)

    sidecar = json.loads((folder / "sub-01_desc-7Tlike_dwi.json").read_text())
    checksum = json.loads((tiny_bundle / "config.json").read_text())  # noqa: F841 - must parse
    from bids_dmri_ldm.ml.bundle import sha256_file

    assert sidecar["Method"] == "ldm"
    # the model's SHA-256 names every file of the bundle: it is that of the checksum list
    assert sidecar["Model"]["SHA256"] == sha256_file(tiny_bundle / "checksums.sha256")
    assert sidecar["Settings"]["ModelSHA256"] == sidecar["Model"]["SHA256"]
    assert sidecar["NoiseLevelT0"] == [20, 20, 20]
    assert sidecar["GuidanceScale"] == [0.5, 1.0, 2.0]
    assert sidecar["DDIMSteps"] == 3 and sidecar["NumSamples"] == 2 and sidecar["Seed"] == 7
    assert sidecar["ScaleReference"] in ("input", "roundtrip")
    std_sidecar = json.loads(std_file.with_name(std_file.name.replace(".nii.gz", ".json")).read_text())
    assert std_sidecar["RISHOrders"] == [0, 2, 4] and std_sidecar["NumSamples"] == 2

    env = dict(os.environ, DENO_DIR=str(tmp_path / "deno"))
    result = subprocess.run([validator, str(out)], capture_output=True, text=True, env=env, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr

    # determinism: the same seed reproduces the scale maps exactly (CPU)
    out2 = tmp_path / "out2"
    assert run_cli(ds.root, out2, tmp_path / "work2", "participant", *args) == 0
    np.testing.assert_array_equal(np.asanyarray(nib.load(out2 / "sub-01" / "dwi" / scale_file.name).dataobj), scale)


def test_tampered_bundle_is_refused(make_bids_dataset, tiny_bundle, tmp_path, capsys):
    """A weight file changed after training: exit 1, the message names the file and the checksum."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    weights = bad / "unet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    ds = make_bids_dataset()
    code = run_cli(ds.root, tmp_path / "out", tmp_path / "work", "participant", "--method", "ldm",
                   "--model-dir", str(bad))
    assert code == EX_FAILURE
    err = capsys.readouterr().err
    assert "unet.safetensors" in err and "checksum" in err


# --------------------------------------------------------------------------- group level


def test_group_without_pairs_fails_with_no_data(make_bids_dataset, tmp_path, capsys):
    """Only 3T runs: exit 65 (the data cannot train a model) and a message saying what was found."""
    ds = make_bids_dataset(subjects=("01", "02"))
    code = run_cli(ds.root, tmp_path / "out", tmp_path / "work", "group", "--method", "ldm")
    assert code == EX_DATAERR
    err = capsys.readouterr().err
    assert "3T and 7T" in err and "01" in err and "02" in err


def test_group_ldm_training_through_the_cli(make_bids_dataset, tmp_path, capsys):
    """Two paired participants + a 3T-only one, one epoch per stage: a loadable, verified bundle
    in models/ldm/, loss curves and the training report; a second run reuses the cached RISH."""
    from bids_dmri_ldm.ml.bundle import load_bundle

    ds = make_bids_dataset(subjects=("01", "02"), field_strengths=(3.0, 7.0), snr=30.0)
    make_bids_dataset(root=ds.root, subjects=("03",), field_strengths=(3.0,), snr=30.0, seed=3)
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(tiny_training_config()))
    out, work = tmp_path / "out", tmp_path / "work"
    assert run_cli(ds.root, out, work, "group", "--method", "ldm", "--config", str(config_file)) == 0
    bundle = load_bundle(out / "models" / "ldm")
    assert bundle.config["training_data"]["n_paired"] == 2 and bundle.config["training_data"]["n_3t"] == 3
    assert bundle.config["trained_for"]["shells"] == [1000.0] and bundle.config["trained_for"]["sh_order_max"] == 4
    assert (out / "models" / "ldm" / "MODEL_CARD.md").is_file()
    # the validation gate: the new model beside identity, rish-global and the untouched 3T scan
    table = bundle.config["validation"]
    assert table["model"] == "ldm" and table["n_participants"] == 1
    assert set(table["mean"]) == {"untouched 3T", "identity", "rish-global", "ldm"}
    assert "## Validation (group level)" in (out / "models" / "ldm" / "MODEL_CARD.md").read_text()
    assert sorted(p.name for p in (out / "training").glob("*.csv")) == [
        f"losses_{s}.csv" for s in ("ldm", "sr", "vqvae3t", "vqvae7t")]
    assert (out / "group_training.html").is_file()
    # one validation participant translated with the new bundle, shown in the report
    examples = sorted((out / "training").glob("sub-*_example.npz"))
    assert len(examples) == 1
    with np.load(examples[0]) as ex:
        grid = tuple(bundle.config["grid"])
        assert {k: ex[k].shape for k in ("source", "prediction", "target")} == {
            k: grid + (3,) for k in ("source", "prediction", "target")}
        assert np.isfinite(ex["prediction"]).all() and ex["prediction"][ex["mask"]].max() > 0
    html = (out / "group_training.html").read_text()
    assert "no example reconstructions" not in html and 'alt="example reconstructions"' in html

    cache = sorted((work / "ldm_rish_cache").glob("*.npz"))
    assert len(cache) == 5  # 3 x 3T + 2 x 7T, one file each
    mtimes = [p.stat().st_mtime_ns for p in cache]
    # a second run (one stage, resumed) reuses every cached feature
    assert run_cli(ds.root, out, work, "group", "--method", "ldm", "--config", str(config_file),
                   "--stage", "sr", "--resume") == 0
    assert [p.stat().st_mtime_ns for p in sorted((work / "ldm_rish_cache").glob("*.npz"))] == mtimes
    # another SR head in the config: its old checkpoint is not continued but trained again
    changed = tiny_training_config()
    changed["sr"]["channels"] *= 2
    config_file.write_text(json.dumps(changed))
    assert run_cli(ds.root, out, work, "group", "--method", "ldm", "--config", str(config_file),
                   "--stage", "sr", "--resume") == 0
    assert load_bundle(out / "models" / "ldm").config["sr"]["channels"] == changed["sr"]["channels"]
    # another VQ-VAE: the later stages cannot be built on the old one
    changed["vqvae"]["commitment_cost"] = 0.5
    config_file.write_text(json.dumps(changed))
    capsys.readouterr()
    assert run_cli(ds.root, out, work, "group", "--method", "ldm", "--config", str(config_file),
                   "--stage", "sr", "--resume") == EX_DATAERR
    assert "completed first (with these settings and data)" in capsys.readouterr().err


def test_rish_cache_counts_reuse(make_bids_dataset, tmp_path):
    """collect_ldm_features computes each run once, then reuses it; a touched input is recomputed."""
    from bids_dmri_ldm.cli.parser import parse_args
    from bids_dmri_ldm.workflows.group_features import collect_ldm_features

    ds = make_bids_dataset(subjects=("01",), field_strengths=(3.0, 7.0), snr=30.0)
    config = parse_args([str(ds.root), str(tmp_path / "out"), "group", "-w", str(tmp_path / "work"),
                         "--skip-bids-validation", "--method", "ldm"])
    from bids_dmri_ldm.cli.run import _collect

    runs, _ = _collect(config, roles=None)
    first, second, third = {}, {}, {}
    r3, r7 = collect_ldm_features(config, runs, first)
    assert first == {"computed": 2} and set(r3) == {"01"} and set(r7) == {"01"}
    r3b, _ = collect_ldm_features(config, runs, second)
    assert second == {"reused": 2}
    np.testing.assert_array_equal(r3["01"][0], r3b["01"][0])
    dwi = next(r.dwi for r in runs if r.role == "source")
    os.utime(dwi, ns=(os.stat(dwi).st_atime_ns, os.stat(dwi).st_mtime_ns + 10**9))
    collect_ldm_features(config, runs, third)
    assert third == {"computed": 1, "reused": 1}


def test_ldm_method_is_the_loaded_type(tiny_bundle):
    assert isinstance(load_method("ldm", tiny_bundle, {}), LdmMethod)


def test_config_scale_options_are_optional_but_checked():
    """translation.scale_reference / scale_smoothing may be absent or valid; typos are refused."""
    from bids_dmri_ldm.ml.modelconfig import ConfigError, validate_config

    cfg = tiny_training_config()
    validate_config(dict(cfg, translation=dict(cfg["translation"], scale_reference="input", scale_smoothing=1.0)))
    with pytest.raises(ConfigError, match="scale_reference"):
        validate_config(dict(cfg, translation=dict(cfg["translation"], scale_reference="ratio")))
    with pytest.raises(ConfigError, match="scale_refrence"):
        validate_config(dict(cfg, translation=dict(cfg["translation"], scale_refrence="input")))
    validate_config(dict(cfg, translation=dict(cfg["translation"], scale_gain=[1.0, 0.97, 0.9])))
    for bad in (0.0, -1.0, [1.0, 0.9], "1", [1.0, 1.0, float("inf")]):
        with pytest.raises(ConfigError, match="scale_gain"):
            validate_config(dict(cfg, translation=dict(cfg["translation"], scale_gain=bad)))


def test_std_map_is_optional_for_completeness_but_removed_with_the_run(tmp_path):
    """The SD map (only K > 1) is not needed for a run to count as complete, yet a failed run's
    cleanup removes it with the others."""
    from bids_dmri_ldm.bidsio import derivatives as deriv

    outputs = deriv.run_outputs(tmp_path, "sub-01_dwi.nii.gz")
    required = outputs.all_files()
    std = outputs.path("rish_std")
    assert std.name == "sub-01_model-rish_desc-7TlikeStd_dwimap.nii.gz" and std not in required
    for path in required:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}" if path.suffix == ".json" else "x")
    assert deriv.is_complete(outputs)
    std.write_text("x")
    assert std in deriv.existing_files(outputs)
    deriv.remove_outputs(outputs)
    assert not std.exists() and not any(p.exists() for p in required)


def test_command_line_scale_options_override_the_bundle(tiny_bundle, tmp_path):
    """--scale-reference / --scale-smoothing reach the ldm method; unset, the bundle's values apply."""
    from bids_dmri_ldm.config import RunConfig
    from bids_dmri_ldm.ml.modelconfig import (
        DEFAULT_SCALE_REFERENCE,
        DEFAULT_SCALE_SMOOTHING,
    )
    from bids_dmri_ldm.workflows.base import method_options

    def config(**overrides):
        return RunConfig(bids_dir=tmp_path, output_dir=tmp_path / "out", analysis_level="participant",
                         work_dir=tmp_path / "work", method="ldm", **overrides)

    method = load_method("ldm", tiny_bundle, method_options(config(scale_reference="input", scale_smoothing=2.5)))
    assert (method.scale_reference, method.scale_smoothing) == ("input", [2.5, 2.5, 2.5])  # one per order
    translation = json.loads((tiny_bundle / "config.json").read_text())["translation"]
    method = load_method("ldm", tiny_bundle, method_options(config()))
    assert method.scale_reference == translation.get("scale_reference", DEFAULT_SCALE_REFERENCE)
    assert method.scale_smoothing == [translation.get("scale_smoothing", DEFAULT_SCALE_SMOOTHING)] * 3
