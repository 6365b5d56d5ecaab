#!/usr/bin/env python3
"""BIDS App entry point: the same command as the ``bids-dmri-ldm`` console script."""
from bids_dmri_ldm.cli.run import console_main

if __name__ == "__main__":
    console_main()
