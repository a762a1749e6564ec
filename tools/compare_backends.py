#!/usr/bin/env python3
"""Backend comparator (Polygraphy-style): the same inputs through PyTorch and every engine backend.

    tools/compare_backends.py CHECKPOINT [ENGINE_DIR ...] [--device cpu|cuda] [--precision fp32]
                              [--backends aoti,onnxruntime] [--studies 48] [--data DIR] [--json FILE]

With engine folders, compares each with the checkpoint. Without, builds one engine per backend
that can build here (into a temporary folder, or --keep DIR) and compares them all. Prints, per
backend and output, max abs error, mean abs error and min/mean cosine against PyTorch eager fp32,
the top-10 retrieval overlap, and the statistic used. The studies are the first --studies of your
own folder (--data DIR, any format clinvla_engine.data.open_dataset reads) or, without it, a
synthetic archive; each report says which.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("engines", nargs="*", help="engine bundles to compare (default: build one per backend)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "fp8"])
    ap.add_argument("--backends", help="comma-separated backends to build (default: all that build here)")
    ap.add_argument("--batch-sizes", default="1,8,64")
    ap.add_argument("--studies", type=int, default=48, help="studies compared (default 48; 0 = random inputs only)")
    ap.add_argument("--data", metavar="DIR", help="a folder of your own studies (default: a synthetic archive)")
    ap.add_argument("--keep", help="build the engines into this folder and keep them")
    ap.add_argument("--json", help="write every report here")
    args = ap.parse_args(argv)

    from clinvla_engine.export.build import BACKENDS, build_engine, parse_batch_sizes, resolve_device
    from clinvla_engine.export.inspection import compare
    from clinvla_engine.export.parity import format_report

    dirs = [Path(d) for d in args.engines]
    failures = {}
    if not dirs:
        device = resolve_device(args.device)
        root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="compare_backends_"))
        for name in (args.backends.split(",") if args.backends else list(BACKENDS)):
            why = BACKENDS[name].unsupported(device.type, args.precision)
            if why:
                failures[name] = why
                continue
            try:
                build_engine(args.checkpoint, root / name, backend=name, device=device.type, precision=args.precision,
                             batch_sizes=parse_batch_sizes(args.batch_sizes), parity_studies=0, strict=False,
                             force=True, progress=False)
                dirs.append(root / name)
            except Exception as exc:
                failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    reports = {}
    for d in dirs:
        report = compare(args.checkpoint, d, device=args.device, studies=args.studies, data=args.data)
        e = report["engine"]
        reports[str(d)] = report
        print(format_report(report, f"{e['backend']} ({e['device']}, {e['precision']}) {d}"))
        print()
    for name, why in failures.items():
        print(f"{name}: not compared ({why})")
    if args.json:
        from clinvla_engine.files import atomic_write_text

        atomic_write_text(args.json, json.dumps({"reports": reports, "not_built": failures}, indent=2, default=str))
    return 0 if reports and all(r["passed"] for r in reports.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
