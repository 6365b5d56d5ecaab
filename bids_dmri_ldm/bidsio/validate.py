"""Validation of the input dataset with the official BIDS validator (``bids-validator-deno``).

The validator ships as a Python wheel (``pip install bids-validator-deno``) that bundles the
deno runtime and the schema, so it runs offline. Deno writes a cache to ``$DENO_DIR`` (by
default under ``$HOME``, read-only in many containers), so it is pointed at a scratch folder.

**Derivative inputs** (``DatasetType: derivative``: qsiprep, dmriprep, ``hcp2bids`` output) are
held to what this app reads from them. The validator applies the BIDS derivatives rules, which
preprocessing tools rarely meet in full and which BIDS 1.10 does not even define for DWI gradient
files; its errors are enforced (exit 16) except those :func:`relaxed_reason` names:
``SpatialReference``/``SkullStripped`` missing from a sidecar (derivative-only provenance keys;
the outputs stay on the input's grid and take their space from its name), filename-rule errors
of ``.bval``/``.bvec`` files (no derivative rule covers them), and any error in a file the app
does not read (anything but ``*_dwi.*``, ``*_mask.*`` and ``dataset_description.json``). Those
are logged as one warning with their codes; every other error still stops the run.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from ..errors import EX_OK, EX_VALIDATION_FAILED, ValidationFailed

LOGGER = logging.getLogger("bids_dmri_ldm.bids")  # the logger name of the log lines, unchanged
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


#: Derivative-only sidecar keys that a derivative input may lack (see the module docstring).
DERIVATIVE_SIDECAR_KEYS = frozenset({"SpatialReference", "SkullStripped"})
#: Validator codes saying that a file name fits no rule of the schema.
FILENAME_RULE_CODES = frozenset({"ALL_FILENAME_RULES_HAVE_ISSUES", "NOT_INCLUDED", "FILENAME_MISMATCH"})
_READ_BY_APP = re.compile(r"(_dwi\.(nii|nii\.gz|json|bval|bvec)|_mask\.(nii|nii\.gz|json))$")


def relaxed_reason(issue: dict) -> str | None:
    """Why a validator error does not stop a *derivative* input, or None when it does.

    Parameters
    ----------
    issue : dict
        One entry of the validator's JSON ``issues.issues`` list (``code``, ``subCode``,
        ``location``).
    """
    code, sub_code = issue.get("code", ""), issue.get("subCode")
    location = issue.get("location") or ""
    if code == "SIDECAR_KEY_REQUIRED" and sub_code in DERIVATIVE_SIDECAR_KEYS:
        return f"derivative sidecar key {sub_code}"
    if code in FILENAME_RULE_CODES and location.endswith((".bval", ".bvec")):
        return "derivative gradient file name"
    if location and location != "/dataset_description.json" and not _READ_BY_APP.search(location):
        return "file not read by bids-dmri-ldm"
    return None


def is_derivative_dataset(bids_dir: str | Path) -> bool:
    """Whether ``bids_dir/dataset_description.json`` says ``DatasetType: derivative``."""
    try:
        description = json.loads((Path(bids_dir) / "dataset_description.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(description, dict) and description.get("DatasetType") == "derivative"


def split_relaxed(report: dict) -> tuple[dict, Counter]:
    """The report without the errors a derivative input is not held to, and those errors'
    ``code[ subCode]`` counts."""
    kept, relaxed = [], Counter()
    for issue in report.get("issues", {}).get("issues", []):
        if issue.get("severity") == "error" and relaxed_reason(issue) is not None:
            relaxed[" ".join(filter(None, (issue.get("code"), issue.get("subCode"))))] += 1
        else:
            kept.append(issue)
    issues = dict(report.get("issues", {}), issues=kept)
    return dict(report, issues=issues), relaxed


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
        True when the validator ran and passed (for a derivative dataset: passed once the
        errors :func:`relaxed_reason` names are set aside, which is logged); False when skipped
        or not installed (a warning is logged) or when it could not run (logged).

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
    relaxed: Counter = Counter()
    if is_derivative_dataset(bids_dir):
        report, relaxed = split_relaxed(report)
    n_errors, summary = summarise_errors(report)
    if relaxed:
        LOGGER.warning(
            "%s is a derivative dataset: %d validator error(s) outside what bids-dmri-ldm reads or "
            "needs are not enforced (%s); see docs/usage.md#validation",
            bids_dir, sum(relaxed.values()),
            ", ".join(f"{code} x{count}" for code, count in relaxed.most_common()),
        )
    if n_errors == 0 and (proc.returncode == EX_OK or relaxed):
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
