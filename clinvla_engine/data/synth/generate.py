"""Writing an archive: the output folder's safety, rendering workers, files in plan order, the manifest.

The manifest is written first with `"complete": false` and replaced (atomically) by one with
`"complete": true` only after the last file; the loaders refuse an archive whose manifest does not
say complete, so a stopped run is never read as a smaller archive.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
import uuid
from pathlib import Path

import numpy as np

from .. import reports
from ..archive import SYNTH_MANIFEST
from ..study import CLASSES
from .planning import GENERATOR, MIXES, SPLITS, Planned, check_arguments, plan_studies
from .records import Anatomy, RenderedStudy, sample_anatomy, sample_findings
from .render import render_visible
from .writers import FILE_LIST, WRITERS, ArchiveFiles

SYNTH_VERSION = "2.1"  # 2.0: lateral-needed sites, lateral boxes, report wording and negation rates;
# 2.1: thinner, airless lateral-needed opacities (less frontal haze); the "probe" class mix
MANIFEST = SYNTH_MANIFEST  # the name lives with the loaders, which read it to refuse a partial archive
TRUTH = "synth_truth.jsonl"
_MANIFEST_TEMP = f".{MANIFEST}."  # prefix of the manifest's temporary names (see _write_manifest)


def _write_manifest(out: Path, text: str) -> None:
    """Write the manifest under a unique temporary name, then rename it into place, so that a
    reader (or a run killed here) only ever sees a whole manifest, the old or the new one."""
    temp = out / f"{_MANIFEST_TEMP}{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, out / MANIFEST)
    finally:
        temp.unlink(missing_ok=True)


def _prepare_out(out: Path) -> None:
    """Refuse a folder holding anything but a previous synthetic archive; clear that archive's files."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={out} is a file, not a folder; pass a new or empty folder")
    if not out.exists() or not any(out.iterdir()):
        return
    manifest = out / MANIFEST
    try:
        ours = json.loads(manifest.read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise FileExistsError(f"output folder {out} is not empty and is not a synthetic archive (no {MANIFEST} from "
                              f"{GENERATOR}); pass a new or empty folder. Nothing was changed.")
    listing = out / FILE_LIST
    listed = {line for line in listing.read_text().splitlines() if line} if listing.is_file() else set()
    listed |= {MANIFEST, FILE_LIST}
    # a run killed between writing a manifest's temporary file and renaming it leaves that file
    listed |= {p.name for p in out.glob(f"{_MANIFEST_TEMP}*.tmp") if p.is_file()}
    foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.is_dir()
                     and p.relative_to(out).as_posix() not in listed)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise FileExistsError(f"output folder {out} holds a synthetic archive plus files it did not write "
                              f"({', '.join(foreign[:3])}{more}); move them away or pass another folder. "
                              "Nothing was changed.")
    root = out.resolve()
    emptied = set()
    for rel in sorted(listed):
        path = (out / rel).resolve()
        if path.parent != root and root not in path.parents:
            continue  # a listing that points outside the archive is not followed
        path.unlink(missing_ok=True)
        emptied.update(p for p in path.parents if root in p.parents)
    for folder in sorted(emptied, key=lambda p: len(p.parts), reverse=True):  # only folders we emptied
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _manifest(seed, studies, fmt, size, lateral_fraction, fractions, complete: bool, summary=None,
              mix: str = "archive") -> str:
    return json.dumps({"generator": GENERATOR, "version": SYNTH_VERSION, "seed": seed, "studies": studies,
                       "format": fmt, "size": size, "lateral_fraction": lateral_fraction, "mix": mix,
                       "split_fractions": list(fractions), "complete": complete, "summary": summary}, indent=2)


# below this many studies the rendering stays in this process (starting workers costs ~1 s)
PARALLEL_MIN_STUDIES = 256


