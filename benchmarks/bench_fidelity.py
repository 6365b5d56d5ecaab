#!/usr/bin/env python3
"""Fidelity benchmark: every method trained by the group level, scored on held-out subjects.

    python benchmarks/bench_fidelity.py OUT_DIR [--train 12] [--train-3t-only 4] [--test 4] \\
        [--voxel-scale 4] [--seed 7000] [--test-physics default shifted] [--ldm-config demo] \\
        [--cnn-config cnn-demo] [--methods rish-global cnn ldm] [--nprocs 2] [--resume]

Steps (each skipped when its output exists, so an interrupted run resumes):

1. ``python -m bids_dmri_ldm.simulate``: a training set (``--train`` paired + ``--train-3t-only``
   3T-only subjects, default physics) and one held-out test set per ``--test-physics`` preset
   (seeds used for nothing else; ``shifted`` is the domain no model ever saw).
2. ``bids-dmri-ldm TRAIN OUT group --method M`` for rish-global, cnn and ldm (each writes its model
   and its validation-gate table).
3. ``bids-dmri-ldm TEST OUT participant --method M --output-resolution native`` for identity and
   the trained models, then ``python -m bids_dmri_ldm.evaluate ... --untouched-3t``: the paper's
   8 columns against each test subject's 7T scan and against the simulator's noiseless 7T truth
   (RISH only).
4. Reference rows computed in memory with the validation gate's code path
   (:func:`bids_dmri_ldm.evaluation.gate.score_pair`, the participant level's translation at the
   3T grid): the **oracle** — scale maps from the subject's real 7T RISH brought into the 3T grid
   and sent through exactly the ldm bundle's model-grid path (normalise, crop, resize to the model
   grid and back, the bundle's scale-map reference and smoothing): what a perfect translation by
   that model would give — and, as a cross-check of the in-memory path, every method again.

Writes ``OUT_DIR/fidelity.md`` (the README table comes from it) and per-set TSV/Markdown files.
Not a timed test: it trains models (about 10-30 minutes on 2 CPU cores with the default sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("rish-global", "cnn", "ldm")
DEFAULT_CONFIG = {"cnn": "cnn-demo", "ldm": "demo"}


def run(cmd: list[str], log: Path) -> float:
    """Run a command (stdout/stderr to ``log``); return its wall time; raise on failure."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


def simulate(out: Path, subjects: int, only_3t: int, seed: int, voxel_scale: float, physics: str,
             nprocs: int, logs: Path) -> Path:
    if (out / "dataset_description.json").is_file():
        return out
    cmd = [sys.executable, "-m", "bids_dmri_ldm.simulate", str(out), "--subjects", str(subjects),
           "--seed", str(seed), "--voxel-scale", str(voxel_scale), "--nprocs", str(nprocs)]
    if only_3t:
        cmd += ["--only-3t", str(only_3t)]
    if physics != "default":
        cmd += ["--physics", physics]
    run(cmd, logs / f"simulate_{out.name}.log")
    return out


def app(*args: str) -> list[str]:
    return [sys.executable, "run.py", *map(str, args)]


def train(method: str, train_dir: Path, out: Path, config: str | None, nprocs: int, logs: Path,
          resume: bool = False) -> float | None:
    model = out / "models" / method
    if model.is_dir():
        return None
    cmd = app(train_dir, out, "group", "--method", method, "-w", out.parent / "work" / f"group_{method}",
              "--skip-bids-validation", "--nprocs", nprocs)
    if config:
        cmd += ["--config", config]
    if resume:
        cmd += ["--resume"]
    return run(cmd, logs / f"group_{method}.log")


def translate(method: str, test_dir: Path, out: Path, models: Path, nprocs: int, logs: Path) -> float | None:
    if (out / "dataset_description.json").is_file() and any(out.glob("sub-*/**/dwi/*_desc-7Tlike_dwi.nii.gz")):
        return None
    cmd = app(test_dir, out, "participant", "--method", method, "--output-resolution", "native",
              "-w", out.parent / "work" / f"participant_{method}", "--skip-bids-validation", "--nprocs", nprocs)
    if method != "identity":
        cmd += ["--model-dir", models]
    return run(cmd, logs / f"participant_{out.parent.name}_{method}.log")


