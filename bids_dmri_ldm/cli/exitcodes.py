"""Exit codes and the errors that carry them, as the command line names them.

They live in :mod:`bids_dmri_ldm.errors` (the bottom layer, which every module may import);
this module re-exports them for the command line and for existing callers.
"""
from __future__ import annotations

from ..errors import *
from ..errors import __all__  # noqa: F401
