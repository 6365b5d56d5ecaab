"""Domain errors of bids-dmri-ldm and the exit codes of the BIDS execution specification.

The bottom layer of the package: it imports nothing from it, and every module may import it.
Every error the application reports to the user is a :class:`BidsAppError` (or a subclass)
raised anywhere in the package and caught once, in :func:`bids_dmri_ldm.cli.run.main`, which
prints one line ``bids-dmri-ldm: error: <message>`` and exits with ``exc.exit_code``. The
other command lines of the package (``python -m bids_dmri_ldm.evaluate``, ``.hcp2bids``,
``.simulate``) print theirs through :func:`report_error`.

A participant-level run that fails inside the workflow does not stop the process: its failure
is put in a :class:`FailureCategory` (``bad-data``, ``cannot-write``, ``resources``, or none)
by :func:`failure_category` from the exception's type, which decides the run's status and the
exit code once every run has finished (:func:`bids_dmri_ldm.cli.run.failure_exit_code`).

The codes follow the BIDS execution specification, which reuses the BSD ``sysexits.h``
values for generic failures and reserves 16-18 for BIDS-specific ones. argparse's own
code 2 is never used (see :class:`bids_dmri_ldm.cli.parser.BidsArgumentParser`).

=====  =======================  ==========================================================
code   name                     used for
=====  =======================  ==========================================================
0      EX_OK                    success
1      EX_FAILURE               a run failed, or an unexpected error
16     EX_VALIDATION_FAILED     the input dataset fails ``bids-validator-deno``
17     EX_UNKNOWN_LEVEL         analysis level other than ``participant``/``group``
18     EX_NO_DATA               the labels/filters select no DWI run (data exist but none
                                match)
64     EX_USAGE                 bad command line (including ``--device cuda`` without a GPU,
                                output or work dir inside ``bids_dir``)
65     EX_DATAERR               input data are malformed (bval/bvec, images, metadata), or
                                the group level finds no 3T/7T pair to train from
66     EX_NOINPUT               ``bids_dir`` missing or not BIDS; a requested participant
                                or session label that does not exist in the dataset
73     EX_CANTCREAT             output or work directory cannot be created or written
75     EX_TEMPFAIL              a temporary failure (e.g. a lock held by another run)
130    EX_INTERRUPTED           Ctrl-C (128 + SIGINT), by shell convention
=====  =======================  ==========================================================
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any

EX_OK = 0
EX_FAILURE = 1
EX_VALIDATION_FAILED = 16
EX_UNKNOWN_LEVEL = 17
EX_NO_DATA = 18
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_INTERRUPTED = 130

__all__ = [
    "StepFailure",
    "EX_CANTCREAT",
    "EX_DATAERR",
    "EX_FAILURE",
    "EX_INTERRUPTED",
    "EX_NOINPUT",
    "EX_NO_DATA",
    "EX_OK",
    "EX_TEMPFAIL",
    "EX_UNKNOWN_LEVEL",
    "EX_USAGE",
    "EX_VALIDATION_FAILED",
    "BadDataError",
    "BidsAppError",
    "BundleError",
    "FailureCategory",
    "InputDataError",
    "MethodError",
    "MethodUnavailableError",
    "MissingInputError",
    "ModelNotFoundError",
    "NoDataError",
    "OutputError",
    "ResourceError",
    "TemporaryFailure",
    "UnknownAnalysisLevel",
    "UsageError",
    "ValidationFailed",
    "failure_category",
    "report_error",
]


class FailureCategory(str, Enum):
    """Why a participant-level run failed, as its status says (``failed (<category>): ...``)."""

    BAD_DATA = "bad-data"
    CANNOT_WRITE = "cannot-write"
    RESOURCES = "resources"

    def __str__(self) -> str:
        return self.value


class BidsAppError(Exception):
    """An error reported to the user as one line, with a BIDS execution-spec exit code.

    Parameters
    ----------
    message : str
        One line saying what is wrong and, where possible, what to do about it.
    exit_code : int, optional
        Process exit status; defaults to the class attribute ``default_exit_code``.
    """

    default_exit_code = EX_FAILURE
    category: FailureCategory | None = None
    """What a run that fails with this error counts as (None: a plain failure)."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.message = " ".join(str(message).split())  # always one line
        self.exit_code = self.default_exit_code if exit_code is None else int(exit_code)

    def __str__(self) -> str:
        return self.message


class UsageError(BidsAppError):
    """Bad command-line usage (64)."""

    default_exit_code = EX_USAGE


class UnknownAnalysisLevel(UsageError):
    """Analysis level other than ``participant`` or ``group`` (17)."""

    default_exit_code = EX_UNKNOWN_LEVEL


class ValidationFailed(BidsAppError):
    """The input dataset does not pass the BIDS validator (16)."""

    default_exit_code = EX_VALIDATION_FAILED


class NoDataError(BidsAppError):
    """Labels or filters selected no data to process (18)."""

    default_exit_code = EX_NO_DATA


class BadDataError(BidsAppError):
    """Input data exist but are malformed or inconsistent (65)."""

    default_exit_code = EX_DATAERR
    category = FailureCategory.BAD_DATA


class InputDataError(BadDataError, ValueError):
    """An input run cannot be processed as given (bad image, gradients, shell, mask).

    The message is one line saying what is wrong and, where possible, what to do; the workflow
    reports it as the run's failure reason (exit code 65, "data format error"). A
    ``ValueError`` too, as it was before this module existed.
    """


