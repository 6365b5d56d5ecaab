"""nipype's log records through the root handlers only (standard library: no nipype import).

Called by the command line before nipype is imported, and in every worker process
(:func:`bids_dmri_ldm.workflows.execution.init_worker_logging`).
"""
from __future__ import annotations

import logging


def route_nipype_logs() -> None:
    """Send nipype's log records through the root handlers only (stderr and the log file).

    nipype adds its own stdout ``StreamHandler`` to the ``nipype`` logger when it is imported,
    unless that logger already has a handler; its records also propagate to the root logger, so
    with ``-vv`` every nipype line was printed twice. A ``NullHandler`` set before the import
    keeps nipype from adding its handler; one added by an earlier import is removed.
    """
    nipype_logger = logging.getLogger("nipype")
    for handler in list(nipype_logger.handlers):
        if type(handler) is logging.StreamHandler:
            nipype_logger.removeHandler(handler)
    if not nipype_logger.handlers:
        nipype_logger.addHandler(logging.NullHandler())
    nipype_logger.propagate = True
