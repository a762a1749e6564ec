#!/usr/bin/env python3
"""Per-view probe of a synthetic archive: AUROC of a supervised classifier per finding group from the
frontal view, the lateral view and both (see clinvla_engine/data/synth/probe.py).

    tools/probe_views.py --archive DIR [--size PX] [--out probe.json] [--seed 0] [--l2 0.05]
                         [--features contrast,texture] [--views frontal,lateral,both] [--shuffle-labels]
                         [--generate N --mix probe --format mimic --archive-size 128 --gen-seed 0]

A linear probe of fixed local-contrast features, cross-fitted over five folds of patients, on the
studies with both views (every study is scored by a model that never saw its patient). With
--generate N, first writes a synthetic archive of N studies (every study with a lateral view; the
"probe" class mix by default) into --archive (a new or empty folder, or a previous synthetic archive).
Prints a table; --out writes the whole result as JSON.
Exit status 1 when a stratum has no number (too few studies), 2 when the archive cannot be probed.
"""
from __future__ import annotations

import argparse
import json
import sys


def _table(result: dict) -> str:
    from clinvla_engine.data.synth.probe import GROUPS

    views = list(result["auroc"])
    lines = ["| group | n+ / n- | " + " | ".join(views) + " |", "| --- | --- |" + " --- |" * len(views)]
    for g in GROUPS:
        cells = []
        for v in views:
            r = result["auroc"][v][g]
            cells.append("n/a" if r["auroc"] is None else f"{r['auroc']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
        r = result["auroc"][views[0]][g]
        lines.append(f"| {g} | {r['n_pos']} / {r['n_neg']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, help="a synthetic archive folder (mimic or chexpert format)")
    ap.add_argument("--size", type=int, default=None,
                    help="pixels a side the probe reads the images at (default: the archive's size)")
    ap.add_argument("--out", help="write the result here as JSON")
    ap.add_argument("--l2", type=float, default=None, help="ridge strength (default probe.L2)")
    ap.add_argument("--features", default=None, help="comma-separated kinds: contrast, texture, level "
                    "(default contrast,texture)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--views", default="frontal,lateral,both", help="view settings to probe (comma-separated)")
    ap.add_argument("--shuffle-labels", action="store_true", help="control: permute the training labels")
    ap.add_argument("--generate", type=int, metavar="N", help="first generate an archive of N studies")
    ap.add_argument("--format", default="mimic", choices=["mimic", "chexpert"])
    ap.add_argument("--mix", default="probe", choices=["probe", "archive"], help="class mix of a generated archive")
    ap.add_argument("--archive-size", type=int, default=None, help="pixels of the generated images (default --size)")
    ap.add_argument("--gen-seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.size is not None and (args.size < 32 or args.size % 16):
        ap.error(f"--size {args.size}: the probe reads images at a multiple of 16 pixels >= 32 (e.g. 64 or 128)")
    if args.l2 is not None and not args.l2 > 0:
        ap.error(f"--l2 {args.l2}: use a positive ridge strength (e.g. 0.05)")

    from clinvla_engine.data.synth import generate_archive
    from clinvla_engine.data.synth.probe import FEATURES, L2, ProbeError, run_probe
    from clinvla_engine.files import atomic_write_text

    features = tuple(args.features.split(",")) if args.features else FEATURES
    if args.generate:
        summary = generate_archive(args.archive, args.generate, args.gen_seed, fmt=args.format,
                                   size=args.archive_size or args.size or 128, lateral_fraction=1.0,
                                   mix=args.mix)
        print(f"generated {summary['studies']} studies in {summary['seconds']} s "
              f"({summary['studies_per_second']} studies/s, {summary['workers']} workers)", file=sys.stderr)
    try:
        result = run_probe(args.archive, args.size, features=features, seed=args.seed, l2=args.l2 or L2,
                           shuffle_labels=args.shuffle_labels, views=tuple(args.views.split(",")), progress=True)
    except ProbeError as exc:
        print(f"probe_views: {exc}", file=sys.stderr)
        return 2
    print(_table(result))
    print(f"{result['studies_with_both_views']} studies with both views, {result['folds']}-fold cross-fitted by "
          f"patient, {result['size']} px, features {','.join(result['features'])}, {result['seconds']} s")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    missing = [s for s in ("lateral_needed", "frontal_favoured") for v in result["auroc"]
               if result["auroc"][v][s]["auroc"] is None]
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
