"""Domain errors (bids_dmri_ldm.errors): run-failure categories by type, one-line reports."""
import gzip
import io
import json
import sys

import nibabel as nib
import numpy as np
import pytest

from bids_dmri_ldm import errors
from bids_dmri_ldm.bidsio.derivatives import OutputWriteError
from bids_dmri_ldm.core.gradients import GradientError
from bids_dmri_ldm.errors import FailureCategory, failure_category
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


@pytest.mark.parametrize("error, category", [
    (errors.InputDataError("sub-01_dwi.nii.gz: 3 volumes, 2 gradients"), FailureCategory.BAD_DATA),
    (PermissionError("denied"), FailureCategory.CANNOT_WRITE),
    (MemoryError(), FailureCategory.RESOURCES),
    (RuntimeError("boom\nsecond line"), None),
])
def test_step_failure_record_keeps_the_type_and_category_through_json(error, category):
    record = errors.StepFailure.from_exception(error, "FitRISH")
    back = errors.StepFailure.from_dict(json.loads(json.dumps(record.to_dict())))
    assert back == record and back.category is category and back.step == "FitRISH"
    assert back.exception == f"{type(error).__module__}.{type(error).__qualname__}"
    assert back.name == type(error).__name__
    assert back.message == (str(error).splitlines()[0] if str(error) else type(error).__name__)


def test_a_failing_step_interface_writes_its_record_and_still_raises(tmp_path):
    """The typed record the workflow classifies a failed run by (no crash-file text parsing)."""
    from bids_dmri_ldm.interfaces.base import read_failures
    from bids_dmri_ldm.interfaces.dwi import SelectShells

    dwi = tmp_path / "sub-01_dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)), dwi)
    node = SelectShells(dwi_file=str(dwi), bval_file=None, bvec_file=None, options={},
                        outcome_file=str(tmp_path / "outcome"))
    with pytest.raises(errors.InputDataError, match="no .bval file"):
        node.run(cwd=str(tmp_path))
    (failure,) = read_failures(tmp_path / "outcome")
    assert failure.category is FailureCategory.BAD_DATA and failure.name == "InputDataError"
    assert failure.step == "SelectShells" and "no .bval file" in failure.message


def test_outcome_folder_is_not_part_of_the_node_hash(tmp_path):
    from bids_dmri_ldm.interfaces.dwi import SelectShells

    a = SelectShells(dwi_file=__file__, options={}, outcome_file="/a")
    b = SelectShells(dwi_file=__file__, options={}, outcome_file="/b")
    assert a.inputs.get_hashval()[1] == b.inputs.get_hashval()[1]


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
