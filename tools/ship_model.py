#!/usr/bin/env python3
"""Copy a model folder written by the group level into ``models/`` as a shipped model.

    python tools/ship_model.py TRAINED_MODEL_DIR models/NAME --provenance NOTES.md \\
        [--card CARD.md] [--strip-prefix /abs/path=PLACEHOLDER ...]

* every file of ``TRAINED_MODEL_DIR`` is copied except its checksum list;
* ``--card`` replaces (or, for a rish-global model, adds) ``MODEL_CARD.md``;
* absolute paths of the build machine (``--strip-prefix``) are replaced by placeholders in the
  model card, so the shipped card names no temporary folder;
* ``--provenance`` is appended to the card as a section "Shipped bundle" (what data, which
  command, where the held-out results are);
* the checksum list (the method's own name, :data:`bids_dmri_ldm.bundles.MODEL_FOLDERS`) is
  written anew over every file, then the folder is verified the way the participant level does.

The weights and ``config.json``/``rish_global.json`` are copied byte for byte: only the card
changes. The target folder is replaced atomically (written beside it, then renamed).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bids_dmri_ldm.bundles import (
    CHECKSUM_LISTS,
    checksum_list_text,
    find_checksum_list,
    read_checksum_list,
    sha256_file,
)
from bids_dmri_ldm.io.files import replace_dir

CARD = "MODEL_CARD.md"


def checksum_name(source: Path) -> str:
    """The checksum-list name the trained folder was written with (the method's own)."""
    found = find_checksum_list(source)
    if found is None:
        raise SystemExit(f"ship_model: {source} has no checksum list ({' or '.join(CHECKSUM_LISTS)})")
    return found.name


def shipped_card(text: str, prefixes: list[tuple[str, str]], provenance: str) -> str:
    """The card with build-machine paths replaced and the provenance section appended."""
    for prefix, placeholder in prefixes:
        text = text.replace(prefix, placeholder)
    return text.rstrip("\n") + "\n\n## Shipped bundle\n\n" + provenance.strip("\n") + "\n"


def write_checksums(folder: Path, name: str) -> None:
    """``sha256sum``-format list of every file in ``folder`` (sorted), written as ``name``."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != name)
    (folder / name).write_text(checksum_list_text(folder, files))


def verify(folder: Path, name: str) -> None:
    """Every listed file matches; every file is listed."""
    sums = read_checksum_list(folder / name)
    files = {p.name for p in folder.iterdir() if p.is_file() and p.name != name}
    if set(sums) != files:
        raise SystemExit(f"ship_model: checksum list of {folder} does not name exactly its files")
    for file, digest in sums.items():
        if sha256_file(folder / file) != digest:
            raise SystemExit(f"ship_model: {folder / file} does not match its checksum")


def ship(source: Path, target: Path, provenance: str, card: Path | None,
         prefixes: list[tuple[str, str]]) -> None:
    """Copy ``source`` to ``target`` as described in the module docstring."""
    name = checksum_name(source)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in CHECKSUM_LISTS:
                shutil.copy2(path, staging / path.name)
        card_text = card.read_text() if card is not None else (staging / CARD).read_text()
        (staging / CARD).write_text(shipped_card(card_text, prefixes, provenance))
        write_checksums(staging, name)
        verify(staging, name)
        staging.chmod(0o755)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="model folder written by the group level")
    parser.add_argument("target", type=Path, help="shipped folder, e.g. models/demo")
    parser.add_argument("--provenance", type=Path, required=True, help="Markdown appended to the card")
    parser.add_argument("--card", type=Path, help="model card to use instead of the folder's own")
    parser.add_argument("--strip-prefix", action="append", default=[], metavar="PATH=PLACEHOLDER")
    args = parser.parse_args(argv)
    prefixes = [tuple(item.split("=", 1)) for item in args.strip_prefix]
    if any(len(p) != 2 for p in prefixes):
        parser.error("--strip-prefix takes PATH=PLACEHOLDER")
    if args.card is None and not (args.source / CARD).is_file():
        parser.error(f"{args.source} has no {CARD}: give --card")
    ship(args.source, args.target, args.provenance.read_text(), args.card, prefixes)
    print(f"shipped {args.source} -> {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