# --------------------------------------------------------------------------- in-memory rows
class Oracle:
    """Scale maps from the real 7T RISH through the ldm bundle's model-grid path (see module doc)."""

    def __init__(self, bundle, target):
        self.bundle, self.target = bundle, target

    def predict_scale_maps(self, rish, mask, affine):
        from bids_dmri_ldm.methods import ScaleMapPrediction
        from bids_dmri_ldm.ml.data import (
            RishScan,
            canonical_scan,
            from_model_grid,
            target_on_source,
            to_model_grid,
        )
        from bids_dmri_ldm.ml.normalise import denormalise, normalise
        from bids_dmri_ldm.ml.orientation import Reorientation
        from bids_dmri_ldm.ml.scalemaps import learned_scale_maps

        cfg = self.bundle.config
        norm, grid, margin = cfg["normalisation"], tuple(cfg["grid"]), cfg["translation"]["crop_margin"]
        reo = Reorientation.of(affine, mask.shape)
        source = canonical_scan(RishScan(rish, mask, affine))
        target = target_on_source(canonical_scan(self.target), source)

        def through_grid(scan, box):
            x, _, crop = to_model_grid(normalise(scan.rish, scan.mask, norm), scan.mask, grid, margin, box_mask=box)
            return denormalise(from_model_grid(x, crop, norm["background"]), source.mask, norm), crop

        pred, crop = through_grid(target, source.mask)
        ref, _ = through_grid(source, source.mask) if cfg["translation"].get("scale_reference") != "input" \
            else (source.rish, None)
        scale = learned_scale_maps(pred, ref, source.mask, crop.as_list(), grid,
                                   cfg["translation"].get("scale_smoothing", 0.0))
        return ScaleMapPrediction(reo.from_canonical(scale), {"Method": "oracle"})


def memory_rows(test_dir: Path, models: Path, methods: list[str], logs: Path) -> tuple[list, list]:
    """Score every method, the oracle and the in-domain factors in memory (the validation gate's
    code path); also returns the in-domain factors of each held-out participant's fold."""
    import numpy as np

    from bids_dmri_ldm.bidsio.layout import collect_dwi_runs, load_layout
    from bids_dmri_ldm.config import RunConfig
    from bids_dmri_ldm.evaluation.gate import score_pair
    from bids_dmri_ldm.methods import RishGlobalMethod, load_method
    from bids_dmri_ldm.ml.data import RishScan
    from bids_dmri_ldm.ml.rish_global import RishGlobalModel
    from bids_dmri_ldm.workflows.group_features import feature_runs, shell_rish
    from bids_dmri_ldm.workflows.group_gate import validation_pairs

    config = RunConfig(bids_dir=test_dir, output_dir=logs / "unused", analysis_level="group",
                       work_dir=test_dir.parent / "work" / f"memory_{test_dir.name}")
    runs = collect_dwi_runs(load_layout(test_dir))
    chosen = feature_runs(runs)
    labels = sorted(set(chosen["source"]) & set(chosen["target"]))
    translators = {"identity": load_method("identity")}
    for method in methods:
        translators[method] = load_method(method, models)
    ldm = translators.get("ldm") or load_method("ldm", models if (models / "ldm").is_dir() else None)
    pairs = list(validation_pairs(config, runs, labels, config.training_shell))
    targets = [RishScan(np.asarray(rish7, np.float32), mask7, affine7) for rish7, mask7, affine7 in
               (shell_rish(chosen["target"][pair.participant], config, config.training_shell) for pair in pairs)]
    in_domain = in_domain_factors(pairs, targets)
    rows = []
    for pair, target, factors in zip(pairs, targets, in_domain):
        extra = {"oracle": Oracle(ldm.bundle, target)}
        if factors is not None:
            extra[IN_DOMAIN] = RishGlobalMethod(RishGlobalModel(factors=factors, name=IN_DOMAIN))
        rows += score_pair(pair, {**translators, **extra}, truth_root=test_dir)
    return rows, in_domain


