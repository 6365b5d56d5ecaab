"""BIDS derivatives: names, sidecars, dataset description, atomic writes, completeness."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.bidsio import dataset as bids_dataset
from bids_dmri_ldm.bidsio import derivatives as deriv
from bids_dmri_ldm.core.gradients import load_gradients


def test_entities_and_names():
    src = "/data/sub-01/ses-pre/dwi/sub-01_ses-pre_acq-hcp_dir-AP_run-02_dwi.nii.gz"
    assert deriv.parse_entities(src) == {"sub": "01", "ses": "pre", "acq": "hcp", "dir": "AP", "run": "02"}
    outputs = deriv.run_outputs("/out", src, res_label="1p05")
    assert outputs.path("dwi").as_posix() == (
        "/out/sub-01/ses-pre/dwi/sub-01_ses-pre_acq-hcp_dir-AP_run-02_res-1p05_desc-7Tlike_dwi.nii.gz")
    assert outputs.path("dwi", ".bvec").name.endswith("_res-1p05_desc-7Tlike_dwi.bvec")
    assert outputs.path("mask").name == "sub-01_ses-pre_acq-hcp_dir-AP_run-02_res-1p05_desc-brain_mask.nii.gz"
    assert outputs.path("scale").name == "sub-01_ses-pre_acq-hcp_dir-AP_run-02_res-1p05_model-rish_desc-scale_dwimap.nii.gz"
    assert outputs.run_id == "sub-01_ses-pre_acq-hcp_dir-AP_run-02_dwi"
    files = outputs.all_files()
    assert len(files) == len(set(files)) == 12
    assert files[-1] == outputs.sidecar("dwi")  # commit marker last
    no_session = deriv.run_outputs("/out", "sub-7/dwi/sub-7_dwi.nii", entities={"subject": "7"})
    assert no_session.path("dwi").as_posix() == "/out/sub-7/dwi/sub-7_desc-7Tlike_dwi.nii.gz"


def test_labels_must_be_alphanumeric():
    with pytest.raises(ValueError, match="invalid BIDS label"):
        deriv.build_name({"sub": "01", "desc": "synth-7T"}, "dwi", ".nii.gz")
    with pytest.raises(ValueError, match="unknown entities"):
        deriv.build_name({"sub": "01", "foo": "x"}, "dwi", ".nii.gz")
    assert deriv.build_name({"sub": "01", "desc": "7Tlike", "res": "2"}, "dwi", ".json") == "sub-01_res-2_desc-7Tlike_dwi.json"


@pytest.mark.parametrize("size, label", [(1.05, "1p05"), (2.0, "2"), (1.25, "1p25"), (0.7, "0p7")])
def test_resolution_label(size, label):
    assert deriv.resolution_label(size) == label


def test_bids_uri(tmp_path):
    (tmp_path / "sub-01").mkdir()
    assert bids_dataset.bids_uri(tmp_path / "sub-01" / "x.nii.gz", tmp_path) == "bids:raw:sub-01/x.nii.gz"
    with pytest.raises(ValueError):
        bids_dataset.bids_uri("/elsewhere/x.nii.gz", tmp_path)


def test_atomic_writes_leave_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "a" / "img.nii.gz"
    img = deriv.make_nifti(np.ones((2, 2, 2)), np.diag([-2.0, 2.0, 2.0, 1.0]))
    deriv.atomic_save_nifti(img, target)
    assert nib.load(target).header.get_xyzt_units() == ("mm", "sec")
    before = target.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", broken_save)  # disk full while writing
    with pytest.raises(OSError):
        deriv.atomic_save_nifti(deriv.make_nifti(np.zeros((2, 2, 2)), np.eye(4)), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["img.nii.gz"]  # no temp file left
    deriv.atomic_write_json(tmp_path / "x.json", {"b": np.float32(1.5), "a": np.arange(2)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [0, 1], "b": 1.5}


def test_link_or_copy_shares_the_bytes_and_survives_a_rewrite_of_either_name(tmp_path, monkeypatch):
    from bids_dmri_ldm.io import files

    work = tmp_path / "work" / "dwi.nii.gz"
    deriv.atomic_save_nifti(deriv.make_nifti(np.ones((2, 2, 2)), np.eye(4)), work)
    target = tmp_path / "out" / "sub-01_dwi.nii.gz"
    target.parent.mkdir()
    target.write_bytes(b"an older output")
    files.atomic_link_or_copy(work, target)
    assert target.stat().st_ino == work.stat().st_ino and target.read_bytes() == work.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp file left
    first = work.read_bytes()
    # a later run writes the work file again (atomically: a new inode): the output keeps its bytes
    deriv.atomic_save_nifti(deriv.make_nifti(np.zeros((2, 2, 2)), np.eye(4)), work)
    assert target.read_bytes() == first and work.read_bytes() != first

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(files.os, "link", no_links)  # another file system: a copy
    files.atomic_link_or_copy(work, target)
    assert target.stat().st_ino != work.stat().st_ino and target.read_bytes() == work.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_bval_bvec_roundtrip(tmp_path):
    bvals = np.array([0, 5, 1000, 995.5, 2000])
    rng = np.random.default_rng(0)
    bvecs = rng.normal(size=(5, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs[:2] = 0
    deriv.write_bval_bvec(bvals, bvecs, tmp_path / "d.bval", tmp_path / "d.bvec")
    assert len((tmp_path / "d.bvec").read_text().splitlines()) == 3  # FSL: 3 rows
    got_vals, got_vecs = load_gradients(tmp_path / "d.bval", tmp_path / "d.bvec")
    np.testing.assert_allclose(got_vals, bvals)
    np.testing.assert_allclose(got_vecs, bvecs, atol=1e-8)


def test_dataset_description_and_init(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "r", "BIDSVersion": "1.9.0",
                                                               "DatasetDOI": "doi:10.1/x"}))
    monkeypatch.delenv("BIDS_DMRI_LDM_IN_CONTAINER", raising=False)
    monkeypatch.delenv("BIDS_DMRI_LDM_IMAGE", raising=False)
    out = tmp_path / "out"
    bids_dataset.init_derivatives_dataset(out, raw)
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    generated = desc["GeneratedBy"][0]
    assert generated["Name"] == "bids-dmri-ldm" and generated["CodeURL"].startswith("https://")
    assert "Container" not in generated  # not claimed outside the image
    # Provenance that travels: the input by a path relative to the output and a bids: URI with
    # its name and DOI; no absolute path, file:// URI or mount point.
    assert desc["SourceDatasets"] == [{"URL": "bids:raw:", "Name": "r", "DOI": "doi:10.1/x"}]
    assert desc["DatasetLinks"] == {"raw": "../raw"}
    assert str(tmp_path) not in json.dumps(desc) and "file:" not in json.dumps(desc)
    assert (out / desc["DatasetLinks"]["raw"] / "dataset_description.json").is_file()
    assert (out / "logs").is_dir()
    (out / ".bidsignore").write_text("extra/\n*_dwi.bval\n")
    bids_dataset.init_derivatives_dataset(out, raw)  # idempotent, keeps user lines, no duplicates
    lines = (out / ".bidsignore").read_text().splitlines()
    assert lines[0] == "extra/" and lines.count("*_dwi.bval") == 1
    assert set(bids_dataset.BIDSIGNORE_LINES) <= set(lines)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(bids_dataset.OutputWriteError, match="cannot write"):
        bids_dataset.init_derivatives_dataset(blocker / "out", raw)


def test_container_info(monkeypatch):
    for var in ("BIDS_DMRI_LDM_IN_CONTAINER", "BIDS_DMRI_LDM_IMAGE", "APPTAINER_CONTAINER", "SINGULARITY_CONTAINER"):
        monkeypatch.delenv(var, raising=False)
    assert bids_dataset.container_info() is None
    monkeypatch.setenv("BIDS_DMRI_LDM_IN_CONTAINER", "1")
    assert bids_dataset.container_info() == {"Type": "docker", "Tag": f"bids-dmri-ldm:{deriv.__version__}"}
    # The image's own tag (Dockerfile: ENV BIDS_DMRI_LDM_IMAGE from the IMAGE_TAG build argument)
    monkeypatch.setenv("BIDS_DMRI_LDM_IMAGE", "ghcr.io/x/bids-dmri-ldm:9.9-cpu")
    assert bids_dataset.container_info() == {"Type": "docker", "Tag": "ghcr.io/x/bids-dmri-ldm:9.9-cpu"}
    monkeypatch.setenv("BIDS_DMRI_LDM_IMAGE", "")  # built without IMAGE_TAG
    assert bids_dataset.container_info()["Tag"] == f"bids-dmri-ldm:{deriv.__version__}"
    monkeypatch.setenv("APPTAINER_CONTAINER", "/x.sif")
    assert bids_dataset.container_info()["Type"] == "singularity"


def test_source_dataset_names_no_path(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    assert bids_dataset.source_dataset(raw) == {}  # no description: nothing claimed
    (raw / "dataset_description.json").write_text(json.dumps({"Name": "HCP", "DatasetVersion": "1.0"}))
    assert bids_dataset.source_dataset(raw) == {"Name": "HCP", "Version": "1.0"}
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert bids_dataset.dataset_link(raw, tmp_path / "a" / "b") == "../../raw"


def test_sidecar_content():
    prov = deriv.provenance_block({"Method": "rish-global", "Model": {"Name": "rish-global", "SHA256": "ab"}},
                                  {"Method": "rish-global", "Shell": 1000.0}, seed=3)
    meta = deriv.sidecar_metadata("dwi", sources=["bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"],
                                  spatial_reference="bids:raw:sub-01/dwi/sub-01_dwi.nii.gz", provenance=prov,
                                  resolution="1.05 mm")
    for key in ("Description", "Sources", "SpatialReference", "SkullStripped", "Resolution", "Method", "Model",
                "Settings", "Seed", "Software"):
        assert key in meta, key
    assert "SoftwareVersions" not in meta  # a BIDS key (scanner software, must be a string)
    for lib in ("python", "numpy", "torch", "dipy", "nibabel", "monai", "bids-dmri-ldm"):
        assert lib in meta["Software"]
    mask_meta = deriv.sidecar_metadata("mask", sources=[], spatial_reference="x", provenance=prov)
    assert mask_meta["Type"] == "Brain" and "Resolution" not in mask_meta


def test_completeness_and_settings(tmp_path):
    outputs = deriv.run_outputs(tmp_path, "sub-01_dwi.nii.gz")
    settings = {"Method": "identity", "Shell": 1000.0}
    assert not deriv.is_complete(outputs, settings)
    for path in outputs.all_files()[:-1]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert not deriv.is_complete(outputs)  # the DWI sidecar (written last) is missing
    deriv.atomic_write_json(outputs.sidecar("dwi"), {"Settings": settings})
    assert deriv.is_complete(outputs, settings)
    assert not deriv.is_complete(outputs, dict(settings, Method="rish-global"))
    assert len(deriv.remove_outputs(outputs)) == 12 and not deriv.existing_files(outputs)


def test_bids_uri_through_symbolic_links(tmp_path):
    """A file reached through a linked dataset root, or a link inside the dataset, is named
    by its place in the dataset, never by an absolute path."""
    real = tmp_path / "real"
    (real / "sub-01" / "dwi").mkdir(parents=True)
    target = real / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    target.write_bytes(b"x")
    alias = tmp_path / "alias"
    alias.symlink_to(real)
    assert bids_dataset.bids_uri(target, alias) == "bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"
    assert bids_dataset.bids_uri(alias / "sub-01" / "dwi" / "sub-01_dwi.nii.gz", real) == (
        "bids:raw:sub-01/dwi/sub-01_dwi.nii.gz")
    elsewhere = tmp_path / "data.nii.gz"
    elsewhere.write_bytes(b"x")
    link = real / "sub-01" / "dwi" / "sub-01_desc-x_dwi.nii.gz"
    link.symlink_to(elsewhere)
    assert bids_dataset.bids_uri(link, real) == "bids:raw:sub-01/dwi/sub-01_desc-x_dwi.nii.gz"
    with pytest.raises(ValueError):
        bids_dataset.bids_uri(elsewhere, real)


def test_output_names_keep_the_inputs_space_and_res(tmp_path):
    """A derivative input's space- (and its res- on the native grid) stay in every output name;
    a new grid's res- replaces the input's; desc- is the output's own."""
    qsiprep = "sub-21_ses-1_space-T1w_res-2_desc-preproc_dwi.nii.gz"
    native = deriv.run_outputs(tmp_path, qsiprep)
    assert native.path("dwi").name == "sub-21_ses-1_space-T1w_res-2_desc-7Tlike_dwi.nii.gz"
    assert native.path("scale").name == "sub-21_ses-1_space-T1w_res-2_model-rish_desc-scale_dwimap.nii.gz"
    resampled = deriv.run_outputs(tmp_path, qsiprep, res_label="1p05")
    names = [p.name for p in resampled.all_files(optional=True)]
    assert all(n.startswith("sub-21_ses-1_space-T1w_res-1p05_") for n in names), names
    assert "desc-preproc" not in " ".join(names)
    # raw inputs: no space-, as before; BIDS order puts space- before chunk- and res-
    assert deriv.run_outputs(tmp_path, "sub-01_run-1_dwi.nii.gz").path("mask").name == (
        "sub-01_run-1_desc-brain_mask.nii.gz")
    assert deriv.build_name({"sub": "1", "chunk": "2", "space": "T1w", "res": "2"}, "dwi", "") == (
        "sub-1_space-T1w_chunk-2_res-2_dwi")
