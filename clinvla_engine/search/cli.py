"""`clinvla index build|update` and `clinvla search`: the command-line face of clinvla_engine.search.

    clinvla index build store/ -o index/
    clinvla index update index/ store/
    clinvla search index/ --engine engine/ --text "left pleural effusion" -k 10 --rerank 100
    clinvla search index/ --engine engine/ --image cxr.dcm --reports -k 3
    clinvla search index/ --engine engine/ --study 50414267 --filter has_lateral --label Edema --json

Errors print one line, `clinvla <command>: error: ...`, and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_search_parsers(subparsers) -> None:
    """Adds `index` (build, update) and `search` to a `clinvla` subparsers object."""
    p = subparsers.add_parser("index", help="build or update a search index from an embedding store",
                              description="Build or update the search index of an embedded archive "
                                          "(the Index file, its metadata and stored local features).")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="build INDEX_DIR from the committed shards of STORE")
    b.add_argument("store", help="the embedding store that `clinvla embed` wrote")
    b.add_argument("-o", "--out", required=True, help="the index folder to write (new or empty)")
    b.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="vector storage: float16 (default, half the memory, same ranking to ~1e-3) or float32")
    b.add_argument("--device", default="cpu", help="cpu (default) or cuda: where the vectors are added")
    b.add_argument("--force", action="store_true", help="replace an index already in --out")
    b.set_defaults(func=run_index_build)
    u = isub.add_parser("update", help="add the studies of STORE that INDEX_DIR does not hold yet")
    u.add_argument("index_dir")
    u.add_argument("store")
    u.set_defaults(func=run_index_update)

    s = subparsers.add_parser("search", help="search an indexed archive by text, image or study",
                              description="Two-stage search: the exact global top-N, then (with --rerank N) "
                                          "local word-to-region re-ranking of those N.")
    s.add_argument("index_dir")
    s.add_argument("--engine", required=True, help="the engine bundle the archive was embedded with")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="a finding or report sentence")
    q.add_argument("--image", help="a frontal image (DICOM, PNG or JPEG)")
    q.add_argument("--study", help="a study key of the index: more like this study")
    s.add_argument("--lateral", help="with --image: the study's lateral image")
    s.add_argument("-k", type=int, default=10, help="results (default 10, at most 1000)")
    s.add_argument("--rerank", type=int, default=0,
                   help="with --text: re-rank the global top N by local similarity (needs stored local features)")
    s.add_argument("--reports", action="store_true", help="with --image: print the best studies' whole reports")
    s.add_argument("--filter", action="append", default=[], choices=["has_lateral", "no_lateral"],
                   help="only studies with (has_lateral) or without (no_lateral) a lateral view")
    s.add_argument("--label", action="append", default=[], help="only studies with this CheXpert label = 1 "
                                                                 "(repeat for all of several)")
    s.add_argument("--split", help="only studies of this split (train, validate, test)")
    s.add_argument("--date-from", help="only studies on or after this ISO date (stores with study dates)")
    s.add_argument("--date-to", help="only studies on or before this ISO date")
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--archive-root", help="where the source images are now (default: recorded in the store)")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.set_defaults(func=run_search)


def _fail(command: str, exc: BaseException) -> int:
    print(f"clinvla {command}: error: {exc}", file=sys.stderr)
    return 2


def run_index_build(args) -> int:
    from .index_dir import IndexDirError, build_index

    try:
        summary = build_index(args.store, args.out, dtype=args.dtype, device=args.device, force=args.force)
    except (IndexDirError, OSError, ValueError) as exc:
        return _fail("index build", exc)
    print(json.dumps({k: summary[k] for k in ("studies", "added", "dim", "dtype", "with_lateral", "local", "seconds")}
                     | {"index": args.out}, indent=2))
    return 0


def run_index_update(args) -> int:
    from .index_dir import IndexDirError, update_index

    try:
        summary = update_index(args.index_dir, args.store)
    except (IndexDirError, OSError, ValueError) as exc:
        return _fail("index update", exc)
    print(json.dumps({k: summary[k] for k in ("studies", "added", "missing_from_store", "seconds")}
                     | {"index": args.index_dir}, indent=2))
    return 0


def _filters(args) -> dict | None:
    filters: dict = {}
    if "has_lateral" in args.filter and "no_lateral" in args.filter:
        raise ValueError("--filter has_lateral and --filter no_lateral exclude each other; give one")
    if args.filter:
        filters["has_lateral"] = "has_lateral" in args.filter
    if args.label:
        filters["label"] = args.label
    for name in ("split", "date_from", "date_to"):
        if getattr(args, name):
            filters[name] = getattr(args, name)
    return filters or None


def run_search(args) -> int:
    from ..runtime import BundleError
    from .service import SearchError, SearchService

    try:
        if args.lateral and not args.image:
            raise ValueError("--lateral goes with --image")
        if args.reports and not args.image:
            raise ValueError("--reports goes with --image (image to report)")
        if args.rerank and not args.text:
            raise ValueError("--rerank goes with --text: local re-ranking matches the query's words to regions")
        filters = _filters(args)
        with SearchService.open(args.index_dir, args.engine, device=args.device,
                                archive_root=args.archive_root) as service:
            if args.text is not None:
                results = service.search_text(args.text, k=args.k, rerank=args.rerank, filters=filters)
            elif args.study is not None:
                results = service.similar(args.study, k=args.k, filters=filters)
            elif args.reports:
                if filters:
                    raise ValueError("--reports takes no filters")
                results = service.reports_for_image(args.image, args.lateral, k=args.k)
            else:
                results = service.search_image(args.image, args.lateral, k=args.k, filters=filters)
    except (SearchError, BundleError, OSError, ValueError) as exc:
        return _fail("search", exc)
    if args.json:
        print(json.dumps({"results": results}, indent=2))
        return 0
    for r in results:
        local = "" if r["local_score"] is None else f"  local {r['local_score']:.3f}"
        labels = ", ".join(k for k, v in r["labels"].items() if v == 1.0)
        print(f"{r['rank']:>4}  {r['study_key']}  score {r['score']:.4f}{local}  [{'+'.join(r['views'])}]"
              + (f"  ({labels})" if labels else ""))
        if r["report"]:
            text = r["report"] if args.reports else r["report"].replace("\n", " ")
            print("      " + text.replace("\n", "\n      "))
    if not results:
        print("no studies match (check the filters)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinvla")
    sub = parser.add_subparsers(dest="command", required=True)
    add_search_parsers(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
