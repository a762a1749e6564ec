"""What every format loader returns (ArchiveDataset), its one finishing step, and the archive checks.

This module sits below the format loaders (mimic, chexpert, rsna, dicom) and below formats.py,
which dispatches to them: the loaders import from here, formats.py imports the loaders, and
nothing here imports either, so the import graph has no cycle.

A synthetic archive (``clinvla synth``) marks itself complete in its manifest only after its last
file is written; ``check_complete`` refuses one whose generator was stopped part-way, so that a
killed run is never read as a smaller, complete archive.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import normalise_split
from .study import DatasetError, Study

logger = logging.getLogger("clinvla_engine.data")

# The on-disk formats the loaders read, in the order detection tries them (see formats.py).
FORMATS = ("mimic", "chexpert", "rsna", "dicom")

# Written by the synthetic generator at the archive root; read here to refuse an unfinished one.
SYNTH_MANIFEST = "synth_manifest.json"

_PROBLEMS_SHOWN = 3


@dataclass
class ArchiveDataset:
    """The studies of one archive, in file order, and the problems met while reading it.

    problems are human-readable strings, one per skipped row / file / study (with the file name
    and line number where there is one), plus a few whole-file notes.
    """

    root: Path
    format: str
    studies: list[Study] = field(repr=False)
    problems: list[str] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.studies)

    def __iter__(self) -> Iterator[Study]:
        return iter(self.studies)

    def __getitem__(self, index: int | slice) -> Any:
        return self.studies[index]

    def __repr__(self) -> str:
        return (
            f"ArchiveDataset(format={self.format!r}, root={str(self.root)!r}, "
            f"studies={len(self.studies)}, problems={len(self.problems)})"
        )

    def split(self, name: str) -> list[Study]:
        """The studies of one split ("train", "validate", "test"; "val"/"valid" also work).

        Studies with no split information count as "train".
        """
        wanted = normalise_split(name)
        return [s for s in self.studies if (s.split or "train") == wanted]

    def split_names(self) -> list[str]:
        """The splits present, in first-seen order (no split info -> "train")."""
        return list(dict.fromkeys(s.split or "train" for s in self.studies))


def check_complete(root: str | Path) -> None:
    """Refuse a synthetic archive whose generator did not finish (DatasetError naming the fix).

    The manifest is looked for in root and in its parent, since a loader may be handed a
    subfolder of the archive (e.g. the CheXpert-v1.0-small folder inside it). Folders without a
    manifest are not synthetic archives and pass.
    """
    root = Path(root)
    for folder in (root, root.parent):
        manifest = folder / SYNTH_MANIFEST
        if not manifest.is_file():
            continue
        rerun = (
            f"re-run `clinvla synth --out {folder}` with the same arguments to rebuild it "
            "(it replaces its own files)"
        )
        try:
            record = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeError, ValueError) as exc:
            raise DatasetError(
                f"{folder}: synthetic archive with an unreadable {SYNTH_MANIFEST} ({exc}); the generator was "
                f"probably stopped while writing it; {rerun}"
            ) from None
        if not isinstance(record, dict) or record.get("complete") is not True:
            said = record.get("complete") if isinstance(record, dict) else record
            raise DatasetError(
                f"{folder}: incomplete synthetic archive ({SYNTH_MANIFEST} says complete: {said!r}, not true); "
                f"the generator was stopped before it finished, so files are missing; {rerun}"
            )
        return


def finish_dataset(
    root: Path, fmt: str, studies: list[Study], problems: list[str], *, empty_fix: str
) -> ArchiveDataset:
    """Refuse an unfinished synthetic archive or an empty dataset, log a one-line summary, wrap.

    Every loader ends here, so a loader called directly (not through open_dataset) still refuses
    an archive whose generator was stopped.
    """
    root = Path(root)
    check_complete(root)
    if problems:
        shown = "; ".join(problems[:_PROBLEMS_SHOWN])
        more = f" (+{len(problems) - _PROBLEMS_SHOWN} more)" if len(problems) > _PROBLEMS_SHOWN else ""
        logger.warning(
            "%s dataset %s: %d studies loaded, %d problems: %s%s",
            fmt, root, len(studies), len(problems), shown, more,
        )
    else:
        logger.info("%s dataset %s: %d studies loaded", fmt, root, len(studies))
    if not studies:
        detail = f" {len(problems)} problems, first: {'; '.join(problems[:_PROBLEMS_SHOWN])}." if problems else ""
        raise DatasetError(f"{root}: no usable {fmt} studies found.{detail} {empty_fix}".rstrip())
    return ArchiveDataset(root=root, format=fmt, studies=studies, problems=problems)
