"""``python -m bids_dmri_ldm.simulate OUT_DIR --subjects N ...`` (see :mod:`.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
