"""The HTTP service: FastAPI routes over one open ``SearchService``, the page, and ``run`` (uvicorn).

Routes (the OpenAPI schema at ``/openapi.json`` is the reference)::

    POST /search/text                 {"text", "k", "rerank", "filters"} -> {"results": [...]}
    POST /search/image                multipart: frontal (DICOM, PNG or JPEG), lateral?, k, filters?
    GET  /studies/{key}               one study's metadata and report
    GET  /studies/{key}/similar?k=    more like this
    GET  /studies/{key}/thumbnail     image/png
    GET  /health                      index and engine summary
    GET  /                            the search page (static/)

One service (engine + index) is opened once and shared by every request. The routes are plain
``def`` functions, so FastAPI runs them in its threadpool: the event loop keeps accepting requests
while the engine computes. Bad input is a 4xx whose ``detail`` names the problem; nothing a client
sends stops the process.
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures, whose models are
# local to create_app (their limits are its arguments), at runtime
import datetime
import hmac
import ipaddress
import json
import logging
import math
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..search import NotFound, SearchError  # BadQuery is a SearchError: 400 like any refused query

log = logging.getLogger("clinvla.serve")

STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20  # a 2500 x 3000 16-bit DICOM is about 15 MiB uncompressed
DEFAULT_MAX_K = 100
DEFAULT_MAX_RERANK = 1000  # re-ranking costs B x regions x words per candidate: bounded like k
MAX_TEXT_CHARS = 4000  # the text encoder truncates far below this; longer is a mistake, not a query
MIN_TOKEN_CHARS = 16
# the body of a multipart request is two uploads plus form fields and boundaries
_MULTIPART_SLACK = 64 * 1024
_REALM = 'Bearer realm="clinvla"'
# the page loads nothing from elsewhere: the CSP makes that a rule the browser enforces
_PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
             "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


class ServeError(Exception):
    """A service that must not start (non-loopback without a token, a bad token file)."""


# ---- request bodies and answers (the OpenAPI schema is built from these) --------------------------
class Result(BaseModel):
    """One hit, best first. ``score`` is the ranking score (after re-ranking when asked for)."""
    model_config = ConfigDict(extra="allow")
    study_key: str
    score: float | None
    local_score: float | None = None
    rank: int
    views: list[str]
    report: str | None = None
    labels: Any = None


class Results(BaseModel):
    results: list[Result]


class Filters(BaseModel):
    """Metadata conditions (all must hold); a filtered search is still exact over the allowed studies.
    Typed here, not passed through as a free dict, so a wrong type is a 422 that names the field."""
    model_config = ConfigDict(extra="forbid")
    has_lateral: bool | None = Field(None, description="only studies with (true) or without (false) a lateral view")
    # at most 16 names: each one costs a pass over the whole index
    label: str | Annotated[list[str], Field(max_length=16)] | None = Field(
        None, description="CheXpert label name(s) that must be positive")
    split: str | None = Field(None, description="train, validate or test, where the archive says")
    date_from: datetime.date | None = Field(None, description="first study date, inclusive (indexes with dates)")
    date_to: datetime.date | None = Field(None, description="last study date, inclusive (indexes with dates)")

    def for_service(self) -> dict | None:
        given = {k: (v.isoformat() if isinstance(v, datetime.date) else v)
                 for k, v in self.model_dump(exclude_none=True).items()}
        return given or None


class ErrorBody(BaseModel):
    detail: str


def _errors(*codes: int) -> dict:
    what = {400: "bad input (the message names it)", 401: "missing or wrong bearer token",
            404: "unknown study key", 413: "request or upload over the size limit",
            415: "upload is not a DICOM, PNG or JPEG file"}
    return {c: {"model": ErrorBody, "description": what[c]} for c in codes}


def _sniff(data: bytes) -> str | None:
    """The upload's format from its first bytes, never from the client's file name or type."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return None