IN_DOMAIN = "in-domain rish-global (leave-one-out)"


def in_domain_factors(pairs: list, targets: list) -> list:
    """One factor per order fitted, as the group level fits `rish-global`
    (:func:`~bids_dmri_ldm.ml.rish_global.ratio_of_means`), on this test set's *other* pairs (leave
    one participant out): what `rish-global` would score had it been trained on pairs of this
    physics. None with fewer than two pairs."""
    import numpy as np

    from bids_dmri_ldm.ml.rish_global import RishPair, pair_rish_samples, ratio_of_means

    samples = [pair_rish_samples(RishPair(p.rish, p.mask, p.affine, t.rish, t.mask, t.affine, label=p.participant))
               for p, t in zip(pairs, targets)]
    if len(samples) < 2:
        return [None] * len(samples)
    folds = []
    for k in range(len(samples)):
        others = samples[:k] + samples[k + 1:]
        folds.append(tuple(float(v) for v in ratio_of_means(np.concatenate([s for s, _ in others]),
                                                            np.concatenate([t for _, t in others]))))
    return folds


# --------------------------------------------------------------------------- tables
def factor_lines(in_domain: list, models: Path | None) -> list[str]:
    """The in-domain factors per order (mean and range over the folds) beside the trained
    rish-global's: how far this physics' 3T -> 7T change is from the training domain's."""
    import numpy as np

    folds = np.array([f for f in in_domain if f is not None])
    if not folds.size:
        return []
    lines = ["In-domain factors per order, L0 / L2 / L4 (mean over the leave-one-out folds, min-max): "
             + " / ".join(f"{m:.3f} ({lo:.3f}-{hi:.3f})" for m, lo, hi in
                          zip(folds.mean(0), folds.min(0), folds.max(0)))]
    if models is not None:
        from bids_dmri_ldm.methods.rish_global import load_rish_global_model

        trained = load_rish_global_model(models / "rish-global").factors
        lines.append("Trained rish-global (default physics): " + " / ".join(f"{v:.3f}" for v in trained))
    return ["", *lines]


ORDER = ("untouched 3T", "identity", "rish-global", "cnn", "ldm", "oracle", IN_DOMAIN)


