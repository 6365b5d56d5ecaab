"""Command line: ``python -m bids_dmri_ldm.simulate OUT_DIR --subjects N [options]``.

Usage errors (bad counts, unknown options, impossible voxel scale, non-empty OUT_DIR without
``--overwrite``) print one line and exit 64 (BIDS execution spec); argparse's exit code 2 is
never used. The dataset is built in a temporary sibling folder and moved into place at the end,
so OUT_DIR is never left half-written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .._version import __version__
from ..cli.exitcodes import EX_CANTCREAT, EX_FAILURE, EX_OK, UsageError
from . import acquisition
from .signal import T2_3T, T2_7T, Diffusivities, Relaxation, SignalModel

PROG = "python -m bids_dmri_ldm.simulate"


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise :class:`UsageError` instead of exiting with 2."""

    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (no validation beyond types)."""
    parser = _Parser(
        prog=PROG,
        description="Simulate paired HCP-like 3T/7T diffusion MRI subjects as a BIDS dataset "
        "(with ground truth in derivatives/simulation).",
        allow_abbrev=False,
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="output BIDS dataset (must not exist or be empty)")
    parser.add_argument("--subjects", type=int, default=1, metavar="N", help="paired 3T+7T subjects (default 1)")
    parser.add_argument("--only-3t", type=int, default=0, metavar="K", help="extra 3T-only subjects (default 0)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--voxel-scale", type=float, default=1.0, metavar="X",
                        help="multiply both voxel sizes by X (1: HCP 1.25/1.05 mm grids; 4: ~36x44x36 at 3T)")
    parser.add_argument("--snr-3t", type=float, default=acquisition.PROTOCOL_3T.snr_b0_wm, metavar="V",
                        help=f"b0 SNR in white matter at 3T (default {acquisition.PROTOCOL_3T.snr_b0_wm:g})")
    parser.add_argument("--snr-7t", type=float, default=acquisition.PROTOCOL_7T.snr_b0_wm, metavar="V",
                        help=f"b0 SNR in white matter at unit receive gain at 7T (default {acquisition.PROTOCOL_7T.snr_b0_wm:g})")
    parser.add_argument("--receive-field", type=float, default=1.0, metavar="A",
                        help="strength of the 7T receive/B1 field (0: flat, 1: default)")
    parser.add_argument("--te-3t", type=float, default=acquisition.PROTOCOL_3T.echo_time_ms, metavar="MS", help="3T echo time (ms)")
    parser.add_argument("--te-7t", type=float, default=acquisition.PROTOCOL_7T.echo_time_ms, metavar="MS", help="7T echo time (ms)")
    parser.add_argument("--t2-3t", type=_floats(4), default=None, metavar="IN,EX,GM,CSF",
                        help="3T T2 (ms) of intra-axonal, extra-axonal, GM, CSF (default 80,55,76,2000)")
    parser.add_argument("--t2-7t", type=_floats(4), default=None, metavar="IN,EX,GM,CSF",
                        help="7T T2 (ms) (default 47,47,47,1000)")
    parser.add_argument("--diffusivities", type=_floats(5), default=None, metavar="IN,EXPAR,EXPERP,GM,CSF",
                        help="diffusivities in um^2/ms (default 2.2,2.0,0.7,0.9,3.0)")
    parser.add_argument("--intra-fraction", type=float, default=Diffusivities().intra_fraction, metavar="F",
                        help="intra-axonal fraction of the WM signal (default 0.55)")
    parser.add_argument("--nprocs", type=int, default=default_nprocs(), metavar="P",
                        help=f"scans simulated in parallel processes (default {default_nprocs()}: the usable CPUs, "
                        "at most 2; a full-size scan needs up to ~3 GB per process)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def default_nprocs() -> int:
    """Usable CPUs, at most 2 (bounded memory by default: ~3 GB per full-size scan process)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        available = os.cpu_count() or 1
    return max(1, min(2, available))


def _floats(n: int):
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}") from None
        if len(values) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
        return values

    return parse


