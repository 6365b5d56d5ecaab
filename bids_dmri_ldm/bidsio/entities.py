"""BIDS entities of a file name (standard library only: the light command lines import it)."""
from __future__ import annotations

import os
from pathlib import Path


def parse_entities(filename: str | os.PathLike) -> dict[str, str]:
    """Key-value entities of a BIDS file name, e.g. ``{'sub': '01', 'ses': '1', 'run': '2'}``."""
    stem = Path(filename).name.split(".", 1)[0]
    entities = {}
    for part in stem.split("_")[:-1]:  # the last part is the suffix
        key, sep, value = part.partition("-")
        if sep:
            entities[key] = value
    return entities
