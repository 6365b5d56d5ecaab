"""Shells of a gradient table and the fate of each volume (core/shells.py): known answers."""
from __future__ import annotations

import numpy as np
import pytest

from bids_dmri_ldm.core.gradients import GradientError
from bids_dmri_ldm.core.shells import (
    MEAN_B0,
    VolumePlan,
    check_output_table,
    cluster_shells,
    find_shell,
    load_output_table,
    plan_volumes,
)


def _dirs(n: int, twist: float = 0.0) -> np.ndarray:
    i = np.arange(n) + 0.5
    z = 1 - i / n
    phi = np.pi * (1 + 5**0.5) * i + twist
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def hcp_like(n1000=30, n2000=30, n3000=0):
    """b0s interleaved (b = 0 and 5), shells interleaved with scanner-like spread (990-1010...)."""
    rng = np.random.default_rng(1)
    shells = [(1000.0, n1000), (2000.0, n2000), (3000.0, n3000)]
    bvals, bvecs = [0.0], [np.zeros(3)]
    rows = []
    for b, n in shells:
        for g, d in enumerate(_dirs(n, twist=b / 1000)):
            rows.append((g, b + rng.choice([-10.0, -5.0, 0.0, 5.0]), d))
    rows.sort(key=lambda r: r[0])  # interleave the shells, as HCP does
    for k, (_, b, d) in enumerate(rows):
        bvals.append(b)
        bvecs.append(d)
        if k % 20 == 19:
            bvals.append(5.0)
            bvecs.append(np.zeros(3))
    return np.array(bvals), np.array(bvecs)


def test_cluster_shells_hcp_like_spread():
    bvals, _ = hcp_like(n3000=30)
    shells = cluster_shells(bvals, tolerance=100)
    assert [round(s.bval, -1) for s in shells] == [1000, 2000, 3000]
    assert [s.n_volumes for s in shells] == [30, 30, 30]
    assert all(bvals[s.index].max() - bvals[s.index].min() <= 15 for s in shells)
    assert sorted(np.concatenate([s.index for s in shells]).tolist()) == np.flatnonzero(bvals > 50).tolist()
    assert shells[0].bval_range[0] >= 990 and shells[0].bval_range[1] <= 1005
    # a tolerance below the spread splits a shell; above the gap between shells merges them
    assert len(cluster_shells(bvals, tolerance=4)) > 3
    assert len(cluster_shells(bvals, tolerance=2100)) == 1
    assert find_shell(shells, 2050, 100) == 1 and find_shell(shells, 2500, 100) is None
    assert cluster_shells(np.array([0.0, 5.0]), 100) == []


def test_default_plan_keeps_every_volume_in_the_input_order():
    bvals, bvecs = hcp_like(n2000=30)
    bvals = np.append(bvals, [500.0] * 6)  # a shell with too few directions for order 4: carried
    bvecs = np.vstack([bvecs, _dirs(6)])
    plan = plan_volumes(bvals, bvecs)
    assert [(round(p.bval, -1), p.fitted, p.translated) for p in plan.shells] == [
        (500, False, False), (1000, True, True), (2000, True, True)]
    np.testing.assert_array_equal(plan.out_bvals, bvals)
    np.testing.assert_array_equal(plan.out_bvecs, bvecs)
    b0 = bvals <= 50
    few = bvals == 500
    np.testing.assert_array_equal(plan.out_source[b0 | few], np.flatnonzero(b0 | few))  # carried as they are
    assert np.all(plan.out_shell[b0 | few] == -1)
    np.testing.assert_array_equal(plan.out_shell[np.abs(bvals - 1000) < 50], 0)  # the fitted shells, ascending
    np.testing.assert_array_equal(plan.out_shell[np.abs(bvals - 2000) < 50], 1)
    assert plan.read_index.tolist() == list(range(bvals.size))
    assert plan.mask_index.tolist() == np.flatnonzero(few).tolist()  # the lowest shell helps the mask
    assert len(plan.warnings) == 1 and "b=500 shell (6 volumes) is carried through unchanged" in plan.warnings[0]
    records = plan.shell_records()
    assert [r["MapShellIndex"] for r in records] == [None, 0, 1]
    assert records[1]["BValueRange"][0] >= 990 and records[1]["InputVolumes"] == 30
    again = VolumePlan.from_dict(plan.to_dict())
    np.testing.assert_array_equal(again.out_shell, plan.out_shell)
    assert again.shell_records() == records and again.warnings == plan.warnings


