"""Known-answer checks of the analysis helpers the benchmarks' tables rest on."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pair(factors, label, shape=(6, 7, 5)):
    """A 3T/7T pair on one grid whose voxel-wise lambda_l (Eq. 2) is ``factors[l]`` everywhere."""
    rng = np.random.default_rng(sum(map(ord, label)))
    source = rng.uniform(0.5, 1.5, shape + (3,)).astype(np.float32)
    target = source * np.asarray(factors, np.float32) ** 2
    mask = np.ones(shape, bool)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return (SimpleNamespace(rish=source, mask=mask, affine=affine, participant=label),
            SimpleNamespace(rish=target, mask=mask, affine=affine))


def test_in_domain_factors_leave_each_participant_out():
    bench = _module("bench_fidelity")
    lambdas = [(0.9, 0.8, 0.7), (0.95, 0.85, 0.75), (1.0, 0.9, 0.8)]
    pairs, targets = zip(*(_pair(f, f"p{k}") for k, f in enumerate(lambdas)))
    folds = bench.in_domain_factors(list(pairs), list(targets))
    # each fold pools the other two pairs' voxels: sqrt(sum 7T RISH / sum 3T RISH) over both
    for k, fold in enumerate(folds):
        others = [j for j in range(len(lambdas)) if j != k]
        source = np.concatenate([pairs[j].rish.reshape(-1, 3) for j in others])
        target = np.concatenate([targets[j].rish.reshape(-1, 3) for j in others])
        np.testing.assert_allclose(fold, np.sqrt(target.sum(0) / source.sum(0)), rtol=1e-5)
        assert min(lambdas[j][0] for j in others) < fold[0] < max(lambdas[j][0] for j in others)
    # the left-out participant never enters its own fold
    assert folds[0] != pytest.approx(np.mean(lambdas, axis=0), rel=1e-4)


def test_in_domain_factors_need_two_pairs():
    bench = _module("bench_fidelity")
    pair, target = _pair((0.9, 0.8, 0.7), "only")
    assert bench.in_domain_factors([pair], [target]) == [None]
