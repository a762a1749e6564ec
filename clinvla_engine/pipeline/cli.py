"""``clinvla embed``: the argparse wiring (the package CLI adds it with ``add_embed_parser``).

    python -m clinvla_engine.pipeline.cli embed ARCHIVE --engine ENGINE_DIR --out STORE [--resume]
    python -m clinvla_engine.pipeline.cli embed --orthanc URL [--orthanc-user U] --engine ENGINE_DIR --out STORE
"""
from __future__ import annotations

import argparse
import json
import sys


def add_embed_parser(subparsers) -> argparse.ArgumentParser:
    from .embed import DEFAULT_SHARD_ROWS, default_workers

    p = subparsers.add_parser(
        "embed", help="embed every study of an archive into a resumable Parquet store",
        description="Embed an archive (MIMIC-CXR-JPG, CheXpert, RSNA or a DICOM tree) with an engine bundle into "
                    "STORE/shards/part-*.parquet; failed studies go to STORE/errors.parquet. Safe to kill: "
                    "run again with --resume to continue where the committed shards end.")
    p.add_argument("source", metavar="SOURCE", nargs="?", default=None,
                   help="archive folder (or --orthanc URL instead)")
    pacs = p.add_argument_group(
        "Orthanc as the source", "embed every CR/DX study of an Orthanc server over its REST API; the store keys "
        "studies by Orthanc's study id (StudyInstanceUID is kept in STORE/manifest.parquet). The password is "
        f"read from ${_password_env()}, from the variable named by --orthanc-password-env, or from the file "
        "of --orthanc-password-file; never from the command line")
    pacs.add_argument("--orthanc", metavar="URL", default=None, help="Orthanc REST root, e.g. http://pacs:8042")
    pacs.add_argument("--orthanc-user", metavar="USER", default=None, help="HTTP basic-auth user")
    pacs.add_argument("--orthanc-password-env", metavar="VAR", default=None,
                      help=f"environment variable holding the password (default: {_password_env()})")
    pacs.add_argument("--orthanc-password-file", metavar="FILE", default=None,
                      help="file whose first line is the password")
    pacs.add_argument("--orthanc-page-size", type=int, default=100, metavar="N",
                      help="studies per /studies page (default 100)")
    p.add_argument("--engine", required=True, metavar="ENGINE_DIR", help="engine bundle (clinvla-build-engine)")
    p.add_argument("--out", required=True, metavar="STORE", help="store folder (new, or an existing one with --resume)")
    p.add_argument("--format", dest="fmt", default=None, choices=["mimic", "chexpert", "rsna", "dicom"],
                   help="archive format (default: detected)")
    p.add_argument("--workers", type=int, default=None,
                   help=f"decode processes (default: cores - 1 = {default_workers()}; 0 decodes in the main process)")
    p.add_argument("--batch-size", type=int, default=64, help="studies per engine call (default 64)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: worker processes on this machine; ray: Ray Data on the cluster of --ray-address")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--local-features", choices=["none", "pooled", "full"], default="none",
                   help="also store region features: pooled (2x2 cells per view) or full (every patch)")
    p.add_argument("--resume", action="store_true", help="continue a store: skip the studies it already holds")
    p.add_argument("--limit", type=int, default=None, help="embed at most N new studies in this run")
    p.add_argument("--salt-file", default=None,
                   help="file with the secret salt for hashing patient ids and accession numbers "
                        "(without it no patient identifier is stored, not even hashed)")
    p.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS,
                   help=f"studies per committed shard (default {DEFAULT_SHARD_ROWS}; a kill loses at most one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_embed)
    return p


def _password_env() -> str:
    from .orthanc import PASSWORD_ENV

    return PASSWORD_ENV


def _source(args):
    """SOURCE folder or an OrthancSource; exactly one of SOURCE and --orthanc."""
    if args.orthanc is None:
        if args.source is None:
            raise ValueError("pass an archive folder SOURCE, or --orthanc URL to embed an Orthanc server")
        if args.orthanc_user or args.orthanc_password_env or args.orthanc_password_file:
            raise ValueError("--orthanc-user / --orthanc-password-* only apply with --orthanc URL")
        return args.source
    if args.source is not None:
        raise ValueError(f"pass either SOURCE ({args.source}) or --orthanc URL, not both")
    if args.fmt is not None:
        raise ValueError("--format does not apply to --orthanc (its instances are DICOM)")
    from .orthanc import orthanc_source_from_args

    return orthanc_source_from_args(args.orthanc, args.orthanc_user, args.orthanc_password_env,
                                    args.orthanc_password_file, args.orthanc_page_size)


def run_embed(args) -> int:
    from ..data.study import DatasetError
    from ..runtime import BundleError
    from .embed import SourceUnavailable, embed_archive
    from .phi import SaltError
    from .store import StoreError

    try:
        summary = embed_archive(
            _source(args), args.engine, args.out, fmt=args.fmt, workers=args.workers, batch_size=args.batch_size,
            executor=args.executor, local_features=args.local_features, resume=args.resume, limit=args.limit,
            salt_file=args.salt_file, progress=not args.no_progress, shard_rows=args.shard_rows,
            ray_address=args.ray_address)
    except (StoreError, BundleError, DatasetError, SaltError, SourceUnavailable, ValueError) as exc:
        print(f"clinvla embed: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("store", "studies", "failed_studies", "embedded", "failed",
                                              "already_done", "scan_problems", "remaining", "seconds",
                                              "studies_per_s")}, indent=2))
    if summary["failed"] or summary["scan_problems"]:
        print(f"clinvla embed: {summary['failed']} studies failed and {summary['scan_problems']} archive problems "
              f"were skipped; each is a row of {summary['store']}/errors.parquet (input, stage, reason)",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinvla")
    sub = parser.add_subparsers(dest="command", required=True)
    add_embed_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
