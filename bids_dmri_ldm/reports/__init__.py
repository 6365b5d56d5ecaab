"""Visual reports: the participant report ``sub-<label>.html`` and the group
training report ``group_training.html`` (self-contained HTML, figures made
with matplotlib's Agg backend, no network)."""

from bids_dmri_ldm.reports.html import report_section
from bids_dmri_ldm.reports.participant import (
    RunData,
    build_participant_report,
    regenerate_reports,
    render_participant_report,
)
from bids_dmri_ldm.reports.training import build_training_report, render_training_report

__all__ = [
    "RunData",
    "build_participant_report",
    "build_training_report",
    "regenerate_reports",
    "render_participant_report",
    "render_training_report",
    "report_section",
]
