"""Workflow graphs are built (not run) from a fake run: nodes, edges, names, plans."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bids_dmri_ldm.config import RunConfig
from bids_dmri_ldm.interfaces.steps import InputDataError
from bids_dmri_ldm.workflows.base import init_single_run_wf, plan_run, run_settings
from bids_dmri_ldm.workflows.dwi import init_dwi_7tlike_wf
from bids_dmri_ldm.workflows.outputs import init_ds_7tlike_wf


@dataclass
class FakeRun:
    dwi: Path
    bval: Path
    bvec: Path
    entities: dict = field(default_factory=dict)
    mask: Path | None = None

    @property
    def stem(self) -> str:
        return self.dwi.name.replace("_dwi.nii.gz", "")


def _edges(wf):
    graph = wf._graph
    return {(u.name, v.name) for u, v in graph.edges()}


def test_dwi_wf_graph():
    wf = init_dwi_7tlike_wf(method="identity", output_resolution=1.05)
    names = set(wf.list_node_names())
    expected = {"inputnode", "outputnode", "select_shells", "load_dwi", "brain_mask", "fit_rish", "predict_scale",
                "resample", "scale_sh", "rebuild"}
    assert names == expected
    edges = _edges(wf)
    # The SH fit covers every voxel, so it does not wait for the mask; the mask decides lambda.
    assert ("brain_mask", "fit_rish") not in edges
    for edge in [("select_shells", "load_dwi"), ("select_shells", "fit_rish"), ("select_shells", "rebuild"), ("load_dwi", "brain_mask"), ("load_dwi", "fit_rish"),
                 ("brain_mask", "predict_scale"), ("fit_rish", "predict_scale"), ("predict_scale", "resample"), ("fit_rish", "resample"),
                 ("resample", "scale_sh"), ("resample", "rebuild"), ("rebuild", "outputnode")]:
        assert edge in edges, edge
    # The rebuild applies Eq. 3 itself: it runs beside the RISH maps' step, not after it.
    assert ("scale_sh", "rebuild") not in edges
    assert wf.get_node("resample").inputs.voxel_size == 1.05


def test_ds_wf_writes_dwi_last():
    wf = init_ds_7tlike_wf(output_dir="/out", source_file="/in/sub-01/dwi/sub-01_dwi.nii.gz", source_entities={},
                           sources=["bids:raw:sub-01/dwi/sub-01_dwi.nii.gz"],
                           spatial_reference="bids:raw:sub-01/dwi/sub-01_dwi.nii.gz", settings={"Method": "identity"})
    sinks = [n for n in wf.list_node_names() if n.startswith("ds_")]
    assert len(sinks) == 5
    edges = _edges(wf)
    chain = ["ds_rish_source", "ds_rish_predicted", "ds_scale", "ds_mask", "ds_dwi"]
    assert all((a, b) in edges for a, b in itertools.pairwise(chain))
    assert all(wf.get_node(s).overwrite for s in sinks)  # never served from the cache


def _config(ds, tmp_path, **kw) -> RunConfig:
    return RunConfig(bids_dir=ds.root, output_dir=tmp_path / "out", analysis_level="participant",
                     work_dir=tmp_path / "work", method="identity", **kw)


def test_plan_and_single_run_wf(bids_dataset, tmp_path):
    ds = bids_dataset
    run = FakeRun(ds.dwi_files[0], ds.root / "dwi.bval", ds.root / "dwi.bvec", {"subject": "01"})
    config = _config(ds, tmp_path, output_resolution=1.05)
    plan = plan_run(run, config)
    assert plan.res_label == "1p05" and "1.05 mm" in plan.resolution
    assert plan.sources == ["bids:raw:sub-01/dwi/sub-01_dwi.nii.gz", "bids:raw:dwi.bval", "bids:raw:dwi.bvec"]
    assert plan.outputs.path("dwi").name == "sub-01_res-1p05_desc-7Tlike_dwi.nii.gz"
    wf = init_single_run_wf(plan, config, run_settings(config, None))
    assert wf.name == "sub_01_dwi_wf"
    assert {"dwi_7tlike_wf", "ds_7tlike_wf"} <= {n.split(".")[0] for n in wf.list_node_names()}
    # The native grid (2 mm input at 2 mm) gets no res- entity.
    native = plan_run(run, _config(ds, tmp_path, output_resolution=2.0))
    assert native.res_label is None and native.outputs.path("dwi").name == "sub-01_desc-7Tlike_dwi.nii.gz"


def test_plan_refuses_bad_run(bids_dataset, tmp_path):
    ds = bids_dataset
    run = FakeRun(ds.dwi_files[0], ds.root / "dwi.bval", ds.root / "dwi.bvec")
    with pytest.raises(InputDataError, match=r"--shell 5000: no shell within 100 s/mm² \(shells available: "
                                             r"1000 \(30 directions\), 2000 \(6\)\)"):
        plan_run(run, _config(ds, tmp_path, shells=[5000.0]))
