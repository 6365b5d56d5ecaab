"""``python -m bids_dmri_ldm.evaluate``: the entry point of the evaluation's command line.

The command line itself is :mod:`bids_dmri_ldm.evaluation.cli` (see its docstring and
docs/evaluation.md); this module keeps the documented ``python -m bids_dmri_ldm.evaluate``
working.
"""
from __future__ import annotations

import sys

from .evaluation.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