def _plain(value: Any) -> Any:
    """numpy scalars and arrays to plain JSON values; NaN and inf (no JSON form) to null, not a 500."""
    import numpy as np

    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return None  # binary belongs to the thumbnail route, never inside JSON
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return value


class _BodyLimit:
    """Refuses a request body over ``max_bytes`` with 413 before any route (or the multipart
    parser, which would otherwise spool it to disk) sees it. Declared lengths are refused without
    reading; chunked bodies are counted as they arrive and never held beyond the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _send_error(send, 400, f"Content-Length {declared[:40]!r} is not a number")
            if int(declared) > self.max_bytes:
                return await _send_error(send, 413, self._message(int(declared)))
            return await self.app(scope, receive, send)
        messages, total = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                return await _send_error(send, 413, self._message(total, at_least=True))
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    def _message(self, size: int, at_least: bool = False) -> str:
        return (f"request body is {'over ' if at_least else ''}{size:,} bytes; this service accepts at most "
                f"{self.max_bytes:,} (two uploads of --max-upload-mb each plus form fields)")


async def _send_error(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(service, *, token: str | None = None, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_k: int = DEFAULT_MAX_K, max_rerank: int = DEFAULT_MAX_RERANK) -> FastAPI:
    """The FastAPI app over an open ``SearchService`` (shared by all requests, never reopened).

    token: when set, every route except the page, its static files and the schema needs
    ``Authorization: Bearer <token>`` (compared in constant time). max_upload_bytes bounds each
    uploaded image; max_k bounds k (and is written into the schema, so clients and schemathesis
    see it).

    No lock around the service: SearchService is thread-safe (its engine runners lock what is not,
    the index search shares nothing between calls), so requests run in parallel in the threadpool;
    tests/test_serve.py checks concurrent answers equal sequential ones.
    """
    if max_k < 1 or max_upload_bytes < 1 or max_rerank < 0:
        raise ValueError(f"limits must be positive: max_k={max_k}, max_upload_bytes={max_upload_bytes}, "
                         f"max_rerank={max_rerank}")
    if token is not None and not token:
        raise ValueError("token must be a non-empty string, or None for no token")
    # the service has its own ceilings: a larger limit here would put a false bound in the schema
    ceilings = service.health() if hasattr(service, "health") else {}
    for name, mine in (("max_k", max_k), ("max_rerank", max_rerank)):
        theirs = ceilings.get(name) if isinstance(ceilings, dict) else None
        if isinstance(theirs, int) and mine > theirs:
            raise ValueError(f"{name}={mine} is above the search service's own limit of {theirs}")
    default_k = min(10, max_k)

    # no /docs or /redoc: FastAPI's viewers load their scripts from a CDN, and this service must work
    # (and load nothing from elsewhere) on a closed hospital network; /openapi.json is the reference
    app = FastAPI(title="ClinVLA search", version="1", docs_url=None, redoc_url=None,
                  description="Search a chest X-ray archive by text, by image, or by example study. "
                              + ("Every route except /, /static and /openapi.json needs a bearer token."
                                 if token else "No token: the service listens on loopback only."))
    app.state.service = service

    # ---- the token rule -------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="the token of --token-file")
    expected = token.encode() if token else None

    def require_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if creds is None:
            raise HTTPException(401, "missing bearer token: send the header 'Authorization: Bearer <token>' "
                                     "with the token of the server's --token-file",
                                headers={"WWW-Authenticate": _REALM})
        # compare_digest on bytes: constant time, and no TypeError on non-ASCII input
        if not hmac.compare_digest(creds.credentials.encode("utf-8", "surrogateescape"), expected):
            raise HTTPException(401, "wrong bearer token: it does not match the server's --token-file",
                                headers={"WWW-Authenticate": _REALM + ', error="invalid_token"'})

    guarded = [Depends(require_token)] if token else []
    auth_errors = (401,) if token else ()

    # ---- errors ---------------------------------------------------------------------------------
    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound):
        return JSONResponse({"detail": str(exc) or "unknown study key"}, status_code=404)

    @app.exception_handler(SearchError)  # BadQuery and any other refusal of the query itself
    async def _bad_query(request: Request, exc: SearchError):
        return JSONResponse({"detail": str(exc) or type(exc).__name__}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        # FastAPI's list of errors, plus one line that names every problem for people and the page
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b[:80].decode("latin-1")})
        for e in errors:  # the raw input can be a whole upload: never echo it back
            e.pop("input", None)
            e.pop("ctx", None)
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
        return JSONResponse({"detail": errors, "message": message}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # logged with its traceback; the client gets the type, the service keeps serving
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"},
                            status_code=500)

    # ---- the API --------------------------------------------------------------------------------
    # strict: JSON true or 2.0 is not a count (lax pydantic would read them as 1 and 2)
    K = Annotated[int, Field(ge=1, le=max_k, strict=True, description=f"results wanted, 1 to {max_k}")]

    class TextQuery(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS, description="findings to search for",
                          examples=["left lower lobe consolidation"])
        k: K = default_k
        rerank: int = Field(0, ge=0, le=max_rerank, strict=True,
                            description="re-rank this many global candidates with local (word-to-region) "
                                        "features; 0: global ranking only")
        filters: Filters | None = None

        @field_validator("text")
        @classmethod
        def _not_blank(cls, text: str) -> str:
            if not text.strip():
                raise ValueError("text is blank: give findings to search for")
            return text

    @app.post("/search/text", response_model=Results, dependencies=guarded, tags=["search"],
              responses=_errors(400, *auth_errors, 413))
    def search_text(query: TextQuery) -> Results:
        """Studies whose images best match the text, best first."""
        hits = service.search_text(query.text, k=query.k, rerank=query.rerank,
                                   filters=query.filters.for_service() if query.filters else None)
        return JSONResponse({"results": _plain(hits)})

    def _read_upload(upload: UploadFile | None, role: str) -> bytes | None:
        if upload is None:
            return None
        data = upload.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"{role} upload {upload.filename!r} is over {max_upload_bytes:,} bytes, "
                                     f"the limit of this service (--max-upload-mb)")
        if not data:
            raise HTTPException(400, f"{role} upload {upload.filename!r} is empty")
        if _sniff(data) is None:
            raise HTTPException(415, f"{role} upload {upload.filename!r} is not a DICOM, PNG or JPEG file "
                                     f"(its first bytes are {data[:8]!r}); send one of those")
        return data

    def _parse_filters(text: str | None) -> dict | None:
        # multipart has no nested fields: the filters travel as one JSON form field
        if text is None or not text.strip():
            return None
        try:
            return Filters.model_validate_json(text).for_service()
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'filters'}: {e['msg']}" for e in exc.errors())
            raise HTTPException(400, f"filters is not a valid JSON filter object ({problems}); send e.g. "
                                     '{"has_lateral": true}') from None

    @app.post("/search/image", response_model=Results, dependencies=guarded, tags=["search"],
              responses=_errors(400, *auth_errors, 413, 415))
    def search_image(
        frontal: Annotated[UploadFile, File(description="frontal view: DICOM, PNG or JPEG")],
        # typed UploadFile, not `| None`: the schema then says "an optional file", not "a file or null"
        lateral: Annotated[UploadFile, File(description="lateral view of the same study (optional)")] = None,
        k: Annotated[int, Form(ge=1, le=max_k, description=f"results wanted, 1 to {max_k}")] = default_k,
        filters: Annotated[str | None, Form(description="metadata filters as a JSON object")] = None,
    ) -> Results:
        """Studies most like the uploaded views (one study: frontal, and lateral when present)."""
        front, side = _read_upload(frontal, "frontal"), _read_upload(lateral, "lateral")
        wanted = _parse_filters(filters)
        hits = service.search_image(front, side, k=k, filters=wanted)
        return JSONResponse({"results": _plain(hits)})

    # `{key:path}`: CheXpert keys hold a slash (patient00001/study1). The suffixed routes come
    # first so that ".../similar" is never read as part of a key.
    @app.get("/studies/{key:path}/similar", response_model=Results, dependencies=guarded, tags=["studies"],
             responses=_errors(400, *auth_errors, 404))
    def similar(key: str, k: Annotated[int, Query(ge=1, le=max_k)] = default_k) -> Results:
        """More like this: the studies nearest to a stored study (the study itself excluded)."""
        hits = service.similar(key, k=k)
        return JSONResponse({"results": _plain(hits)})

    @app.get("/studies/{key:path}/thumbnail", dependencies=guarded, tags=["studies"], response_class=Response,
             responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                              "description": "the frontal view as PNG"},
                        **_errors(400, *auth_errors, 404)})
    def thumbnail(key: str, size: Annotated[int, Query(ge=16, le=1024)] = 256) -> Response:
        """The study's frontal view, at most size pixels on its long side."""
        png = service.thumbnail(key, size=size)  # reads the archive file, no engine call
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/studies/{key:path}", dependencies=guarded, tags=["studies"], response_model=dict[str, Any],
             responses=_errors(400, *auth_errors, 404))
    def study(key: str) -> dict:
        """One stored study: views, report, labels and what else the index holds about it."""
        return JSONResponse(_plain(service.study(key)))

    @app.get("/health", dependencies=guarded, response_model=dict[str, Any], tags=["service"],
             responses=_errors(*auth_errors))
    def health() -> dict:
        """The index and engine this process serves (studies, engine fingerprint, limits)."""
        info = _plain(service.health())
        if isinstance(info, dict):
            info.setdefault("limits", {"max_k": max_k, "max_rerank": max_rerank, "max_upload_bytes": max_upload_bytes,
                                       "token_required": token is not None})
        return JSONResponse(info)

    # ---- the page -------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    # outermost: a body over the limit never reaches the multipart parser
    app.add_middleware(_BodyLimit, max_bytes=2 * max_upload_bytes + _MULTIPART_SLACK)
    return app


