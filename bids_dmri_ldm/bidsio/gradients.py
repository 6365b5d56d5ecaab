"""Which ``.bval``/``.bvec`` file belongs to a DWI image: the BIDS inheritance principle.

One rule (:class:`GradientIndex`) for the run collection (over a pybids layout,
:meth:`GradientIndex.from_layout`) and for the participant report (over the folders
above one raw DWI file, :func:`find_gradient_file`, without pybids).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import BadDataError
from .entities import parse_entities


class GradientIndex:
    """All ``*dwi.bval``/``*dwi.bvec`` files of a layout, resolved by the inheritance principle.

    A gradient file applies to a DWI image when it lies in the image's folder or a parent
    folder and every entity in its name is also in the image's name with the same label; the
    nearest folder wins, then the file with the most entities.

    Written here instead of calling pybids ``get_bval``/``get_bvec`` per run for two reasons:
    pybids ``get_nearest`` only compares the entities both files share, so it accepts a
    sibling ``sub-01_acq-b_dwi.bval`` for ``sub-01_dwi.nii.gz`` (a wrong table, silently);
    and it queries the whole index on every call (~0.1 s per file, minutes for large
    datasets). One query up front and a walk up the folders is exact and fast.
    """

    def __init__(self, files: Iterable[tuple[Mapping[str, Any], str]], root: str | Path):
        """Index ``(entities, path)`` of gradient files; lookups stop at ``root``."""
        self._files: dict[tuple[Path, str], list[tuple[dict, str]]] = defaultdict(list)
        for entities, path in files:
            kind = str(path).rsplit(".", 1)[-1]
            own = {k: str(v) for k, v in entities.items()}
            self._files[(Path(path).parent, kind)].append((own, str(path)))
        for candidates in self._files.values():
            candidates.sort(key=lambda item: (-len(item[0]), item[1]))
        self.root = Path(root)

    @classmethod
    def from_layout(cls, layout) -> GradientIndex:
        """Every ``*dwi.bval``/``*dwi.bvec`` of a pybids layout (pybids entity names)."""
        found = layout.get(return_type="object", suffix="dwi", extension=[".bval", ".bvec"])
        files = [({k: v for k, v in f.get_entities().items() if k not in ("suffix", "extension")}, f.path)
                 for f in found]
        return cls(files, layout.root)

    def find(self, dwi_path: str | Path, entities: Mapping[str, Any], kind: str) -> str | None:
        """The ``kind`` ("bval" or "bvec") file that applies to ``dwi_path``, or None."""
        own = {k: str(v) for k, v in entities.items()}
        folder = Path(dwi_path).parent
        while True:
            for theirs, path in self._files.get((folder, kind), ()):
                if all(own.get(k) == v for k, v in theirs.items()):
                    return path
            if folder == self.root or folder.parent == folder:
                return None
            folder = folder.parent


def gradient_file(index: GradientIndex, bids_file, kind: str, stem: str) -> str:
    """The ``kind`` file of a pybids DWI file; *bad data* (65) when there is none."""
    found = index.find(bids_file.path, bids_file.get_entities(), kind)
    if found is None:
        raise BadDataError(
            f"{stem}: no .{kind} file found (next to the image or inherited from a parent "
            f"folder, e.g. dwi.{kind} at the dataset root)"
        )
    return found




def find_gradient_file(dwi: str | Path, extension: str) -> Path:
    """``.bval``/``.bvec`` (``extension``) of a raw DWI file, by the same rule, without pybids.

    The candidates are the ``*dwi<extension>`` files of the DWI's folder and of its parents
    up to the dataset root (the first folder holding ``dataset_description.json``); entities
    are read from the file names (:func:`~.entities.parse_entities`).

    Raises
    ------
    FileNotFoundError
        No gradient file applies.
    """
    dwi = Path(dwi)
    files, root = [], dwi.parent
    for folder in dwi.parents:
        files += [(parse_entities(p.name), str(p)) for p in folder.glob(f"*dwi{extension}")]
        root = folder
        if (folder / "dataset_description.json").exists():
            break
    found = GradientIndex(files, root).find(dwi, parse_entities(dwi.name), extension.lstrip("."))
    if found is None:
        raise FileNotFoundError(f"no {extension} file for {dwi.name}")
    return Path(found)


__all__ = ["GradientIndex", "find_gradient_file", "gradient_file"]
