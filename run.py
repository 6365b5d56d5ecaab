#!/usr/bin/env python3
"""BIDS App entry point: the same command as the ``bids-dmri-ldm`` console script."""
import sys

from bids_dmri_ldm.cli.run import main

if __name__ == "__main__":
    sys.exit(main())
