"""Evaluation (paper Table 1 metrics): pure scoring with known answers, file discovery, CLI codes.

The synthetic data are a smooth single-tensor field defined in world coordinates (mm), sampled on
two different grids (a "7T" grid and a "prediction" grid with another voxel size, origin and
field of view), so a prediction that holds the same world content must score almost perfectly
once its maps are resampled into the 7T grid.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm.cli.exitcodes import EX_DATAERR, EX_NO_DATA, EX_NOINPUT, EX_USAGE
from bids_dmri_ldm.core.resample import resample_mask
from bids_dmri_ldm.evaluation import cli as evaluate
from bids_dmri_ldm.evaluation import discovery, scoring
from bids_dmri_ldm.evaluation.report import ScoreRow, to_markdown, to_tsv

# --------------------------------------------------------------------------- synthetic data
SEVEN_T_GRID = (np.diag([1.5, 1.5, 1.5, 1.0]), (14, 14, 14))
PRED_GRID = (np.diag([1.2, 1.2, 1.2, 1.0]), (20, 20, 20))
SEVEN_T_GRID[0][:3, 3] = -9.75  # voxel centres -9.75 .. 9.75 mm
PRED_GRID[0][:3, 3] = [-11.5, -11.9, -11.3]  # a larger field of view, shifted by a fraction of a voxel
EIGENVALUES = (1.6e-3, 0.4e-3, 0.4e-3)  # mm²/s


def directions(n: int, twist: float = 0.0) -> np.ndarray:
    """``n`` near-uniform unit vectors on a hemisphere (Fibonacci), rotated by ``twist`` about z."""
    i = np.arange(n) + 0.5
    z = 1.0 - i / n
    phi = np.pi * (1.0 + 5**0.5) * i + twist
    r = np.sqrt(1.0 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def gradient_table(n_b0: int, n_dirs: int, twist: float, n_b2000: int = 0):
    bvals = np.concatenate([np.zeros(n_b0), np.full(n_dirs, 1000.0), np.full(n_b2000, 2000.0)])
    bvecs = np.concatenate([np.zeros((n_b0, 3)), directions(n_dirs, twist), directions(n_b2000, 1.0)[:n_b2000]])
    return bvals, bvecs


def world(affine: np.ndarray, shape) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def tensor_field_dwi(affine, shape, bvals, bvecs, dw_scale: float = 1.0, background: float = 1.0):
    """Noiseless DWI of a smooth world-space tensor field, (X, Y, Z, N) float32.

    Fibre direction turns slowly with x and z; FA and S0 vary smoothly. Inside a 12 mm sphere the
    tensor is anisotropic; beyond it the anisotropy fades smoothly (``background`` scales S0 there
    so a b0 mask can find the "brain"). ``dw_scale`` multiplies the diffusion-weighted volumes.
    """
    xyz = world(affine, shape)
    radius = np.linalg.norm(xyz, axis=-1)
    angle = 0.08 * xyz[..., 0] + 0.05 * xyz[..., 2]
    e1 = np.stack([np.cos(angle), np.sin(angle), np.zeros_like(angle)], axis=-1)
    weight = np.clip(1.2 - radius / 12.0, 0.0, 1.0)[..., None]  # anisotropy fades outwards
    l1, l2 = EIGENVALUES[0], EIGENVALUES[1]
    md = (l1 + 2 * l2) / 3
    lam_par = md + weight[..., 0] * (l1 - md)
    lam_perp = md + weight[..., 0] * (l2 - md)
    cos2 = np.einsum("...i,ni->...n", e1, bvecs) ** 2
    adc = lam_perp[..., None] + (lam_par - lam_perp)[..., None] * cos2
    s0 = 800.0 + 100.0 * np.sin(xyz[..., 1] / 6.0)
    s0 = np.where(radius <= 9.5, s0, s0 * background)
    signal = s0[..., None] * np.exp(-bvals * adc)
    signal[..., bvals > 50] *= dw_scale
    return signal.astype(np.float32)


def inner_sphere(affine, shape, radius: float = 8.0) -> np.ndarray:
    return np.linalg.norm(world(affine, shape), axis=-1) <= radius


def save_dwi(stem: Path, data, affine, bvals, bvecs, sidecar=None) -> Path:
    stem.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), f"{stem}.nii.gz")
    Path(f"{stem}.bval").write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    Path(f"{stem}.bvec").write_text("\n".join(" ".join(f"{v:.8f}" for v in row) for row in bvecs.T) + "\n")
    if sidecar is not None:
        Path(f"{stem}.json").write_text(json.dumps(sidecar))
    return Path(f"{stem}.nii.gz")


def write_truth(root: Path, subjects=("01", "02"), with_simulation: bool = False, background: float = 1.0) -> Path:
    """Raw BIDS dataset with a 7T run (ses-7T) and a 3T run (ses-3T, never scored) per subject."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "truth", "BIDSVersion": "1.9.0"}))
    affine, shape = SEVEN_T_GRID
    bvals, bvecs = gradient_table(3, 40, 0.3, n_b2000=8)
    for sub in subjects:
        data = tensor_field_dwi(affine, shape, bvals, bvecs, background=background)
        save_dwi(root / f"sub-{sub}/ses-7T/dwi/sub-{sub}_ses-7T_dwi", data, affine, bvals, bvecs,
                 {"MagneticFieldStrength": 7, "EchoTime": 0.0712})
        save_dwi(root / f"sub-{sub}/ses-3T/dwi/sub-{sub}_ses-3T_dwi", data[::2, ::2, ::2], affine * [[2], [2], [2], [1]],
                 bvals, bvecs, {"MagneticFieldStrength": 3, "EchoTime": 0.0895})
        if with_simulation:
            folder = root / "derivatives/simulation" / f"sub-{sub}/ses-7T/dwi"
            folder.mkdir(parents=True, exist_ok=True)
            truth_maps = scoring.diffusion_maps(data, bvals, bvecs, np.ones(shape, bool))[..., :3]
            nib.save(nib.Nifti1Image(truth_maps, affine), folder / f"sub-{sub}_ses-7T_model-truth_param-rish_dwimap.nii.gz")
            nib.save(nib.Nifti1Image(inner_sphere(affine, shape).astype(np.uint8), affine),
                     folder / f"sub-{sub}_ses-7T_desc-brain_mask.nii.gz")
    return root