@dataclass(frozen=True)
class Settings:
    """Validated simulation settings (everything a worker needs, picklable)."""

    subjects: int
    only_3t: int
    seed: int
    voxel_scale: float
    snr_3t: float
    snr_7t: float
    receive_field: float
    model_3t: SignalModel
    model_7t: SignalModel

    def describe(self) -> dict:
        """JSON-friendly record for READMEs and sidecars."""
        out = asdict(self)
        return json.loads(json.dumps(out))


def parse_args(argv: list[str] | None = None) -> tuple[Path, Settings, int, bool]:
    """Parse and validate; returns ``(out_dir, settings, nprocs, overwrite)`` or raises UsageError."""
    args = build_parser().parse_args(argv)
    if args.subjects < 1:
        raise UsageError(f"--subjects must be at least 1, got {args.subjects}")
    if args.only_3t < 0:
        raise UsageError(f"--only-3t must be 0 or more, got {args.only_3t}")
    if args.nprocs < 1:
        raise UsageError(f"--nprocs must be at least 1, got {args.nprocs}")
    if args.seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {args.seed}")
    try:
        acquisition.check_voxel_scale(args.voxel_scale, (acquisition.PROTOCOL_3T, acquisition.PROTOCOL_7T))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for name in ("snr_3t", "snr_7t", "te_3t", "te_7t"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if not (math.isfinite(args.receive_field) and 0 <= args.receive_field <= 1.5):
        raise UsageError(f"--receive-field must be between 0 and 1.5, got {args.receive_field}")
    if not 0 <= args.intra_fraction <= 1:
        raise UsageError(f"--intra-fraction must be between 0 and 1, got {args.intra_fraction}")
    for option, values in (("--t2-3t", args.t2_3t), ("--t2-7t", args.t2_7t), ("--diffusivities", args.diffusivities)):
        if values is not None and not all(math.isfinite(v) and v > 0 for v in values):
            raise UsageError(f"{option} values must be positive numbers")
    diffusivities = Diffusivities(intra_fraction=args.intra_fraction)
    if args.diffusivities is not None:
        d = [v * 1e-3 for v in args.diffusivities]  # um^2/ms -> mm^2/s
        diffusivities = Diffusivities(d[0], d[1], d[2], d[3], d[4], args.intra_fraction)
    t2_3t = Relaxation(*args.t2_3t) if args.t2_3t else T2_3T
    t2_7t = Relaxation(*args.t2_7t) if args.t2_7t else T2_7T
    settings = Settings(
        subjects=args.subjects,
        only_3t=args.only_3t,
        seed=args.seed,
        voxel_scale=args.voxel_scale,
        snr_3t=args.snr_3t,
        snr_7t=args.snr_7t,
        receive_field=args.receive_field,
        model_3t=SignalModel(args.te_3t, t2_3t, diffusivities),
        model_7t=SignalModel(args.te_7t, t2_7t, diffusivities),
    )
    out_dir = args.out_dir
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not args.overwrite)):
        raise UsageError(f"{out_dir} exists and is not an empty folder (use --overwrite to replace it)")
    return out_dir, settings, args.nprocs, args.overwrite


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    try:
        out_dir, settings, nprocs, overwrite = parse_args(argv)
    except UsageError as exc:  # the project's one-line usage error (exit code 64)
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    from .run import (
        simulate_dataset,  # heavy imports only after the arguments are valid
    )

    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
        # mkdtemp makes 0700; the dataset is renamed from it, and other users (a container run
        # with -u UID) must be able to read it: the permissions of a normal mkdir instead
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
    except OSError as exc:
        print(f"{PROG}: error: cannot create {out_dir}: {exc.strerror}", file=sys.stderr)
        return EX_CANTCREAT
    start = time.time()
    try:
        simulate_dataset(staging, settings, nprocs)
        from .writer import replace_directory

        replace_directory(staging, out_dir.resolve(), overwrite)
    except KeyboardInterrupt:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"{PROG}: error: cannot write {out_dir}: {exc}", file=sys.stderr)
        return EX_CANTCREAT
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback wall
        shutil.rmtree(staging, ignore_errors=True)
        print(f"{PROG}: error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return EX_FAILURE
    n_subjects = settings.subjects + settings.only_3t
    print(f"Simulated {n_subjects} subject(s) into {out_dir} in {time.time() - start:.1f} s", file=sys.stderr)
    return EX_OK

