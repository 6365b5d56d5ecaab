"""The version string, read from the top-level ``version`` file (one source of truth)."""
from importlib import metadata as _metadata
from pathlib import Path as _Path


def _read_version() -> str:
    source_file = _Path(__file__).resolve().parent.parent / "version"
    if source_file.is_file():
        return source_file.read_text().strip()
    try:
        return _metadata.version("bids-dmri-ldm")
    except _metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "0+unknown"


__version__ = _read_version()
