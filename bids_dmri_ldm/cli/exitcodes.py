"""Exit codes of the BIDS execution specification and the exceptions that carry them.

Every error the application reports to the user is a :class:`BidsAppError` (or a subclass)
raised anywhere in the package and caught once, in :func:`bids_dmri_ldm.cli.run.main`, which
prints one line ``bids-dmri-ldm: error: <message>`` and exits with ``exc.exit_code``.

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
    "MissingInputError",
    "NoDataError",
    "OutputError",
    "TemporaryFailure",
    "UnknownAnalysisLevel",
    "UsageError",
    "ValidationFailed",
]


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


class MissingInputError(BidsAppError):
    """An input path, dataset, participant or session does not exist (66)."""

    default_exit_code = EX_NOINPUT


class OutputError(BidsAppError):
    """An output or work location cannot be created or written (73)."""

    default_exit_code = EX_CANTCREAT


class TemporaryFailure(BidsAppError):
    """A failure that may go away when retried (75)."""

    default_exit_code = EX_TEMPFAIL
