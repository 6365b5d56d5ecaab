"""Model bundle: round trip, checksums, refusal of broken bundles."""
import json
import shutil

import pytest
import torch

from bids_dmri_ldm.ml.bundle import BundleError, load_bundle, verify_bundle


@pytest.fixture
def bundle_copy(tiny_bundle_dir, tmp_path):
    return shutil.copytree(tiny_bundle_dir, tmp_path / "copy")


def test_round_trip_restores_identical_weights(tiny_bundle_dir):
    from safetensors.torch import load_file
    bundle = load_bundle(tiny_bundle_dir)
    stored = load_file(str(tiny_bundle_dir / "unet.safetensors"))
    for key, value in bundle.networks["unet"].state_dict().items():
        assert torch.equal(value, stored[key])
    assert bundle.name == "tiny" and len(bundle.config_sha256) == 64
    assert not bundle.networks["sr"].training
    card = (tiny_bundle_dir / "MODEL_CARD.md").read_text()
    assert "t0 per order: [30, 30, 30]" in card
    listing = (tiny_bundle_dir / "checksums.sha256").read_text()
    assert "config.json" in listing and "unet.safetensors" in listing


def test_the_same_weights_give_the_same_bytes(tiny_bundle_dir, tmp_path):
    """Saving a bundle again gives byte-identical files (its SHA-256 names the model in every
    sidecar and keys the work folder's cache)."""
    from bids_dmri_ldm.ml.bundle import save_bundle

    bundle = load_bundle(tiny_bundle_dir)
    card = (tiny_bundle_dir / "MODEL_CARD.md").read_text()
    digests = {load_bundle(save_bundle(tmp_path / f"again{k}", bundle.config, bundle.networks, card)).sha256
               for k in range(6)}
    assert digests == {load_bundle(tiny_bundle_dir).sha256}


def test_tampered_byte_is_refused(bundle_copy):
    path = bundle_copy / "vqvae7t.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="vqvae7t.safetensors does not match its SHA-256"):
        load_bundle(bundle_copy)


def test_truncated_file_is_refused(bundle_copy):
    path = bundle_copy / "unet.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match="unet.safetensors does not match"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("name", ["sr.safetensors", "config.json", "checksums.sha256"])
def test_missing_file_is_refused(bundle_copy, name):
    (bundle_copy / name).unlink()
    with pytest.raises(BundleError, match=f"incomplete: {name} is missing"):
        load_bundle(bundle_copy)


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        verify_bundle(tmp_path / "nowhere")


def _rewrite_config(bundle_dir, change):
    """Edit config.json and re-sign it, so only the config check can object."""
    from bids_dmri_ldm.ml.bundle import CHECKSUM_FILE, sha256_file
    cfg = json.loads((bundle_dir / "config.json").read_text())
    change(cfg)
    (bundle_dir / "config.json").write_text(json.dumps(cfg))
    lines = (bundle_dir / CHECKSUM_FILE).read_text().splitlines()
    lines = [f"{sha256_file(bundle_dir / 'config.json')}  config.json" if l.endswith(" config.json") else l
             for l in lines]
    (bundle_dir / CHECKSUM_FILE).write_text("\n".join(lines) + "\n")


def test_unknown_config_key_is_refused(bundle_copy):
    _rewrite_config(bundle_copy, lambda c: c["translation"].update(gudance=[1, 1, 1]))
    with pytest.raises(BundleError, match="unknown key.*gudance"):
        load_bundle(bundle_copy)


def test_missing_config_key_is_refused(bundle_copy):
    _rewrite_config(bundle_copy, lambda c: c.pop("normalisation"))
    with pytest.raises(BundleError, match="missing key.*normalisation"):
        load_bundle(bundle_copy)


def test_incompatible_version_is_refused(bundle_copy):
    _rewrite_config(bundle_copy, lambda c: c.update(format_version=2))
    with pytest.raises(BundleError, match="format_version 2 is not supported"):
        load_bundle(bundle_copy)


def test_weights_that_do_not_fit_the_architecture_are_refused(bundle_copy):
    _rewrite_config(bundle_copy, lambda c: c["sr"].update(channels=8))
    with pytest.raises(BundleError, match="sr.safetensors does not fit the architecture"):
        load_bundle(bundle_copy)