def test_model_coverage_and_shell_selection():
    bvals, bvecs = hcp_like(n3000=30)
    # a model trained for b=1000: the other shells are passed through (lambda = 1) with a warning
    plan = plan_volumes(bvals, bvecs, covered=[1000.0], model_label="the rish-global model")
    assert [p.translated for p in plan.shells] == [True, False, False]
    assert all(p.fitted for p in plan.shells)  # passed through, still SH-fitted (RISH maps, rebuild)
    assert len(plan.warnings) == 2 and all("passed through unscaled (lambda = 1): the rish-global model was "
                                           "trained for b=1000 s/mm²" in w for w in plan.warnings)
    # --shell selects what is translated; the rest is passed through with a note, not a warning
    plan = plan_volumes(bvals, bvecs, selected=[2000.0], covered=[1000.0, 2000.0])
    assert [p.translated for p in plan.shells] == [False, True, False]
    assert len(plan.warnings) == 1 and plan.warnings[0].startswith("the b=299")
    assert "(30 volumes) is passed through unscaled (lambda = 1): the model was trained for b=1000/2000" \
        in plan.warnings[0]
    assert any("not selected by --shell" in n for n in plan.notes)
    # a model none of whose shells the run has: refused, naming both
    with pytest.raises(GradientError, match=r"the cnn model was trained for b=2500 s/mm², and no shell this run "
                                            r"translates matches it \(shells available: 99\d \(30 directions\), "
                                            r"199\d \(30\), 299\d \(30\)\)"):
        plan_volumes(bvals, bvecs, covered=[2500.0], model_label="the cnn model")
    with pytest.raises(GradientError, match=r"--shell 4000: no shell within 100 s/mm² \(shells available"):
        plan_volumes(bvals, bvecs, selected=[4000.0])


def test_shells_with_too_few_directions():
    bvals = np.r_[0, np.full(10, 1000.0), np.full(20, 2000.0)]
    bvecs = np.vstack([np.zeros(3), _dirs(10), _dirs(20)])
    plan = plan_volumes(bvals, bvecs)  # b=1000 is carried, b=2000 fitted
    assert [p.fitted for p in plan.shells] == [False, True]
    with pytest.raises(GradientError, match="the b=1000 shell has 10 directions; SH order 4"):
        plan_volumes(bvals, bvecs, selected=[1000.0])
    with pytest.raises(GradientError, match="the b=1000 shell has 10 directions; SH order 4"):
        plan_volumes(bvals, bvecs, covered=[1000.0])  # the only shell the model covers cannot be fitted
    assert plan_volumes(bvals, bvecs, sh_order_max=2).shells[0].fitted  # order 2 needs 6


def test_output_table_plan():
    bvals, bvecs = hcp_like(n3000=30)
    out_b = np.r_[0, 0, 0, np.full(30, 1000.0), np.full(30, 2000.0)]
    out_g = np.vstack([np.zeros((3, 3)), _dirs(30, 0.3), _dirs(30, 0.7)])
    plan = plan_volumes(bvals, bvecs, output_table=(out_b, out_g))
    assert plan.given_table and plan.out_bvals.size == 63
    np.testing.assert_array_equal(plan.out_source[:3], MEAN_B0)
    np.testing.assert_array_equal(plan.out_shell, np.r_[[-1] * 3, [0] * 30, [1] * 30])
    assert [p.used for p in plan.shells] == [True, True, False]  # b=3000 is not written, not fitted
    assert [p.bval for p in plan.fitted] == [plan.shells[0].bval, plan.shells[1].bval]
    assert any("not in the --output-gradients table" in n for n in plan.notes)
    assert 2 * 30 + plan.b0_index.size == plan.read_index.size
    with pytest.raises(GradientError, match=r"asks for b=2500 s/mm², which this run lacks \(shells available: "):
        plan_volumes(bvals, bvecs, output_table=(np.r_[0, np.full(30, 2500.0)], np.vstack([np.zeros(3), _dirs(30)])))


def test_output_table_checks(tmp_path):
    good = np.vstack([np.zeros(3), _dirs(3)])
    np.testing.assert_allclose(np.linalg.norm(check_output_table(np.r_[0, 1000, 1000, 1000], good)[1:], axis=1), 1)
    with pytest.raises(GradientError, match="the bval file has 3 entries but the bvec file has 4"):
        check_output_table(np.r_[0, 1000, 1000], good)
    with pytest.raises(GradientError, match="must be unit vectors"):
        check_output_table(np.r_[0, 1000, 1000, 1000], good * 0.5)
    (tmp_path / "t.bval").write_text("0 1000\n")
    (tmp_path / "t.bvec").write_text("0 1\n0 0\n0 0\n")
    bvals, bvecs = load_output_table(tmp_path / "t.bval", tmp_path / "t.bvec")
    assert bvals.tolist() == [0, 1000] and bvecs[1].tolist() == [1, 0, 0]
