"""Model folders of every method (bids_dmri_ldm.bundles): one resolver, one checksum reader, both
checksum-list names, verification without building a network."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bids_dmri_ldm import bundles
from bids_dmri_ldm.errors import BundleError, MethodError, ModelNotFoundError
from bids_dmri_ldm.methods import inspect_model, load_rish_global_model

SHIPPED = Path(bundles.__file__).resolve().parent.parent / "models"


def test_checksum_list_formats(tmp_path):
    digest = "ab" * 32
    (tmp_path / "list").write_text(f"{digest}  a.json\n\n{digest.upper()} *b name.md\n")
    assert bundles.read_checksum_list(tmp_path / "list") == {"a.json": digest, "b name.md": digest}
    (tmp_path / "list").write_text(f"{digest}  a.json\nnot a checksum line\n")
    with pytest.raises(ValueError, match="malformed line 2"):
        bundles.read_checksum_list(tmp_path / "list")


def test_listed_checksums_take_the_first_list_found_and_raise_the_callers_error(tmp_path):
    digest = "cd" * 32
    with pytest.raises(MethodError, match="^nothing here$"):
        bundles.listed_checksums(tmp_path, ("SHA256SUMS", "checksums.sha256"), MethodError, "nothing here")
    (tmp_path / "checksums.sha256").write_text(f"{digest}  a.json\n")
    assert bundles.listed_checksums(tmp_path, ("SHA256SUMS", "checksums.sha256"), MethodError, "-") == (
        tmp_path / "checksums.sha256", {"a.json": digest})
    (tmp_path / "SHA256SUMS").write_text("garbage\n")  # first in the order given: read, and refused
    with pytest.raises(BundleError, match="SHA256SUMS: malformed line 1"):
        bundles.listed_checksums(tmp_path, ("SHA256SUMS", "checksums.sha256"), BundleError, "-")


def test_sha256_file_known_answer(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert bundles.sha256_file(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_one_resolver_for_every_method(tmp_path, monkeypatch):
    monkeypatch.delenv(bundles.MODELS_ENV, raising=False)
    assert bundles.resolve_model_dir("rish-global", None) == SHIPPED / "rish-global"
    assert bundles.resolve_model_dir("ldm", None) == SHIPPED / "demo"
    (tmp_path / "ldm").mkdir()
    (tmp_path / "ldm" / "config.json").write_text("{}")
    assert bundles.resolve_model_dir("ldm", tmp_path) == tmp_path / "ldm"  # a folder of models
    assert bundles.resolve_model_dir("ldm", tmp_path / "ldm") == tmp_path / "ldm"  # the bundle itself
    with pytest.raises(ModelNotFoundError, match="no cnn model bundle in"):
        bundles.resolve_model_dir("cnn", tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        bundles.resolve_model_dir("cnn", tmp_path / "nowhere")
    # the variable's folder is searched first; a model it lacks is found further on
    monkeypatch.setenv(bundles.MODELS_ENV, str(tmp_path))
    assert bundles.shipped_models_dirs()[0] == tmp_path
    assert bundles.resolve_model_dir("rish-global", None) == SHIPPED / "rish-global"


def test_rish_global_folder_with_the_other_checksum_name_loads(tmp_path):
    copy = tmp_path / "rg"
    shutil.copytree(SHIPPED / "rish-global", copy)
    (copy / "SHA256SUMS").rename(copy / bundles.BUNDLE_CHECKSUMS)
    model = load_rish_global_model(copy)
    assert model.sha256 == bundles.sha256_file(copy / bundles.BUNDLE_CHECKSUMS)
    assert model.sha256 == bundles.sha256_file(SHIPPED / "rish-global" / "SHA256SUMS")  # same list, same identity


def test_learned_bundle_with_the_other_checksum_name_verifies(tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(SHIPPED / "demo", copy)
    (copy / bundles.BUNDLE_CHECKSUMS).rename(copy / bundles.RISH_GLOBAL_CHECKSUMS)
    assert "config.json" in bundles.verify_bundle(copy)
    (copy / bundles.RISH_GLOBAL_CHECKSUMS).unlink()
    with pytest.raises(BundleError, match="checksums.sha256 is missing"):
        bundles.verify_bundle(copy)


def test_inspect_model_verifies_without_building_networks(monkeypatch):
    """The participant level's check of the ldm bundle reads hashes and config only: no network
    is built (nothing from ml.networks is called) and the identity is the checksum list's hash."""
    monkeypatch.delenv(bundles.MODELS_ENV, raising=False)
    import bids_dmri_ldm.ml.bundle as ml_bundle  # imported before patching: it binds build_all
    import bids_dmri_ldm.ml.networks as networks

    def no_build(*args, **kwargs):
        raise AssertionError("a network was built")

    for name in dir(networks):
        if name.startswith("build"):
            monkeypatch.setattr(networks, name, no_build)
    monkeypatch.setattr(ml_bundle, "build_all", no_build)
    info = inspect_model("ldm", None, {"device": "cpu"})
    assert info.path == SHIPPED / "demo"
    assert info.sha256 == bundles.sha256_file(SHIPPED / "demo" / bundles.BUNDLE_CHECKSUMS)
    assert info.trained_for is not None and info.model_name
    assert inspect_model("identity") is None
    with pytest.raises(MethodError, match="scale_reference must be one of"):
        inspect_model("ldm", None, {"scale_reference": "nonsense"})
    with pytest.raises(MethodError, match="unknown method option"):
        inspect_model("ldm", None, {"sampels": 3})
    with pytest.raises(MethodError, match="precision must be one of auto, fp32, bf16"):
        inspect_model("ldm", None, {"precision": "fp16"})


def test_tampered_bundle_is_refused_by_inspection(tmp_path):
    copy = tmp_path / "demo"
    shutil.copytree(SHIPPED / "demo", copy)
    with open(copy / "sr.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="sr.safetensors does not match its SHA-256"):
        inspect_model("ldm", copy)
