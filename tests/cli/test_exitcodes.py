"""Exit-code constants and the exception hierarchy of the BIDS execution spec."""
import pytest

from bids_dmri_ldm.cli import exitcodes as ec


def test_codes_follow_the_bids_execution_spec():
    assert (ec.EX_OK, ec.EX_FAILURE, ec.EX_VALIDATION_FAILED, ec.EX_UNKNOWN_LEVEL,
            ec.EX_NO_DATA) == (0, 1, 16, 17, 18)
    assert (ec.EX_USAGE, ec.EX_DATAERR, ec.EX_NOINPUT, ec.EX_CANTCREAT,
            ec.EX_TEMPFAIL) == (64, 65, 66, 73, 75)


@pytest.mark.parametrize(
    "cls, code",
    [
        (ec.BidsAppError, 1),
        (ec.UsageError, 64),
        (ec.UnknownAnalysisLevel, 17),
        (ec.ValidationFailed, 16),
        (ec.NoDataError, 18),
        (ec.BadDataError, 65),
        (ec.MissingInputError, 66),
        (ec.OutputError, 73),
        (ec.TemporaryFailure, 75),
    ],
)
def test_each_error_carries_its_code(cls, code):
    err = cls("something is wrong")
    assert isinstance(err, ec.BidsAppError)
    assert err.exit_code == code
    assert str(err) == "something is wrong"


def test_message_is_one_line_and_code_can_be_overridden():
    err = ec.BadDataError("first line\n  second   line", exit_code=ec.EX_NO_DATA)
    assert str(err) == "first line second line"
    assert err.exit_code == 18


def test_unknown_level_is_a_usage_error():
    assert issubclass(ec.UnknownAnalysisLevel, ec.UsageError)