class MissingInputError(BidsAppError):
    """An input path, dataset, participant or session does not exist (66)."""

    default_exit_code = EX_NOINPUT


class OutputError(BidsAppError):
    """An output or work location cannot be created or written (73)."""

    default_exit_code = EX_CANTCREAT
    category = FailureCategory.CANNOT_WRITE


class ResourceError(BidsAppError):
    """A run cannot be processed with the resources of this machine (memory); status
    ``failed (resources)``, exit 73 when every failure is one."""

    default_exit_code = EX_CANTCREAT
    category = FailureCategory.RESOURCES


class MethodError(BidsAppError):
    """A translation method cannot be used: unknown, its model corrupt or incompatible (1)."""


class ModelNotFoundError(MethodError):
    """The method's model directory or file does not exist (66)."""

    default_exit_code = EX_NOINPUT


class MethodUnavailableError(MethodError):
    """The method exists but cannot run in this installation (e.g. no PyTorch, no GPU) (1)."""


class BundleError(MethodError):
    """A model bundle is missing, incomplete, tampered with, truncated or incompatible (1)."""


class TemporaryFailure(BidsAppError):
    """A failure that may go away when retried (75)."""

    default_exit_code = EX_TEMPFAIL


def _foreign_categories() -> list[tuple[tuple[type, ...], FailureCategory]]:
    """Exceptions of Python and of the libraries that mean a category (checked after the
    domain errors' own ``category``). Library types are taken from the modules already imported
    (a failure of a library that was never imported cannot be one of its exceptions)."""
    bad_data: list[type] = [EOFError]
    resources: list[type] = [MemoryError]
    gzip = sys.modules.get("gzip")
    if gzip is not None:
        bad_data.append(gzip.BadGzipFile)
    nib_files = sys.modules.get("nibabel.filebasedimages")
    if nib_files is not None:
        bad_data.append(nib_files.ImageFileError)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "OutOfMemoryError"):
        resources.append(torch.OutOfMemoryError)
    return [(tuple(bad_data), FailureCategory.BAD_DATA), ((PermissionError,), FailureCategory.CANNOT_WRITE),
            (tuple(resources), FailureCategory.RESOURCES)]


def failure_category(error: BaseException | type[BaseException] | None) -> FailureCategory | None:
    """The :class:`FailureCategory` of an exception (or exception class) that failed a run.

    A domain error carries its own (``category``); unreadable or truncated images
    (``EOFError``, ``gzip.BadGzipFile``, nibabel's ``ImageFileError``) are bad data, a
    ``PermissionError`` cannot-write, ``MemoryError`` and torch's ``OutOfMemoryError``
    resources; anything else (None included) is a plain failure (None).
    """
    if error is None:
        return None
    kind = error if isinstance(error, type) else type(error)
    own = getattr(kind, "category", None)
    if isinstance(own, FailureCategory):
        return own
    for types, category in _foreign_categories():
        if issubclass(kind, types):
            return category
    return None


def report_error(prog: str, error: BaseException, stream=None) -> int:
    """Print ``<prog>: error: <message>`` (one line) and return the exit code of ``error``.

    The one way the command lines of the package report an error: a :class:`BidsAppError` with
    its message and code, ``KeyboardInterrupt`` as ``interrupted`` (130), anything else as
    ``unexpected <type>: <message>`` (1).
    """
    if isinstance(error, BidsAppError):
        message, code = error.message, error.exit_code
    elif isinstance(error, KeyboardInterrupt):
        message, code = "interrupted", EX_INTERRUPTED
    else:
        message, code = f"unexpected {type(error).__name__}: {error}", EX_FAILURE
    stream = sys.stderr if stream is None else stream
    stream.write(f"{prog}: error: {' '.join(str(message).split())}\n")
    stream.flush()
    return code


@dataclass(frozen=True)
class StepFailure:
    """The typed record of a participant-level step that raised: written by the step's nipype
    interface (:class:`bids_dmri_ldm.interfaces.dwi.StepInterface`) in the worker that ran it,
    with the live exception at hand, and read by the workflow that decides the run's status
    (:func:`bids_dmri_ldm.workflows.base.run_participant`); nipype's crash file (traceback
    text) is kept for humans only.

    Attributes
    ----------
    exception : str
        The exception's class, ``module.QualifiedName`` (``builtins.`` for Python's own).
    message : str
        Its message, first line (the class name when it has none).
    category : FailureCategory or None
        :func:`failure_category` of the exception.
    step : str
        The interface that failed (``FitRISH``).
    """

    exception: str
    message: str
    category: FailureCategory | None
    step: str = ""

    @classmethod
    def from_exception(cls, error: BaseException, step: str = "") -> StepFailure:
        kind = type(error)
        text = str(error).strip()
        return cls(exception=f"{kind.__module__}.{kind.__qualname__}",
                   message=text.splitlines()[0].strip() if text else kind.__name__,
                   category=failure_category(error), step=step)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values."""
        return {"exception": self.exception, "message": self.message, "step": self.step,
                "category": None if self.category is None else self.category.value}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepFailure:
        category = d.get("category")
        return cls(exception=str(d["exception"]), message=str(d["message"]), step=str(d.get("step", "")),
                   category=None if category is None else FailureCategory(category))

    @property
    def name(self) -> str:
        """The class name without its module (``InputDataError``)."""
        return self.exception.rpartition(".")[2]