def _render_planned(job: tuple[int, int, Planned]) -> tuple[Anatomy, RenderedStudy, reports.Report]:
    """Everything random about one planned study, from its own seeds only, so that the result does
    not depend on which process renders it or in which order."""
    seed, size, p = job
    anatomy = sample_anatomy(np.random.default_rng([seed, 1, p.subject]))
    findings = sample_findings(np.random.default_rng([seed, 2, p.index]), list(p.labels), lateral=p.has_lateral,
                               lateral_site=p.lateral_site)
    rendered = render_visible(anatomy, findings, size, [seed, 3, p.index], p.has_lateral, p.view_position)
    report = reports.write_report(rendered.findings, np.random.default_rng([seed, 4, p.index]),
                                  has_lateral=p.has_lateral)
    return anatomy, rendered, report


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def generate_archive(out: str | Path, studies: int, seed: int, fmt: str = "mimic", size: int = 256,
                     lateral_fraction: float = 0.85, split_fractions=(0.8, 0.1, 0.1), progress: bool = True,
                     workers: int | None = None, mix: str = "archive") -> dict:
    """Write a synthetic archive of `studies` studies in format `fmt` into folder `out`.

    The same arguments give the same files (CSVs, reports and pixels), whatever `workers` is: the
    studies are rendered by `workers` processes (default: one per available core; archives under
    PARALLEL_MIN_STUDIES studies render in this process) and written here in order. `out` must be
    new, empty, or a previous synthetic archive (whose files, and only those, are replaced).
    `mix` picks the class mix (planning.MIXES): "archive" (CLASS_MIX) or "probe" (PROBE_MIX, for the
    per-view probe). Returns a summary: counts per class (drawn findings), per split, of exclusively positive
    studies per class (from the labels), images written, and the time taken.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    fractions = check_arguments(studies, fmt, size, lateral_fraction, split_fractions, mix)
    if fmt in ("dicom", "rsna"):
        try:
            import pydicom  # noqa: F401
        except ImportError as exc:  # pragma: no cover - pydicom is a dev dependency
            raise ImportError(f"fmt={fmt!r} writes DICOM files and needs pydicom: "
                              "pip install 'clinvla-engine[dicom]'") from exc
    studies, size, seed = int(studies), int(size), int(seed)
    out = Path(out).expanduser()
    _prepare_out(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    archive = ArchiveFiles(out, seed, size)
    archive.claim(MANIFEST)
    _write_manifest(out, _manifest(seed, 0, fmt, size, lateral_fraction, fractions, complete=False, mix=mix))
    plan = plan_studies(studies, seed, fmt, float(lateral_fraction), fractions, mix)
    writer = WRITERS[fmt](archive)
    per_class = {c: 0 for c in CLASSES}
    per_split = {s: 0 for s in SPLITS}
    exclusive = {c: 0 for c in CLASSES}
    from tqdm import tqdm

    workers = min(workers or default_workers(), studies) if studies >= PARALLEL_MIN_STUDIES else 1
    pool = None
    if workers > 1:
        # spawn, not fork: the caller may hold torch's thread pools, which do not survive a fork
        pool = multiprocessing.get_context("spawn").Pool(workers)
        rendered_studies = pool.imap(_render_planned, ((seed, size, p) for p in plan), chunksize=8)
    else:
        rendered_studies = map(_render_planned, ((seed, size, p) for p in plan))
    bar = tqdm(total=studies, desc=f"synth {fmt} {size}px", unit="study", disable=not progress, mininterval=0.5)
    try:
        with open(archive.claim(TRUTH), "w", encoding="utf-8") as truth:
            for p, (anatomy, rendered, report) in zip(plan, rendered_studies):
                writer.study(p, rendered, report, anatomy, np.random.default_rng([seed, 5, p.index]))
                truth.write(json.dumps({"study_id": p.ids["study_id"], "subject_id": p.ids["subject_id"],
                                        "split": p.split, "has_lateral": p.has_lateral,
                                        "view_position": p.view_position,
                                        "findings": [f.truth() for f in rendered.findings]}) + "\n")
                for f in rendered.findings:
                    per_class[f.label] += 1
                per_class["No Finding"] += not rendered.findings
                per_split[p.split] += 1
                positive = [c for c in CLASSES if report.labels.get(c) == reports.POSITIVE]
                if len(positive) == 1:
                    exclusive[positive[0]] += 1
                bar.update(1)
        writer.finish()
    finally:
        if pool is not None:
            pool.terminate()  # every result has been read, or we are unwinding an error
            pool.join()
        bar.close()
        archive.close()
    seconds = time.perf_counter() - t0
    summary = {"out": str(out), "format": fmt, "studies": studies, "subjects": len({p.subject for p in plan}),
               "images": archive.images, "size": size, "per_class": per_class, "per_split": per_split,
               "exclusive_positive": exclusive, "workers": workers, "seconds": round(seconds, 2),
               "studies_per_second": round(studies / max(seconds, 1e-9), 1)}
    # the commit point: only now do the loaders accept the archive (see clinvla_engine.data.archive)
    _write_manifest(out, _manifest(seed, studies, fmt, size, lateral_fraction, fractions, True, summary, mix))
    return summary
