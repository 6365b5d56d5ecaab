"""Command line of the evaluation (``python -m bids_dmri_ldm.evaluate``, :mod:`bids_dmri_ldm.evaluate`):
score 7T-like predictions against 7T truth, NMSE and SSIM of RISH L0/L2/L4 and FA (Table 1).

Usage::

    python -m bids_dmri_ldm.evaluate PRED_DERIVATIVES [PRED_DERIVATIVES ...] TRUTH_BIDS \\
        [--out FILE.tsv] [--participant-label 01 02 ...] [--label NAME ...] [--mask auto|b0|simulation]

For every participant with a prediction (``*_desc-7Tlike_dwi.nii.gz`` in ``PRED_DERIVATIVES``) and
a 7T DWI run in ``TRUTH_BIDS``:

1. the 7T scan's maps (RISH L0, L2, L4 of the b=1000 shell and FA) are computed on its own grid,
   inside the evaluation mask: the simulator's ground-truth brain mask when the truth dataset has
   one (``derivatives/simulation``), else ``core.mask.brain_mask`` (the automatic air/tissue mask)
   of the 7T mean b0 — the ``mask`` column says which; the mask is restricted to the prediction's field of view;
2. the prediction's maps are computed the same way on the prediction's grid (in the mask brought
   to that grid and dilated) and resampled into the 7T grid with the two affines (world space);
3. both are scored inside the mask (:mod:`bids_dmri_ldm.evaluation.scoring`), and, where the
   simulator's noiseless 7T RISH maps exist, the prediction's RISH is scored against those too.

Outputs: a TSV (one row per prediction and reference, then ``mean`` and ``sd`` rows) and a
Markdown file beside it (``FILE.md``) with a table ready for the README; without ``--out`` the
Markdown is printed. Exit codes (BIDS execution spec): 0 ok, 18 no participant has both a
prediction and a 7T scan, 64 usage, 65 unreadable or inconsistent data (the other participants are
still scored and written), 66 missing input folder or unknown participant label, 73 output not
writable. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import (
    EX_DATAERR,
    BadDataError,
    BidsAppError,
    MissingInputError,
    NoDataError,
    OutputError,
    UsageError,
    report_error,
)
from . import discovery

# Heavy modules (numpy, nibabel, dipy, torch via core.metrics) are imported when scoring starts,
# so that --help and usage errors answer at once.

PROG = "python -m bids_dmri_ldm.evaluate"
LOGGER = logging.getLogger("bids_dmri_ldm.evaluate")
MASK_CHOICES = ("auto", "b0", "simulation")


# --------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """Raise a usage error (exit 64), never argparse's exit 2."""
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (builds only; :func:`main` validates)."""
    parser = _Parser(
        prog=PROG,
        description="NMSE and SSIM of RISH L0/L2/L4 and FA of 7T-like predictions against 7T truth "
        "(Zhu et al. 2024, Table 1), on the 7T grid inside the 7T brain mask.",
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="PRED_DERIVATIVES [PRED_DERIVATIVES ...] TRUTH_BIDS: one or more derivative datasets of "
        "predictions (one per method), then the raw BIDS dataset holding the 7T scans",
    )
    parser.add_argument("--out", type=Path, help="TSV file to write; the Markdown goes beside it (.md)")
    parser.add_argument(
        "--participant-label", "--participant_label", nargs="+", metavar="LABEL",
        help="participants to score (with or without 'sub-'); default: all with both files",
    )
    parser.add_argument(
        "--label", nargs="+", metavar="NAME",
        help="method name of each PRED_DERIVATIVES in the tables (default: the sidecar's Method, "
        "else the folder name)",
    )
    parser.add_argument(
        "--mask", choices=MASK_CHOICES, default="auto",
        help="evaluation mask on the 7T grid: the simulator's ground-truth brain mask ('simulation'), "
        "the automatic mask of the 7T mean b0 ('b0'), or the first available of these ('auto', default)",
    )
    parser.add_argument(
        "--untouched-3t", action="store_true",
        help="also score each participant's untouched 3T scan (its first non-7T DWI run in TRUTH_BIDS) as "
        f"a reference row, method '{discovery.UNTOUCHED}'",
    )
    parser.add_argument(
        "--paper-rows", action="store_true",
        help="add the paper's Table 1 rows (real HCP data) to the Markdown table, for context",
    )
    parser.add_argument("--shell", type=float, default=1000.0, help="b-value of the shell (s/mm², default 1000)")
    parser.add_argument("--shell-tolerance", type=float, default=100.0, help="shell tolerance (s/mm², default 100)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more messages (-vv: debug and tracebacks)")
    parser.add_argument("--version", action="version", version=f"bids-dmri-ldm {__version__}")
    return parser


@dataclass
class Arguments:
    """Validated command line."""

    pred_roots: list[Path]
    truth_root: Path
    out: Path | None
    participants: list[str] | None
    labels: list[str] | None
    mask: str
    shell: float
    tolerance: float
    verbose: int
    paper_rows: bool = False
    untouched: bool = False


def parse_args(argv: Sequence[str] | None = None) -> Arguments:
    """Parse and check the command line (usage errors: 64; missing folders: 66)."""
    ns = build_parser().parse_args(argv)
    if len(set(map(str, ns.paths))) < len(ns.paths):
        raise UsageError(f"a path is given twice (see `{PROG} --help`)")
    if len(ns.paths) < 2:
        raise UsageError(f"expected PRED_DERIVATIVES ... TRUTH_BIDS, got {len(ns.paths)} path (see `{PROG} --help`)")
    *preds, truth = (Path(p) for p in ns.paths)
    for path, what in [(p, "prediction derivatives folder") for p in preds] + [(truth, "truth BIDS folder")]:
        if not path.is_dir():
            raise MissingInputError(f"{what} {path} does not exist or is not a folder")
    if ns.label is not None and len(ns.label) != len(preds):
        raise UsageError(f"--label needs one name per PRED_DERIVATIVES ({len(preds)}), got {len(ns.label)}")
    if ns.shell <= 0 or ns.shell_tolerance <= 0:
        raise UsageError("--shell and --shell-tolerance must be positive")
    participants = None
    if ns.participant_label:
        participants = sorted({discovery.strip_prefix(label) for label in ns.participant_label})
    return Arguments(preds, truth, ns.out, participants, ns.label, ns.mask, ns.shell, ns.shell_tolerance, ns.verbose,
                     ns.paper_rows, ns.untouched_3t)


# --------------------------------------------------------------------------- the run
def _truth_layout(truth_root: Path):
    from bids import BIDSLayout  # imported here: pybids is slow to import

    try:
        return BIDSLayout(str(truth_root), validate=False)
    except Exception as err:  # noqa: BLE001 - pybids raises several types for non-BIDS folders
        raise MissingInputError(f"{truth_root} is not a BIDS dataset ({err})") from None


def _method_name(predictions: list[discovery.Prediction], pred_root: Path, label: str | None) -> str:
    if label:
        return label
    names = sorted({p.method for p in predictions if p.method})
    return names[0] if len(names) == 1 else pred_root.resolve().name


def run(args: Arguments) -> tuple[list, list[str]]:
    """Score everything the arguments select.

    Returns
    -------
    rows : list of :class:`~bids_dmri_ldm.evaluation.report.ScoreRow`
    failures : list of str
        One message per participant or prediction that could not be scored.
    """
    from .pipeline import (
        prediction_on_truth,
        prepare_truth,
        score_participant,
    )

    layout = _truth_layout(args.truth_root)
    known = set(discovery.all_participants(layout))
    predictions = {root: discovery.find_predictions(root, args.participants) for root in args.pred_roots}
    predicted = {p.participant for preds in predictions.values() for p in preds}
    if args.participants is not None:
        unknown = [label for label in args.participants if label not in known and label not in predicted]
        if unknown:
            raise MissingInputError(
                f"participant label(s) {discovery.describe_labels(unknown)} exist neither in {args.truth_root} "
                f"nor in the predictions (truth has {discovery.describe_labels(known)})"
            )
    seven = discovery.find_seven_tesla_scans(layout, sorted(predicted) or None) if predicted else {}
    paired = sorted(predicted & set(seven))
    if not paired:
        roots = ", ".join(str(r) for r in args.pred_roots)
        raise NoDataError(
            f"no participant has both a prediction (*_desc-{discovery.PREDICTION_DESC}_dwi.nii.gz) and a 7T DWI run: "
            f"predictions found for {discovery.describe_labels(predicted)} in {roots}; "
            f"7T runs (MagneticFieldStrength >= {discovery.SEVEN_T_MIN_TESLA:g} T) found for "
            f"{discovery.describe_labels(discovery.find_seven_tesla_scans(layout))} in {args.truth_root}"
        )
    rows: list = []
    failures: list[str] = []
    methods = {
        root: _method_name(preds, root, args.labels[i] if args.labels else None)
        for i, (root, preds) in enumerate(predictions.items())
    }
    if len(set(methods.values())) < len(methods) or discovery.UNTOUCHED in methods.values():
        raise UsageError(
            f"two prediction folders would share a method name ({', '.join(methods.values())}); "
            "name them with --label"
        )
    if args.untouched:  # the raw 3T scans, scored like a prediction
        predictions[args.truth_root] = discovery.untouched_scans(layout, paired)
        methods[args.truth_root] = discovery.UNTOUCHED
    for label in paired:
        scans = seven[label]
        if len(scans) > 1:
            LOGGER.warning("sub-%s has %d 7T runs; scoring against %s", label, len(scans), scans[0].dwi.name)
        try:
            LOGGER.info("sub-%s: 7T maps of %s", label, scans[0].dwi.name)
            truth = prepare_truth(scans[0], args.truth_root, args.mask, args.shell, args.tolerance)
        except BidsAppError as err:
            failures.append(f"sub-{label}: {err}")
            LOGGER.warning("skipping sub-%s: %s", label, err)
            continue
        resampled = []
        for root, preds in predictions.items():
            for prediction in (p for p in preds if p.participant == label):
                LOGGER.info("sub-%s: maps of %s (%s)", label, prediction.dwi.name, methods[root])
                try:
                    resampled.append(prediction_on_truth(prediction, truth, methods[root], args.shell, args.tolerance, root))
                except BidsAppError as err:
                    failures.append(f"{prediction.dwi.name}: {err}")
                    LOGGER.warning("skipping %s: %s", prediction.dwi.name, err)
        if resampled:
            try:
                rows += score_participant(truth, resampled)
            except BidsAppError as err:
                failures.append(f"sub-{label}: {err}")
                LOGGER.warning("skipping sub-%s: %s", label, err)
    return rows, failures


def write_outputs(rows: list, out: Path | None, notes: Sequence[str], paper_rows: bool = False) -> str:
    """Write the TSV and Markdown (atomically) when ``out`` is given; return the Markdown."""
    from .report import to_markdown, to_tsv

    markdown = to_markdown(rows, notes=notes, paper_rows=paper_rows)
    if out is not None:
        from ..io.files import atomic_write_text

        md_path = out.with_suffix(".md") if out.suffix else Path(f"{out}.md")
        try:
            atomic_write_text(out, to_tsv(rows))
            atomic_write_text(md_path, markdown)
        except OSError as err:
            raise OutputError(f"cannot write {out}: {err.strerror or err}") from None
        print(f"wrote {out} and {md_path}", file=sys.stderr)
    return markdown


def _notes(args: Arguments, rows: list) -> list[str]:
    from .pipeline import MASK_SOURCES as mask_text

    masks = sorted({r.mask for r in rows})
    return [
        f"RISH L0/L2/L4: b={args.shell:g} shell, S/S0, real orthonormal SH up to order 4, unregularised "
        "least squares (paper Eq. 1, no square root). FA: dipy TensorModel (WLS) on the b0 + "
        f"b={args.shell:g} volumes. Prediction maps resampled (cubic B-spline, world space) into the 7T "
        "grid; scored inside the 7T brain mask ("
        + "; ".join(mask_text.get(m, m) for m in masks)
        + ") within the prediction's field of view. NMSE = Σ(x̂−x)²/Σx²; SSIM 3D, Gaussian σ = 1.5. "
        f"bids-dmri-ldm {__version__}.",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (never raises for user errors)."""
    verbose = 0
    try:
        args = parse_args(argv)
        verbose = args.verbose
        _configure_logging(verbose)
        rows, failures = run(args)
        if rows:
            markdown = write_outputs(rows, args.out, _notes(args, rows), args.paper_rows)
            if args.out is None:
                sys.stdout.write(markdown)
        if failures:
            raise BadDataError(f"{len(failures)} failed: " + "; ".join(failures), exit_code=EX_DATAERR)
        return 0
    except BidsAppError as err:
        if verbose >= 2:
            traceback.print_exc()
        return report_error(PROG, err)
    except KeyboardInterrupt:
        return 130


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level)
    LOGGER.propagate = False
