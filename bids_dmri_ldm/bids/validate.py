"""Validation of the input dataset with the official BIDS validator (``bids-validator-deno``).

The validator ships as a Python wheel (``pip install bids-validator-deno``) that bundles the
deno runtime and the schema, so it runs offline. Deno writes a cache to ``$DENO_DIR`` (by
default under ``$HOME``, read-only in many containers), so it is pointed at a scratch folder.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from ..cli.exitcodes import EX_OK, EX_VALIDATION_FAILED, ValidationFailed

LOGGER = logging.getLogger("bids_dmri_ldm.bids")
VALIDATOR = "bids-validator-deno"
_MAX_CODES_SHOWN = 3
_MAX_LOCATION_CHARS = 60


def shorten(text: str, limit: int = _MAX_LOCATION_CHARS) -> str:
    """``text`` cut in the middle to at most ``limit`` characters (``/sub-01/dwi/lo…/dwi/loop``),
    so that a path the validator reports (e.g. inside a symlink loop) keeps the message one
    short line."""
    text = str(text)
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def find_validator() -> str | None:
    """Path of ``bids-validator-deno``: on ``PATH``, or beside this Python (a venv's bin/)."""
    found = shutil.which(VALIDATOR)
    if found:
        return found
    candidate = Path(sys.executable).parent / VALIDATOR
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def summarise_errors(report: dict) -> tuple[int, str]:
    """Number of errors and a one-line summary (most frequent codes, one file each).

    Parameters
    ----------
    report : dict
        The validator's ``--format json`` output.
    """
    issues = report.get("issues", {}).get("issues", [])
    errors = [issue for issue in issues if issue.get("severity") == "error"]
    counts = Counter(issue.get("code", "UNKNOWN") for issue in errors)
    parts = []
    for code, count in counts.most_common(_MAX_CODES_SHOWN):
        where = next((i.get("location") for i in errors if i.get("code") == code and
                      i.get("location")), None)
        parts.append(f"{code} x{count}" + (f" (e.g. {shorten(where)})" if where else ""))
    if len(counts) > _MAX_CODES_SHOWN:
        parts.append(f"and {len(counts) - _MAX_CODES_SHOWN} more code(s)")
    return len(errors), "; ".join(parts)


def validate_dataset(bids_dir: str | Path, scratch_dir: str | Path, skip: bool = False) -> bool:
    """Run the official validator on ``bids_dir``.

    Parameters
    ----------
    bids_dir : path
        Dataset root.
    scratch_dir : path
        Writable folder (e.g. the work dir); the deno cache goes to ``scratch_dir/deno``.
    skip : bool
        ``--skip-bids-validation``: do nothing.

    Returns
    -------
    bool
        True when the validator ran and passed; False when skipped or not installed (a
        warning is logged) or when it could not run (logged).

    Raises
    ------
    ValidationFailed
        The dataset has validation errors (exit 16), with the first error codes.
    """
    if skip:
        LOGGER.info("BIDS validation skipped (--skip-bids-validation)")
        return False
    exe = find_validator()
    if exe is None:
        LOGGER.warning(
            "%s is not installed, so the input was not validated "
            "(pip install bids-validator-deno, or pass --skip-bids-validation to silence this)",
            VALIDATOR,
        )
        return False
    deno_dir = Path(scratch_dir) / "deno"
    deno_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DENO_DIR=str(deno_dir), NO_COLOR="1")
    LOGGER.info("validating %s with %s", bids_dir, VALIDATOR)
    try:
        proc = subprocess.run(
            [exe, "--format", "json", str(bids_dir)],
            capture_output=True, text=True, env=env, check=False,
        )
    except OSError as err:
        LOGGER.warning("could not run %s (%s); the input was not validated", VALIDATOR, err)
        return False
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        LOGGER.warning(
            "%s exited with %d without a readable report (%s); the input was not validated",
            VALIDATOR, proc.returncode, (proc.stderr.strip().splitlines() or ["no message"])[-1],
        )
        return False
    n_errors, summary = summarise_errors(report)
    if proc.returncode == EX_OK and n_errors == 0:
        n_warn = sum(1 for i in report.get("issues", {}).get("issues", [])
                     if i.get("severity") == "warning")
        LOGGER.info("BIDS validation passed (%d warning(s))", n_warn)
        return True
    if n_errors == 0:
        LOGGER.warning("%s exited with %d but reported no error; continuing", VALIDATOR,
                       proc.returncode)
        return False
    raise ValidationFailed(
        f"{bids_dir} is not valid BIDS: {n_errors} error(s): {summary}. Run `{VALIDATOR} "
        f"{bids_dir}` for details, or pass --skip-bids-validation",
        exit_code=EX_VALIDATION_FAILED,
    )