def write_predictions(root: Path, subjects=("01", "02"), dw_scale: float = 1.0, method: str = "identity",
                      support_radius: float | None = None) -> Path:
    """Derivative dataset of ``*_desc-7Tlike_dwi`` on the prediction grid (same world content).

    ``support_radius`` (mm): DW volumes are zero beyond it, as the participant level writes zeros
    outside its brain mask.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "pred", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "x"}]})
    )
    affine, shape = PRED_GRID
    bvals, bvecs = gradient_table(2, 30, 1.1)
    for sub in subjects:
        data = tensor_field_dwi(affine, shape, bvals, bvecs, dw_scale=dw_scale)
        if support_radius is not None:
            data[~inner_sphere(affine, shape, support_radius)] *= (bvals <= 50)
        save_dwi(root / f"sub-{sub}/ses-3T/dwi/sub-{sub}_ses-3T_res-1p2_desc-7Tlike_dwi", data, affine, bvals, bvecs,
                 {"Method": method})
    return root


# --------------------------------------------------------------------------- pure scoring
def test_identical_maps_score_perfectly_and_scaled_maps_have_known_nmse():
    rng = np.random.default_rng(0)
    from scipy.ndimage import gaussian_filter

    ref = np.stack([gaussian_filter(rng.uniform(0.5, 1.5, (14, 14, 14)), 1.5) for _ in range(4)], axis=-1)
    mask = np.zeros((14, 14, 14), bool)
    mask[2:12, 2:12, 2:12] = True
    perfect = scoring.score_maps(ref, ref, mask)
    assert set(perfect) == set(scoring.score_columns())
    for name in scoring.MAP_NAMES:
        assert perfect[f"nmse_{name}"] == 0.0
        assert perfect[f"ssim_{name}"] == pytest.approx(1.0, abs=1e-5)
    scaled = scoring.score_maps(1.1 * ref, ref, mask)
    for name in scoring.MAP_NAMES:
        assert scaled[f"nmse_{name}"] == pytest.approx(0.01, rel=1e-6)  # (a - 1)^2
        assert scaled[f"ssim_{name}"] < 1.0
    # values outside the mask never count
    outside = ref.copy()
    outside[~mask] = 99.0
    assert scoring.score_maps(outside, ref, mask)["nmse_L0"] == 0.0


def test_undefined_metrics_are_nan_not_errors():
    ref = np.ones((8, 8, 8, 1))
    scores = scoring.score_maps(ref, ref, np.ones((8, 8, 8), bool), names=("L0",))
    assert scores["nmse_L0"] == 0.0 and math.isnan(scores["ssim_L0"])  # constant reference: SSIM undefined
    with pytest.raises(ValueError, match="empty"):
        scoring.score_maps(ref, ref, np.zeros((8, 8, 8), bool), names=("L0",))


def test_diffusion_maps_known_answers():
    """Isotropic voxel: RISH L0 = 4π exp(-2bD), L2 = L4 = FA = 0. Tensor voxel: FA analytic.
    DW volumes scaled by a: RISH scales by a² (NMSE (a² - 1)²), FA of the tensor unchanged."""
    bvals, bvecs = gradient_table(2, 40, 0.0)
    shape = (3, 3, 3)
    d_iso = 0.9e-3
    iso = np.broadcast_to(1000.0 * np.exp(-bvals * d_iso), shape + (bvals.size,)).astype(np.float32)
    maps = scoring.diffusion_maps(iso, bvals, bvecs, np.ones(shape, bool))
    np.testing.assert_allclose(maps[..., 0], 4 * np.pi * np.exp(-2 * 1000 * d_iso), rtol=1e-4)
    np.testing.assert_allclose(maps[..., 1:], 0.0, atol=1e-5)

    l1, l2 = EIGENVALUES[:2]
    adc = l2 + (l1 - l2) * bvecs[:, 0] ** 2  # fibre along x
    tensor = np.broadcast_to(1000.0 * np.exp(-bvals * adc), shape + (bvals.size,)).astype(np.float32)
    fa_true = (l1 - l2) / np.sqrt(l1**2 + 2 * l2**2)
    maps = scoring.diffusion_maps(tensor, bvals, bvecs, np.ones(shape, bool))
    np.testing.assert_allclose(maps[..., 3], fa_true, atol=1e-3)
    assert np.all(maps[..., 2] > 1e-4)  # anisotropic: L4 present

    scale = 0.8
    scaled = tensor.copy()
    scaled[..., bvals > 50] *= scale
    maps_scaled = scoring.diffusion_maps(scaled, bvals, bvecs, np.ones(shape, bool))
    np.testing.assert_allclose(maps_scaled[..., :3], scale**2 * maps[..., :3], rtol=1e-4)
    scores = scoring.score_maps(maps_scaled[..., :3], maps[..., :3], np.ones(shape, bool), names=scoring.RISH_NAMES)
    for name in scoring.RISH_NAMES:
        assert scores[f"nmse_{name}"] == pytest.approx((scale**2 - 1) ** 2, rel=1e-3)


def test_fov_mask_and_fit_region():
    ref_affine, ref_shape = np.eye(4), (10, 10, 10)
    src_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    src_affine[:3, 3] = [4.0, 0.0, 0.0]
    inside = scoring.fov_mask(ref_affine, ref_shape, src_affine, (2, 10, 10))
    # source voxels 0..1 along x cover world x in [3, 7]: reference voxels 3..7
    assert inside[:, 0, 0].tolist() == [False] * 3 + [True] * 5 + [False] * 2
    assert inside[5].all()
    mask = np.zeros(ref_shape, bool)
    mask[4:6, 4:6, 4:6] = True
    region = scoring.fit_region(mask, ref_affine, np.eye(4), ref_shape, margin=2)
    assert region[mask].all() and region.sum() == 6**3


def test_prediction_on_another_grid_scores_nearly_perfectly():
    """Same world content on two grids: after resampling into the 7T grid, NMSE ~ 0 and SSIM ~ 1.

    One gradient table for both, so only the grids differ (different direction sets change L4 of
    an order-4 fit of a tensor by a few per cent — the truncated higher orders alias differently).
    """
    ref_affine, ref_shape = SEVEN_T_GRID
    src_affine, src_shape = PRED_GRID
    bvals7, bvecs7 = gradient_table(3, 40, 0.3)
    bvals3, bvecs3 = bvals7, bvecs7
    mask = inner_sphere(ref_affine, ref_shape)
    ref = scoring.diffusion_maps(tensor_field_dwi(ref_affine, ref_shape, bvals7, bvecs7), bvals7, bvecs7, mask)
    region = scoring.fit_region(mask, ref_affine, src_affine, src_shape)
    src_maps = scoring.diffusion_maps(tensor_field_dwi(src_affine, src_shape, bvals3, bvecs3), bvals3, bvecs3, region)
    on_ref = scoring.maps_on_grid(src_maps, src_affine, ref_affine, ref_shape)
    scores = scoring.score_maps(on_ref, ref, mask)
    for name in scoring.MAP_NAMES:
        assert scores[f"nmse_{name}"] < 1e-3, (name, scores)
        assert scores[f"ssim_{name}"] > 0.99, (name, scores)
    # the same maps left unresampled (wrong grid, cropped to the 7T shape) score clearly worse
    wrong = scoring.score_maps(src_maps[:14, :14, :14], ref, mask)
    assert wrong["nmse_L0"] > 10 * scores["nmse_L0"]


def test_fill_invalid_keeps_the_edge_of_a_masked_prediction_unbiased():
    """A prediction that is zero outside its brain mask: filling by nearest valid value before the
    cubic resampling keeps edge voxels within 2 % of the truth; resampling the zeros does not."""
    src_affine, src_shape = PRED_GRID
    ref_affine, ref_shape = SEVEN_T_GRID
    smooth = lambda xyz: 1.0 + 0.02 * xyz[..., 0] - 0.01 * xyz[..., 1]
    valid = inner_sphere(src_affine, src_shape, 7.0)
    masked = np.where(valid, smooth(world(src_affine, src_shape)), 0.0)[..., None].astype(np.float32)
    truth = smooth(world(ref_affine, ref_shape))
    support = resample_mask(valid, src_affine, ref_affine, ref_shape)
    filled = scoring.maps_on_grid(scoring.fill_invalid(masked, valid), src_affine, ref_affine, ref_shape)[..., 0]
    zeros = scoring.maps_on_grid(masked, src_affine, ref_affine, ref_shape)[..., 0]
    assert np.abs(filled - truth)[support].max() < 0.02
    assert np.abs(zeros - truth)[support].max() > 0.1
    tiny = scoring.fill_invalid(np.array([2.0, 0.0, 0.0, 5.0]).reshape(4, 1, 1, 1), np.array([1, 0, 0, 1], bool).reshape(4, 1, 1))
    assert tiny.ravel().tolist() == [2.0, 2.0, 5.0, 5.0]


def test_summarise_mean_and_sample_sd():
    mean, sd = scoring.summarise([{"a": 1.0}, {"a": 3.0}, {"a": math.nan}], ["a", "b"])
    assert mean["a"] == 2.0 and sd["a"] == pytest.approx(math.sqrt(2.0))
    assert math.isnan(mean["b"]) and math.isnan(sd["b"])


def test_tables_hold_rows_and_summaries():
    columns = scoring.score_columns()
    rows = [
        ScoreRow("01", "3T", "ldm", "7T", "simulation", 100, dict.fromkeys(columns, 0.1)),
        ScoreRow("02", "3T", "ldm", "7T", "simulation", 90, dict.fromkeys(columns, 0.3)),
    ]
    tsv = to_tsv(rows).splitlines()
    assert tsv[0].split("\t")[:6] == ["participant_id", "session", "method", "reference", "mask", "n_voxels"]
    assert [line.split("\t")[0] for line in tsv[1:]] == ["sub-01", "sub-02", "mean", "sd"]
    mean_row = dict(zip(tsv[0].split("\t"), tsv[3].split("\t")))
    assert float(mean_row["nmse_L0"]) == pytest.approx(0.2)
    md = to_markdown(rows)
    assert "| ldm | 2 | 0.200 ± 0.141 |" in md and "NMSE FA" in md and "SSIM L4" in md
    assert "*0.105*" not in md and "| *LDM (Zhu et al. 2024), paper* | 17 | *0.105* |" in to_markdown(rows, paper_rows=True)


def test_discovery_parses_names_and_field_strength(tmp_path):
    assert discovery.parse_entities("sub-01_ses-3T_res-1p05_desc-7Tlike_dwi.nii.gz") == {
        "sub": "01", "ses": "3T", "res": "1p05", "desc": "7Tlike"}
    assert discovery.strip_prefix("sub-01") == "01" and discovery.strip_prefix("01") == "01"
    assert discovery._is_seven_tesla({"MagneticFieldStrength": "7.0"}, {}) == (True, 7.0)
    assert discovery._is_seven_tesla({"MagneticFieldStrength": 3}, {"session": "7T"}) == (False, 3.0)
    assert discovery._is_seven_tesla({}, {"session": "7T"}) == (True, None)
    preds = write_predictions(tmp_path / "pred", subjects=("01", "02"))
    (preds / "sub-02/ses-3T/dwi/sub-02_ses-3T_res-1p2_desc-7Tlike_dwi.bvec").unlink()  # incomplete: skipped
    found = discovery.find_predictions(preds)
    assert [(p.participant, p.session, p.method) for p in found] == [("01", "3T", "identity")]
    assert discovery.find_predictions(preds, ["02"]) == []


# --------------------------------------------------------------------------- command line
def read_tsv(path: Path) -> list[dict]:
    header, *lines = path.read_text().splitlines()
    return [dict(zip(header.split("\t"), line.split("\t"))) for line in lines]


def test_cli_scores_methods_against_7t_and_noiseless_truth(tmp_path, capsys):
    truth = write_truth(tmp_path / "truth", subjects=("01", "02"), with_simulation=True)
    good = write_predictions(tmp_path / "good", subjects=("01", "02", "03"), method="identity")
    scaled = write_predictions(tmp_path / "scaled", subjects=("01", "02"), dw_scale=0.9, method="rish-global",
                               support_radius=7.0)
    out = tmp_path / "eval" / "scores.tsv"
    code = evaluate.main([str(good), str(scaled), str(truth), "--out", str(out), "--label", "same", "scaled"])
    assert code == 0, capsys.readouterr().err
    rows = read_tsv(out)
    scored = [r for r in rows if r["participant_id"].startswith("sub-")]
    assert sorted({r["participant_id"] for r in scored}) == ["sub-01", "sub-02"]  # sub-03 has no 7T scan
    assert {(r["method"], r["reference"]) for r in scored} == {
        ("same", "7T"), ("same", "noiseless7T"), ("scaled", "7T"), ("scaled", "noiseless7T")}
    assert {r["mask"] for r in rows} == {"simulation"}
    # both methods are scored on the same voxels: the 7T mask (8 mm sphere) where every prediction
    # has signal (the scaled one only within 7 mm)
    mask_voxels = int(inner_sphere(*SEVEN_T_GRID).sum())
    n_scored = {int(r["n_voxels"]) for r in scored}
    assert len(n_scored) == 1
    assert abs(n_scored.pop() - inner_sphere(*SEVEN_T_GRID, 7.0).sum()) < 0.1 * mask_voxels
    assert {float(r["coverage"]) for r in scored} == {round(int(scored[0]["n_voxels"]) / mask_voxels, 4)}
    by = {(r["participant_id"], r["method"], r["reference"]): r for r in rows}
    for sub in ("sub-01", "sub-02"):
        same = by[(sub, "same", "7T")]
        assert float(same["nmse_L0"]) < 2e-3 and float(same["ssim_FA"]) > 0.98
        # DW volumes x 0.9 -> RISH x 0.81: NMSE ~ (0.81 - 1)^2 = 0.0361 against both references
        for reference in ("7T", "noiseless7T"):
            assert float(by[(sub, "scaled", reference)]["nmse_L2"]) == pytest.approx(0.0361, rel=0.1)
        assert by[(sub, "same", "noiseless7T")]["nmse_FA"] == "n/a"  # no noiseless FA in the truth
    assert by[("mean", "scaled", "7T")]["n_voxels"] == "2"
    assert by[("sd", "scaled", "7T")]["nmse_L0"] != "n/a"
    md = (tmp_path / "eval" / "scores.md").read_text()
    assert "### Against the participant's real 7T scan" in md and "| scaled | 2 |" in md
    assert "noiseless 7T ground truth" in md and "simulator's ground-truth brain mask" in md


def test_cli_b0_mask_and_markdown_to_stdout(tmp_path, capsys):
    truth = write_truth(tmp_path / "truth", subjects=("01",), background=0.05)  # dark outside a 9.5 mm sphere
    preds = write_predictions(tmp_path / "pred", subjects=("01",))
    code = evaluate.main([str(preds), str(truth), "--participant-label", "sub-01"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "the automatic brain mask (core.mask) of the 7T scan's mean b0" in captured.out
    assert "| identity | 1 |" in captured.out  # method read from the prediction's sidecar


def test_cli_usage_and_missing_input_codes(tmp_path, capsys):
    truth = write_truth(tmp_path / "truth", subjects=("01",))
    preds = write_predictions(tmp_path / "pred", subjects=("01",))
    assert evaluate.main(["--no-such-option"]) == EX_USAGE
    assert evaluate.main([str(preds)]) == EX_USAGE  # TRUTH_BIDS missing
    assert evaluate.main([str(preds), str(truth), "--label", "a", "b"]) == EX_USAGE
    assert evaluate.main([str(preds), str(preds), str(truth)]) == EX_USAGE  # same folder twice
    assert evaluate.main([str(tmp_path / "missing"), str(truth)]) == EX_NOINPUT
    assert evaluate.main([str(preds), str(tmp_path / "missing")]) == EX_NOINPUT
    assert evaluate.main([str(preds), str(truth), "--participant-label", "99"]) == EX_NOINPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("python -m bids_dmri_ldm.evaluate: error: ") for line in err) and len(err) == 7
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--help"])
    assert exc.value.code == 0


def test_cli_no_pairs_names_what_was_found(tmp_path, capsys):
    truth = write_truth(tmp_path / "truth", subjects=("01",))
    preds = write_predictions(tmp_path / "pred", subjects=("05",))
    assert evaluate.main([str(preds), str(truth)]) == EX_NO_DATA
    err = capsys.readouterr().err
    assert "predictions found for sub-05" in err and "7T runs" in err and "sub-01" in err
    assert len(err.strip().splitlines()) == 1


def test_cli_bad_prediction_is_reported_and_the_others_are_written(tmp_path, capsys):
    truth = write_truth(tmp_path / "truth", subjects=("01", "02"))
    preds = write_predictions(tmp_path / "pred", subjects=("01", "02"))
    (preds / "sub-02/ses-3T/dwi/sub-02_ses-3T_res-1p2_desc-7Tlike_dwi.bval").write_text("0 1000\n")  # count mismatch
    out = tmp_path / "scores.tsv"
    assert evaluate.main([str(preds), str(truth), "--out", str(out)]) == EX_DATAERR
    assert "sub-02_ses-3T_res-1p2_desc-7Tlike_dwi.nii.gz" in capsys.readouterr().err
    assert [r["participant_id"] for r in read_tsv(out)] == ["sub-01", "mean", "sd"]


def test_cli_untouched_3t_row_scores_the_raw_3t_scan(tmp_path, capsys):
    """--untouched-3t adds each participant's raw 3T run (same world content here, on a grid twice
    as coarse) as a reference row, scored on the same voxels as the predictions."""
    truth = write_truth(tmp_path / "truth", subjects=("01",))
    preds = write_predictions(tmp_path / "pred", subjects=("01",), dw_scale=0.9)
    out = tmp_path / "scores.tsv"
    assert evaluate.main([str(preds), str(truth), "--out", str(out), "--untouched-3t"]) == 0, capsys.readouterr().err
    rows = {(r["participant_id"], r["method"]): r for r in read_tsv(out) if r["reference"] == "7T"}
    untouched, pred = rows[("sub-01", discovery.UNTOUCHED)], rows[("sub-01", "identity")]
    assert untouched["n_voxels"] == pred["n_voxels"]
    assert untouched["prediction"] == "sub-01/ses-3T/dwi/sub-01_ses-3T_dwi.nii.gz"
    assert float(untouched["nmse_L0"]) < 0.02 < float(pred["nmse_L2"])  # the 0.9-scaled one is worse


def test_python_m_evaluate_entry_point_still_works():
    """``python -m bids_dmri_ldm.evaluate`` (docs, benchmarks and users call it) runs the command
    line of :mod:`bids_dmri_ldm.evaluation.cli`."""
    import subprocess
    import sys

    from bids_dmri_ldm import __version__
    from bids_dmri_ldm.evaluate import main

    assert main is evaluate.main
    done = subprocess.run([sys.executable, "-m", "bids_dmri_ldm.evaluate", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and __version__ in done.stdout + done.stderr
