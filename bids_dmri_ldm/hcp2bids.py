"""``python -m bids_dmri_ldm.hcp2bids HCP_DIR BIDS_DIR [--subjects ID ...] [--copy]``.

Turns the HCP preprocessed diffusion layout (``<id>/T1w/Diffusion`` at 3T, ``<id>/T1w/
Diffusion_7T`` at 7T) into a BIDS derivative dataset (``ses-3T``/``ses-7T``, ``space-T1w``,
HCP brain masks as ``desc-brain_mask``) that the participant and group levels take with
validation on; see :mod:`bids_dmri_ldm.bidsio.hcp` and docs/hcp.md.

Missing parts (a subject without 7T data, a folder without ``data.nii.gz``) are reported and
skipped. Errors are one line ``python -m bids_dmri_ldm.hcp2bids: error: ...`` with the BIDS
execution-spec codes: 64 usage (bad options, ``BIDS_DIR`` not empty), 65 bad data (bvals/bvecs
counts disagree, an image whose volume count or shape does not match, an unreadable image), 66
missing input (``HCP_DIR`` unreadable, an unknown ``--subjects`` folder, nothing to convert), 73
``BIDS_DIR`` cannot be created. The dataset is built in a temporary sibling folder and renamed
into place at the end, so ``BIDS_DIR`` is never left half-written.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ._version import __version__
from .errors import (
    EX_CANTCREAT,
    EX_OK,
    BidsAppError,
    MissingInputError,
    UsageError,
    report_error,
)
from .io.files import replace_dir

PROG = "python -m bids_dmri_ldm.hcp2bids"
LOGGER = logging.getLogger("bids_dmri_ldm.hcp2bids")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """Raise a usage error (exit 64), never argparse's exit 2."""
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (types only; :func:`parse_args` checks the paths)."""
    parser = _Parser(prog=PROG, allow_abbrev=False, description=(
        "Turn the HCP preprocessed diffusion layout (<id>/T1w/Diffusion, <id>/T1w/Diffusion_7T) "
        "into a BIDS derivative dataset (sub-<id>/ses-3T|ses-7T/dwi) for bids-dmri-ldm."))
    parser.add_argument("hcp_dir", metavar="HCP_DIR", type=Path, help="folder of HCP subject folders")
    parser.add_argument("bids_dir", metavar="BIDS_DIR", type=Path,
                        help="BIDS dataset to create (must not exist or be empty)")
    parser.add_argument("--subjects", nargs="+", metavar="ID", default=[],
                        help="subject IDs (with or without sub-); default: every folder with T1w/")
    parser.add_argument("--copy", action="store_true",
                        help="copy the images instead of linking them (default: relative symlinks)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and check: ``BIDS_DIR`` must be absent or an empty folder (64)."""
    args = build_parser().parse_args(argv)
    bids_dir = args.bids_dir
    if bids_dir.exists() and (not bids_dir.is_dir() or any(bids_dir.iterdir())):
        raise UsageError(f"BIDS_DIR {bids_dir} exists and is not an empty folder; choose a new one")
    if not args.hcp_dir.exists():
        raise MissingInputError(f"HCP_DIR {args.hcp_dir} does not exist")
    return args


def convert(hcp_dir: Path, bids_dir: Path, subjects: Sequence[str] = (), copy: bool = False) -> list[str]:
    """Check every run, then write the dataset atomically; returns what was not converted.

    Raises
    ------
    BidsAppError
        With the exit codes of the module docstring.
    """
    from .bidsio.hcp import inventory, write_dataset

    hcp_dir = Path(os.path.abspath(hcp_dir))
    final = Path(os.path.abspath(bids_dir))
    found = inventory(hcp_dir, subjects)
    for line in found.absent_lines(shown=10):
        LOGGER.info("%s", line)
    for reason in found.skipped:
        LOGGER.warning("%s", reason)
    if not found.runs:
        reasons = found.skipped[:3] + found.absent_lines(shown=3)
        raise MissingInputError(f"no HCP diffusion run to convert in {hcp_dir} ("
                                + ("; ".join(reasons) or "no subject folder with T1w/") + ")")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a dataset is read by others
    except OSError as err:
        raise BidsAppError(f"cannot create {final}: {err.strerror or err}", EX_CANTCREAT) from None
    try:
        write_dataset(found.runs, staging, final, hcp_dir, copy=copy,
                      skipped=found.skipped + found.absent_lines())
        if final.exists():
            final.rmdir()  # empty (checked by parse_args)
        replace_dir(staging, final)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise BidsAppError(f"cannot write {final}: {err.strerror or err}", EX_CANTCREAT) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    n_7t = sum(run.session.label == "7T" for run in found.runs)
    LOGGER.info("%d run(s) of %d subject(s) (%d at 3T, %d at 7T) %s into %s; %d run(s) skipped",
                len(found.runs), len({run.subject for run in found.runs}), len(found.runs) - n_7t,
                n_7t, "copied" if copy else "linked", final, len(found.skipped))
    return found.skipped + found.absent_lines()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    try:
        args = parse_args(argv)
        convert(args.hcp_dir, args.bids_dir, args.subjects, args.copy)
        return EX_OK
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else EX_OK
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - one line, never a traceback wall
        return report_error(PROG, exc)
    finally:
        LOGGER.removeHandler(handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