def table(rows: list, reference: str, columns: list[str]) -> str:
    from bids_dmri_ldm.evaluation.report import groups
    from bids_dmri_ldm.evaluation.scoring import summarise

    header = "| method | n | " + " | ".join(f"{c.split('_')[0].upper()} {c.split('_')[1]}" for c in columns) + " |"
    lines = [header, "|---|---|" + "---|" * len(columns)]
    found = {m: members for m, ref, members in groups(rows) if ref == reference}
    for method in sorted(found, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER)):
        mean, sd = summarise([r.scores for r in found[method]], columns)
        cells = [f"{mean[c]:.4f} ± {sd[c]:.4f}" if sd[c] == sd[c] else f"{mean[c]:.4f}" for c in columns]
        lines.append(f"| {method} | {len(found[method])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=12)
    parser.add_argument("--train-3t-only", type=int, default=4)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--voxel-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=7000)
    parser.add_argument("--test-physics", nargs="+", default=["default", "shifted"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ldm-config", default=DEFAULT_CONFIG["ldm"])
    parser.add_argument("--cnn-config", default=DEFAULT_CONFIG["cnn"])
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--resume", action="store_true",
                        help="pass --resume to the group level: a model whose folder was removed is "
                             "retrained from the checkpoints in OUT/work (only what changed after "
                             "training, e.g. the calibration, is redone when every stage is complete)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())

    train_dir = simulate(out / "data" / "train", args.train, args.train_3t_only, args.seed, args.voxel_scale,
                         "default", args.nprocs, logs)
    group_out = out / "trained"
    configs = {"cnn": args.cnn_config, "ldm": args.ldm_config}
    for method in args.methods:
        seconds = train(method, train_dir, group_out, configs.get(method), args.nprocs, logs, args.resume)
        if seconds is not None:
            timings[f"group {method}"] = round(seconds, 1)
    models = group_out / "models"

    report = [f"# Fidelity benchmark ({started})", "",
              f"Training: {args.train} paired + {args.train_3t_only} 3T-only simulated subjects (seed {args.seed}, "
              f"voxel scale {args.voxel_scale:g}, default physics), each method trained by the group level "
              f"(cnn: --config {args.cnn_config}; ldm: --config {args.ldm_config}). Test: {args.test} held-out "
              "subjects per physics preset. Participant level at the native grid; evaluation inside the "
              "simulator's brain mask (`python -m bids_dmri_ldm.evaluate --untouched-3t`). Machine: "
              f"{platform.node()} ({os.cpu_count()} CPUs), python {platform.python_version()}.", ""]
    columns = [f"{m}_{n}" for m in ("nmse", "ssim") for n in ("L0", "L2", "L4", "FA")]
    for k, physics in enumerate(args.test_physics):
        test_dir = simulate(out / "data" / f"test-{physics}", args.test, 0, args.seed + 1000 * (k + 1),
                            args.voxel_scale, physics, args.nprocs, logs)
        preds = []
        for method in ["identity", *args.methods]:
            pred = out / f"test-{physics}" / method
            seconds = translate(method, test_dir, pred, models, args.nprocs, logs)
            if seconds is not None:
                timings[f"participant {physics} {method} ({args.test} subjects)"] = round(seconds, 1)
            preds.append(pred)
        scores = out / f"test-{physics}" / "scores.tsv"
        if not scores.is_file():
            run([sys.executable, "-m", "bids_dmri_ldm.evaluate", *map(str, preds), str(test_dir), "--untouched-3t",
                 "--label", "identity", *args.methods, "--out", str(scores)], logs / f"evaluate_{physics}.log")
        from bids_dmri_ldm.evaluation.report import ScoreRow

        rows = _read_rows(scores, ScoreRow)
        memory, in_domain = memory_rows(test_dir, models, args.methods, logs)
        (out / f"test-{physics}" / "memory.json").write_text(json.dumps([r.__dict__ for r in memory], default=str))
        oracle = [r for r in memory if r.method in ("oracle", IN_DOMAIN)]
        report += [f"## Test set: {physics} physics", "",
                   "### Against each subject's 7T scan (participant level + evaluate; oracle in memory)", "",
                   table(rows + oracle, "7T", columns), "",
                   "### Against the simulator's noiseless 7T truth (RISH only)", "",
                   table(rows + oracle, "noiseless7T", columns[:3] + columns[4:7]), "",
                   "### Cross-check: every row computed in memory (validation-gate code path, 3T grid)", "",
                   table(memory, "7T", columns), "",
                   *factor_lines(in_domain, models if "rish-global" in args.methods else None), ""]
    report += ["## Wall times (s)", "", *[f"- {k}: {v}" for k, v in timings.items()], ""]
    (out / "fidelity.md").write_text("\n".join(report))
    print("\n".join(report))
    return 0


def _read_rows(path: Path, row_type) -> list:
    """ScoreRows of a per-participant evaluate TSV (summary rows skipped)."""
    import csv
    import math

    rows = []
    with open(path) as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if not row["participant_id"].startswith("sub-"):
                continue
            scores = {k: (math.nan if v == "n/a" else float(v)) for k, v in row.items()
                      if k.startswith(("nmse_", "ssim_"))}
            rows.append(row_type(row["participant_id"][4:], None if row["session"] == "n/a" else row["session"],
                                 row["method"], row["reference"], row["mask"], int(row["n_voxels"]), scores))
    return rows


if __name__ == "__main__":
    sys.exit(main())