# ---- running it -----------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Only literal loopback addresses and 'localhost' count: any other name may resolve anywhere."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | Path) -> str:
    path = Path(token_file)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServeError(f"cannot read the token file {path}: {exc}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token) or not token.isascii():
        raise ServeError(f"the token in {path} must be one line of at least {MIN_TOKEN_CHARS} printable ASCII "
                         f"characters without spaces (got {len(token)} characters); make one with: "
                         f"python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}")
    return token


def check_listen(host: str, token: str | None) -> None:
    if token is None and not is_loopback(host):
        raise ServeError(f"refusing to listen on {host} without a token: anyone who can reach it could search "
                         f"the archive. Give --token-file FILE, or listen on 127.0.0.1")


def run(index_dir, engine_dir, host: str = "127.0.0.1", port: int = 8000, token_file=None, *,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_k: int = DEFAULT_MAX_K, device: str = "cpu",
        log_level: str = "info", archive_root=None) -> None:
    """Opens the index and engine once, then serves them with uvicorn until interrupted.

    archive_root: where the source images are now, for thumbnails (default: where they were
    embedded from, as the index records)."""
    import uvicorn

    from ..search import SearchService

    token = read_token(token_file) if token_file else None
    check_listen(host, token)  # before the (slow) engine load: a refusal is immediate
    extra = {"archive_root": archive_root} if archive_root else {}  # beyond the minimal open() contract
    service = SearchService.open(index_dir, engine_dir, device=device, **extra)
    app = create_app(service, token=token, max_upload_bytes=max_upload_bytes, max_k=max_k)
    shown = f"[{host}]" if ":" in host else host
    print(f"clinvla serve: http://{shown}:{port}/ ({'bearer token required' if token else 'no token, loopback only'})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
