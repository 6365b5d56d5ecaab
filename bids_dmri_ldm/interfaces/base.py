"""What every participant-level nipype interface shares: the typed failure record.

A step that raises writes a :class:`~bids_dmri_ldm.errors.StepFailure` (the exception's class,
message and :class:`~bids_dmri_ldm.errors.FailureCategory`, taken from the live exception in the
worker) to ``outcome_file`` before nipype records its crash file, so that the workflow
classifies the run's failure by type without reading the crash file's traceback text
(:func:`bids_dmri_ldm.workflows.base.run_participant`). ``outcome_file`` is set by the workflow
per invocation and is not part of the node's hash (``nohash``): it never invalidates the cache.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import ClassVar

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network at run time

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    SimpleInterface,
    isdefined,
    traits,
)

from ..errors import StepFailure
from ..io.files import atomic_write_json

#: Name pattern of the records in a run's outcome folder (sorted by name: the first failure first).
FAILURE_GLOB = "failure-*.json"


class StepInputSpec(BaseInterfaceInputSpec):
    outcome_file = traits.Str(nohash=True, desc="folder for the typed record of a failure (set by the workflow)")


class StepInterface(SimpleInterface):
    """A :class:`SimpleInterface` whose ``_run_step`` failures leave a typed record."""

    input_spec = StepInputSpec
    #: True for a step that never imports torch: while the worker server is still importing it,
    #: the pool may run such a step in a worker forked from the main process, which has not
    #: (:class:`~bids_dmri_ldm.workflows.execution.WorkerPoolPlugin`). A step marked so that
    #: imports torch after all still runs, importing it itself (~1.7 s).
    torch_free: ClassVar[bool] = False

    def _run_interface(self, runtime):
        try:
            return self._run_step(runtime)
        except Exception as error:
            folder = self.inputs.outcome_file if isdefined(self.inputs.outcome_file) else ""
            if folder:
                write_failure(Path(folder), StepFailure.from_exception(error, type(self).__name__))
            raise

    def _run_step(self, runtime):  # pragma: no cover - every step overrides it
        raise NotImplementedError


def write_failure(folder: Path, failure: StepFailure) -> Path:
    """Write ``failure`` into ``folder`` as ``failure-<ns>-<pid>.json`` (atomic)."""
    path = folder / f"failure-{time.time_ns():020d}-{os.getpid()}.json"
    return atomic_write_json(path, failure.to_dict())


def read_failures(folder: Path) -> list[StepFailure]:
    """The records in ``folder``, earliest first (unreadable ones skipped)."""
    import json

    found = []
    for path in sorted(folder.glob(FAILURE_GLOB)):
        try:
            found.append(StepFailure.from_dict(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError):
            continue
    return found
