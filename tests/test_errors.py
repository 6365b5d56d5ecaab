"""Domain errors (bids_dmri_ldm.errors): run-failure categories by type, one-line reports."""
import gzip
import io
import sys
import traceback

import nibabel as nib
import pytest

from bids_dmri_ldm import errors
from bids_dmri_ldm.bids.derivatives import OutputWriteError
from bids_dmri_ldm.core.gradients import GradientError
from bids_dmri_ldm.errors import FailureCategory, failure_category
from bids_dmri_ldm.workflows.base import crash_reason, exception_class
from bids_dmri_ldm.workflows.execution import WorkerDiedError


@pytest.mark.parametrize("error, category", [
    (errors.InputDataError("x"), FailureCategory.BAD_DATA),
    (GradientError("x"), FailureCategory.BAD_DATA),
    (EOFError("x"), FailureCategory.BAD_DATA),
    (gzip.BadGzipFile("x"), FailureCategory.BAD_DATA),
    (nib.filebasedimages.ImageFileError("x"), FailureCategory.BAD_DATA),
    (OutputWriteError("x"), FailureCategory.CANNOT_WRITE),
    (PermissionError("x"), FailureCategory.CANNOT_WRITE),
    (MemoryError(), FailureCategory.RESOURCES),
    (errors.ResourceError("x"), FailureCategory.RESOURCES),
    (errors.MethodError("x"), None),
    (ValueError("x"), None),
    (FileNotFoundError("x"), None),
    (WorkerDiedError("x"), None),
    (None, None),
])
def test_failure_category_by_type(error, category):
    assert failure_category(error) is category
    if error is not None:
        assert failure_category(type(error)) is category


def test_torch_out_of_memory_is_a_resource_failure():
    torch = pytest.importorskip("torch")
    assert failure_category(torch.OutOfMemoryError("CUDA out of memory")) is FailureCategory.RESOURCES


def test_domain_errors_keep_their_builtin_bases_and_codes():
    assert isinstance(errors.InputDataError("x"), ValueError)
    assert isinstance(GradientError("x"), ValueError) and GradientError("x").exit_code == errors.EX_DATAERR
    assert isinstance(OutputWriteError("x"), OSError) and OutputWriteError("x").exit_code == errors.EX_CANTCREAT
    assert errors.ModelNotFoundError("x").exit_code == errors.EX_NOINPUT
    assert errors.MethodError("x").exit_code == errors.EX_FAILURE


def _crash_text(error: BaseException) -> str:
    try:
        raise error
    except BaseException as exc:  # noqa: BLE001
        return "".join(traceback.format_exception(exc))


@pytest.mark.parametrize("error, category", [
    (errors.InputDataError("sub-01_dwi.nii.gz: 3 volumes, 2 gradients"), FailureCategory.BAD_DATA),
    (PermissionError("denied"), FailureCategory.CANNOT_WRITE),
    (RuntimeError("boom"), None),
])
def test_crash_file_text_gives_back_the_exception_class(error, category):
    name, message = crash_reason(_crash_text(error), qualified=True)
    assert exception_class(name) is type(error)
    assert failure_category(exception_class(name)) is category
    assert message == str(error)


def test_unknown_exception_names_are_no_class():
    assert exception_class("no_such_module_xyz.SomeError") is None
    assert exception_class("NotABuiltinError") is None
    assert exception_class("os.path") is None  # not an exception class


def test_report_error_prints_one_line_and_returns_the_code():
    out = io.StringIO()
    assert errors.report_error("prog", errors.UsageError("bad\n  option"), out) == errors.EX_USAGE
    assert errors.report_error("prog", KeyboardInterrupt(), out) == errors.EX_INTERRUPTED
    assert errors.report_error("prog", KeyError("k"), out) == errors.EX_FAILURE
    assert out.getvalue().splitlines() == ["prog: error: bad option", "prog: error: interrupted",
                                           "prog: error: unexpected KeyError: 'k'"]


def test_errors_module_imports_nothing_of_the_package():
    source = sys.modules["bids_dmri_ldm.errors"].__file__
    text = open(source).read()
    assert "from ." not in text and "import bids_dmri_ldm" not in text
