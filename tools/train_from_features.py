#!/usr/bin/env python
"""Train an ldm model bundle from exported RISH features, stage by stage, within time budgets.

    python tools/train_from_features.py FEATURES.npz OUT_DIR --config demo --device cuda \\
        --budget vqvae3t=100 vqvae7t=50 ldm=170 --epochs sr=100

``FEATURES.npz`` comes from ``tools/export_rish_features.py`` (the group level's RISH
features).  Training is :func:`bids_dmri_ldm.ml.training.train_all`, the function behind
``bids-dmri-ldm ... group --method ldm``, run one stage at a time with ``resume=True``; only
``bids_dmri_ldm.ml`` is imported (PyTorch, MONAI, safetensors, numpy), so it runs on a GPU
node without pybids/nipype/dipy.

``--budget STAGE=SECONDS`` fits a stage's epoch count to a wall-clock budget: the stage first
runs ``--probe-epochs`` epochs, then resumes from its checkpoint in chunks of about 20 s,
each sized by the median time of the recent epochs (the first epoch, which pays for warm-up,
left out), until the budget is spent (capped by ``--max-epochs``).  The learning rate is constant
(AdamW), so the probe + continuation is the same training as one run of the final count.
The bundle's ``config.json`` records the epochs actually run.  ``--epochs STAGE=N`` fixes a
count instead; stages with neither keep the config's count.  The bundle is written to
``OUT_DIR/model``, loss curves to ``OUT_DIR/training``, a timing summary to
``OUT_DIR/train_summary.json``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("vqvae3t", "vqvae7t", "ldm", "sr")
CHUNK_S = 20.0


def load_features(path: Path) -> tuple[dict, dict]:
    """``{participant: (RISH (X, Y, Z, 3) float32, mask (X, Y, Z) bool, affine (4, 4))}`` for 3T and 7T."""
    out: dict[str, dict] = {"3T": {}, "7T": {}}
    with np.load(path) as data:
        for key in data.files:
            role, label, kind = key.split("/")
            if kind == "rish":
                out[role][label] = (data[key].astype(np.float32), data[f"{role}/{label}/mask"].astype(bool),
                                    data[f"{role}/{label}/affine"].astype(np.float64))
    return out["3T"], out["7T"]


def _pairs(values: list[str], what: str) -> dict[str, float]:
    parsed = {}
    for item in values or []:
        stage, _, value = item.partition("=")
        if stage not in STAGES or not value:
            raise SystemExit(f"{what}: expected STAGE=VALUE with STAGE in {STAGES}, got {item!r}")
        parsed[stage] = float(value)
    return parsed


def _history(work: Path, stage: str) -> list[dict]:
    state = work / stage / "state.json"
    return json.loads(state.read_text())["history"] if state.is_file() else []


def epoch_seconds(work: Path, stage: str) -> list[float]:
    """Seconds of each epoch run so far (the training history); sizes the next chunk."""
    return [row["seconds"] for row in _history(work, stage)]


def main(argv: list[str] | None = None, *, clock=time.perf_counter) -> int:
    """Command line (see the module docstring); ``clock`` (seconds) measures the budgets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("features", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--config", default="demo", help="built-in name or JSON/YAML file")
    parser.add_argument("--name", default=None, help="bundle name (default: the config's)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("-w", "--work-dir", type=Path, default=None, help="checkpoints (default OUT_DIR/work)")
    parser.add_argument("--budget", nargs="*", default=[], metavar="STAGE=SECONDS")
    parser.add_argument("--epochs", nargs="*", default=[], metavar="STAGE=N")
    parser.add_argument("--probe-epochs", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--shell", type=float, default=1000.0,
                        help="b-value (s/mm²) the features were computed at (export_rish_features: 1000)")
    parser.add_argument("--sh-order", type=int, default=4,
                        help="SH order the features were computed with (export_rish_features: 4)")
    args = parser.parse_args(argv)

    import torch

    from bids_dmri_ldm.ml.device import resolve_device
    from bids_dmri_ldm.ml.modelconfig import load_config, trained_for
    from bids_dmri_ldm.ml.training import train_all

    if args.threads:
        torch.set_num_threads(args.threads)
    budgets, fixed = _pairs(args.budget, "--budget"), _pairs(args.epochs, "--epochs")
    cfg = load_config(args.config)
    if args.name:
        cfg["name"] = args.name
    cfg["trained_for"] = trained_for(args.shell, args.sh_order, cfg["orders"])  # checked at the participant level
    work = args.work_dir or args.out_dir / "work"
    device = resolve_device(args.device)
    rish_3t, rish_7t = load_features(args.features)
    command = shlex.join(["python", "tools/train_from_features.py", *(argv if argv is not None else sys.argv[1:])])
    epochs = cfg["training"]["epochs"]
    for stage, n in fixed.items():
        epochs[stage] = int(n)
    summary = {"device": str(device), "stages": {}}
    if device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(device)
    t_all = clock()
    bundle = None
    for stage in STAGES:
        t0 = clock()
        if stage in budgets:
            # chunks of about CHUNK_S seconds, each sized by the median of the recent epochs,
            # so a slowdown (a shared GPU) overshoots the budget by one chunk at most
            epochs[stage] = args.probe_epochs
            while True:
                bundle = train_all(rish_3t, rish_7t, cfg, args.out_dir, work, device, resume=True,
                                   stages=(stage,), command=command)
                seconds = epoch_seconds(work, stage)[1:][-20:] or [1.0]
                per_epoch = max(statistics.median(seconds), 1e-3)
                left = budgets[stage] - (clock() - t0)
                more = int(min(left, CHUNK_S) // per_epoch)
                if more < 1 or epochs[stage] >= args.max_epochs:
                    break
                epochs[stage] = min(args.max_epochs, epochs[stage] + more)
        else:  # fixed count (a budgeted stage was run to its final count by the loop above)
            bundle = train_all(rish_3t, rish_7t, cfg, args.out_dir, work, device, resume=True,
                               stages=(stage,), command=command)
        hist = _history(work, stage)
        summary["stages"][stage] = {
            "epochs": len(hist), "wall_s": round(clock() - t0, 1),
            "median_epoch_s": statistics.median(r["seconds"] for r in hist) if hist else None,
            "final_train_loss": hist[-1]["train_loss"] if hist else None,
            "final_val_loss": hist[-1]["val_loss"] if hist else None,
        }
        print(f"{stage}: {summary['stages'][stage]}", flush=True)
    summary["total_s"] = round(clock() - t_all, 1)
    summary["bundle"] = str(bundle) if bundle else None
    (args.out_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if bundle else 1


if __name__ == "__main__":
    sys.exit(main())
