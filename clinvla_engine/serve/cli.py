"""``clinvla serve``: the argparse wiring (the package CLI adds it with ``add_serve_parser``).

    python -m clinvla_engine.serve.cli serve INDEX_DIR --engine ENGINE_DIR [--host 127.0.0.1] [--port 8000]
"""
from __future__ import annotations

import argparse
import sys

# kept equal to clinvla_engine.serve.app's defaults (a test checks); not imported from there, so that
# `clinvla --help` imports neither FastAPI nor torch
DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_K = 100


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {value}")
    return value


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return parse


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve an index over HTTP: a JSON API and a search page",
        description="Serve INDEX_DIR (clinvla index build) with ENGINE_DIR over HTTP: POST /search/text, "
                    "POST /search/image, GET /studies/{key}[/similar|/thumbnail], GET /health, the OpenAPI "
                    "schema at /openapi.json and a search page at /. The engine and index are loaded once. "
                    "Listening beyond loopback needs --token-file: every API request must then carry "
                    "'Authorization: Bearer <token>'.")
    p.add_argument("index", metavar="INDEX_DIR", help="index folder (clinvla index build)")
    p.add_argument("--engine", required=True, metavar="ENGINE_DIR", help="the engine bundle the index was built with")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other than loopback needs --token-file)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the bearer token (one line, at least 16 characters)")
    p.add_argument("--max-upload-mb", type=_positive(float), default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest accepted image upload, per view, in MiB (default {DEFAULT_MAX_UPLOAD_MB})")
    p.add_argument("--max-k", type=_positive(int), default=DEFAULT_MAX_K,
                   help=f"largest k a request may ask for (default {DEFAULT_MAX_K})")
    p.add_argument("--archive-root", default=None, metavar="DIR",
                   help="where the archive's images are now, for thumbnails (default: where they were embedded from)")
    p.add_argument("--device", default="cpu", help="engine device: cpu or cuda (default cpu)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=run_serve)
    return p


def run_serve(args) -> int:
    try:
        from .app import ServeError, run
    except ImportError as exc:
        print(f"clinvla serve: error: {exc.name or exc} is not installed: pip install 'clinvla-engine[serve]'",
              file=sys.stderr)
        return 2
    from ..search import SearchError

    try:
        run(args.index, args.engine, args.host, args.port, args.token_file,
            max_upload_bytes=int(args.max_upload_mb * 2**20), max_k=args.max_k, device=args.device,
            log_level=args.log_level, archive_root=args.archive_root)
    except (ServeError, SearchError, ValueError) as exc:
        print(f"clinvla serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinvla")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
