"""Command line: ``python -m bids_dmri_ldm.simulate OUT_DIR --subjects N [options]``.

Usage errors (bad counts, unknown options, impossible voxel scale, a physics value out of range,
non-empty OUT_DIR without ``--overwrite``) print one line and exit 64 (BIDS execution spec);
argparse's exit code 2 is never used. Physics options default to the chosen ``--physics`` preset
(:mod:`.physics`). The dataset is built in a temporary sibling folder and moved into place at the end,
so OUT_DIR is never left half-written.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .._version import __version__
from ..errors import EX_CANTCREAT, EX_FAILURE, EX_OK, UsageError
from . import acquisition
from .physics import DEFAULT, PRESETS, ScanPhysics, build_scan_physics
from .signal import DEFAULT_DISORDER_AMPLITUDE_UM2, REFERENCE_TIMING_MS, Diffusivities, Relaxation

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
    parser.add_argument("--physics", choices=sorted(PRESETS), default="default",
                        help="physics preset (default: HCP-like; shifted: other T2s, TEs, SNR, field maps and "
                        "voxel sizes, for held-out evaluation only, marked in dataset_description.json)")
    d3, d7 = DEFAULT.session_3t, DEFAULT.session_7t
    p3, p7 = d3.protocol, d7.protocol
    physics = parser.add_argument_group("physics (each defaults to the --physics preset; the default preset's value is shown)")
    physics.add_argument("--snr-3t", type=float, default=None, metavar="V",
                         help=f"b0 SNR in white matter at 3T at unit gain (default {d3.snr:g})")
    physics.add_argument("--snr-7t", type=float, default=None, metavar="V",
                         help=f"b0 SNR in white matter at 7T at unit gain and g-factor (default {d7.snr:g})")
    physics.add_argument("--b1-field-3t", type=float, default=None, metavar="A",
                         help="strength of the 3T receive field (0: flat, 1: default)")
    physics.add_argument("--b1-field-7t", "--receive-field", dest="b1_field_7t", type=float, default=None, metavar="A",
                         help="strength of the 7T transmit/receive/g-factor field (0: flat, 1: default)")
    physics.add_argument("--grad-nonlin-3t", type=float, default=None, metavar="F",
                         help=f"3T gradient non-linearity: b-value drop 100 mm from the isocentre (0: off; default {d3.gradient.b_drop:g})")
    physics.add_argument("--grad-nonlin-7t", type=float, default=None, metavar="F",
                         help=f"7T gradient non-linearity (default {d7.gradient.b_drop:g})")
    physics.add_argument("--te-3t", type=float, default=None, metavar="MS", help=f"3T echo time (ms, default {p3.echo_time_ms:g})")
    physics.add_argument("--te-7t", type=float, default=None, metavar="MS", help=f"7T echo time (ms, default {p7.echo_time_ms:g})")
    physics.add_argument("--timing-3t", type=_floats(2), default=None, metavar="DELTA,delta",
                         help=f"3T diffusion gradient separation and duration (ms, default {p3.big_delta_ms:g},{p3.small_delta_ms:g})")
    physics.add_argument("--timing-7t", type=_floats(2), default=None, metavar="DELTA,delta",
                         help=f"7T diffusion gradient separation and duration (ms, default {p7.big_delta_ms:g},{p7.small_delta_ms:g})")
    physics.add_argument("--t2-3t", type=_floats(4), default=None, metavar="IN,EX,GM,CSF",
                         help="3T T2 (ms) of intra-axonal, extra-axonal, GM, CSF (default {:g},{:g},{:g},{:g})".format(*vars(d3.relaxation).values()))
    physics.add_argument("--t2-7t", type=_floats(4), default=None, metavar="IN,EX,GM,CSF",
                         help="7T T2 (ms) (default {:g},{:g},{:g},{:g})".format(*vars(d7.relaxation).values()))
    physics.add_argument("--diffusivities", type=_floats(5), default=None, metavar="IN,EXPAR,EXPERP,GM,CSF",
                         help="diffusivities in um^2/ms, EXPERP at the reference timing Delta/delta "
                         f"{REFERENCE_TIMING_MS[0]:g}/{REFERENCE_TIMING_MS[1]:g} ms (default 2.2,2.0,0.7,0.9,3.0)")
    physics.add_argument("--intra-fraction", type=float, default=None, metavar="F",
                         help=f"intra-axonal fraction of the WM signal (default {Diffusivities().intra_fraction:g})")
    physics.add_argument("--tract-variation", type=float, default=None, metavar="A",
                         help="strength of the tract-specific intra-axonal fractions around --intra-fraction "
                         f"(0: the same everywhere; default {DEFAULT.diffusivities.tract_variation:g})")
    physics.add_argument("--time-dependence", type=float, default=None, metavar="A",
                         help="extra-axonal structural-disorder amplitude in um^2 (0: no diffusion-time "
                         f"dependence; default {DEFAULT_DISORDER_AMPLITUDE_UM2:g})")
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
    physics: str
    scan_3t: ScanPhysics
    scan_7t: ScanPhysics

    def scan(self, session: str) -> ScanPhysics:
        """The physics of session ``3T`` or ``7T``."""
        return {"3T": self.scan_3t, "7T": self.scan_7t}[session]

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
    preset = PRESETS[args.physics]
    try:
        scans = {session: _scan_physics(args, preset, session) for session in ("3T", "7T")}
        acquisition.check_voxel_scale(args.voxel_scale, tuple(scan.protocol for scan in scans.values()))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    settings = Settings(
        subjects=args.subjects,
        only_3t=args.only_3t,
        seed=args.seed,
        voxel_scale=args.voxel_scale,
        physics=preset.name,
        scan_3t=scans["3T"],
        scan_7t=scans["7T"],
    )
    out_dir = args.out_dir
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not args.overwrite)):
        raise UsageError(f"{out_dir} exists and is not an empty folder (use --overwrite to replace it)")
    return out_dir, settings, args.nprocs, args.overwrite


def _scan_physics(args: argparse.Namespace, preset, session: str) -> ScanPhysics:
    """One session's physics from the preset and the options given (ValueError when out of range)."""
    suffix = session.lower()
    diffusivities = replace(preset.diffusivities)
    if args.diffusivities is not None:
        d = [v * 1e-3 for v in args.diffusivities]  # um^2/ms -> mm^2/s
        diffusivities = Diffusivities(d[0], d[1], d[2], d[3], d[4], diffusivities.intra_fraction, diffusivities.tract_variation)
    if args.intra_fraction is not None:
        diffusivities = replace(diffusivities, intra_fraction=args.intra_fraction)
    t2 = getattr(args, f"t2_{suffix}")
    return build_scan_physics(
        preset,
        session,
        echo_time_ms=getattr(args, f"te_{suffix}"),
        timing_ms=getattr(args, f"timing_{suffix}"),
        relaxation=Relaxation(*t2) if t2 is not None else None,
        snr=getattr(args, f"snr_{suffix}"),
        gradient_drop=getattr(args, f"grad_nonlin_{suffix}"),
        b1_strength=getattr(args, f"b1_field_{suffix}"),
        diffusivities=diffusivities,
        disorder_amplitude_um2=args.time_dependence,
        tract_variation=args.tract_variation,
    )


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

