"""Orthanc as a source for ``clinvla embed``: a whole PACS embedded from outside, over its REST API.

    clinvla embed --orthanc http://pacs:8042 --orthanc-user clinvla --engine engine/ --out store/
    # the password comes from $CLINVLA_ORTHANC_PASSWORD (or --orthanc-password-env VAR, or
    # --orthanc-password-file F); never from the command line, where `ps` would show it.

What it does, with the requests it makes:

1. ``GET /system``: the server answers and the credentials work, before the store is touched
   (401 stops with a message naming the user and the option).
2. ``GET /studies?since=M&limit=N``: every study's Orthanc id, page by page (``page_size``,
   default 100; supported by Orthanc since long before 1.10, tested with 1.10.1).
3. For each study the store does not hold yet, ``GET /studies/{id}/series`` (Modality is a main
   tag of a series), then for its CR/DX series only ``GET /series/{id}/instances-tags?simplify``:
   every instance's header (keyword -> value). Each header becomes the same manifest row as a
   file of a DICOM tree (``scan.header_row``: refusals, view rules from ``view_rules.json``), and
   ``views.pick_views`` picks the frontal and lateral. Headers of other series (CT, MR, the SR
   report objects with their text) are never fetched; a study without a CR/DX series, or without
   a frontal, is one scan problem (STORE/errors/scan.parquet), re-checked by the next run.
4. The decode workers ``GET /instances/{id}/file`` for the chosen instances, the original file as
   stored, and decode those bytes with ``decode.decode_dicom``, the function that decodes files
   from disk. So the same files give the same embeddings from Orthanc as from a folder. (Orthanc's
   GDCM plugin decodes for ``/preview``; the original file is decoded here, with the codecs of
   ``clinvla-engine[dicom]``.)

The store keys studies by **Orthanc's study id** (``study_key``; a SHA-1 of PatientID and
StudyInstanceUID, stable across re-imports and across Orthanc servers), with
``source_format = "orthanc"`` and ``frontal_path`` / ``lateral_path`` = ``instances/{id}``.
StudyInstanceUID and the other header facts are kept in ``STORE/manifest.parquet``: one row per
listed instance, the scan manifest's columns plus ``orthanc_study`` and ``orthanc_instance``
(path = ``instances/{id}``; file_size, mtime_ns and transfer_syntax are null: the tags do not
carry them). ``--resume`` skips the studies the committed shards hold without fetching their tags
again, and carries their manifest rows over.

Failures: connection errors, timeouts and HTTP 5xx are retried with exponential backoff
(``retries`` tries, ``backoff`` seconds doubling). A server that stays unreachable or an
authentication failure stops the run (``OrthancError``; committed shards stay, ``--resume``
continues); an instance that is gone (404) or keeps failing (5xx), or whose file does not decode,
is an error row of STORE/errors.parquet for its study and the run goes on. Orthanc 1.10 cannot bind
to loopback only; put it behind TLS (a reverse proxy) when the PACS is not on this machine, since
basic auth over plain HTTP sends the password readable by anyone on the path.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.io import ImageDecodeError
from .embed import SourceUnavailable, StudyMeta, StudySource, StudyTask
from .scan import MANIFEST_SCHEMA, header_row, write_table_atomic
from .store import StoreError, error_row

PASSWORD_ENV = "CLINVLA_ORTHANC_PASSWORD"
DEFAULT_PAGE_SIZE = 100
MANIFEST_NAME = "manifest.parquet"
ORTHANC_MANIFEST_SCHEMA = pa.schema(list(MANIFEST_SCHEMA) + [
    pa.field("orthanc_study", pa.string()),
    pa.field("orthanc_instance", pa.string()),
])
_RETRY_STATUS = range(500, 600)


class OrthancError(SourceUnavailable):
    """Orthanc as a whole cannot be used (unreachable, refuses us, answers nonsense): the run stops."""


class OrthancAuthError(OrthancError):
    """401/403: the credentials are wrong or missing."""


def read_password(env: str | None = None, file: str | os.PathLike | None = None) -> str | None:
    """The password from a file (first line), else the variable `env`, else CLINVLA_ORTHANC_PASSWORD."""
    if file is not None:
        path = Path(file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--orthanc-password-file {path}: cannot read it ({exc.strerror or exc})") from None
        lines = text.splitlines()
        if not lines or not lines[0]:
            raise ValueError(f"--orthanc-password-file {path}: the first line is empty; write the password there")
        return lines[0]
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise ValueError(f"--orthanc-password-env {env}: that environment variable is not set; "
                             f"export {env}=... first")
        return value
    return os.environ.get(PASSWORD_ENV)


class OrthancClient:
    """Orthanc's REST API with basic auth and retries; picklable (a decode worker gets a copy and
    opens its own connections). Calling it with ``instances/{id}`` returns that instance's file."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None, *,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 0.5):
        parts = urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"--orthanc {url!r} is not an http(s) URL; pass e.g. http://localhost:8042")
        if password is not None and not user:
            raise ValueError("an Orthanc password was given without a user; pass --orthanc-user")
        if user and password is None:
            raise ValueError(f"--orthanc-user {user} has no password: set {PASSWORD_ENV}, or pass "
                             "--orthanc-password-env VAR or --orthanc-password-file F")
        if retries < 1:
            raise ValueError(f"retries must be >= 1, got {retries}")
        self.url = url.rstrip("/")
        self.user = user
        self._password = password
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._local = threading.local()

    def __repr__(self) -> str:  # never the password
        return f"OrthancClient({self.url!r}, user={self.user!r})"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_local")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            if self.user:
                session.auth = (self.user, self._password)
            self._local.session = session
        return session

    def _auth_error(self, status: int, path: str) -> OrthancAuthError:
        if status == 401 and self.user:
            return OrthancAuthError(
                f"Orthanc at {self.url} refused user {self.user!r} (HTTP 401 on /{path}): wrong password or "
                f"unknown user. Check --orthanc-user and the password in {PASSWORD_ENV} (or the variable of "
                "--orthanc-password-env / the file of --orthanc-password-file)")
        if status == 401:
            return OrthancAuthError(
                f"Orthanc at {self.url} asks for a login (HTTP 401 on /{path}): pass --orthanc-user and set "
                f"the password in {PASSWORD_ENV} (or use --orthanc-password-env / --orthanc-password-file)")
        return OrthancAuthError(
            f"Orthanc at {self.url} forbids /{path} (HTTP 403): the user {self.user!r} lacks the right, or "
            "Orthanc refuses remote clients (RemoteAccessAllowed false); allow this machine in Orthanc's "
            "configuration")

    def get(self, path: str, *, stream_ok: bool = False):
        """GET url/path, retried on connection errors, timeouts and 5xx; the last response is returned
        (a 5xx after every retry included); 401/403 raise OrthancAuthError; no answer raises OrthancError."""
        import requests

        path = path.lstrip("/")
        delay = self.backoff
        last: str = ""
        for attempt in range(self.retries):
            if attempt:
                time.sleep(delay)
                delay *= 2
            try:
                r = self._session().get(f"{self.url}/{path}", timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
                self._local.session = None  # a broken pooled connection is not reused
                continue
            if r.status_code in (401, 403):
                raise self._auth_error(r.status_code, path)
            if r.status_code in _RETRY_STATUS and attempt < self.retries - 1:
                last = f"HTTP {r.status_code}"
                continue
            return r
        raise OrthancError(f"cannot reach Orthanc at {self.url} (GET /{path}, {self.retries} tries with backoff; "
                           f"last: {last}); check that it runs and that --orthanc is right, then --resume")

    def get_json(self, path: str) -> Any:
        r = self.get(path)
        if not r.ok:
            raise OrthancError(f"Orthanc at {self.url} answered HTTP {r.status_code} to GET /{path.lstrip('/')}: "
                               f"{r.text[:300]}")
        try:
            return r.json()
        except ValueError:
            raise OrthancError(f"{self.url}/{path.lstrip('/')} did not answer JSON; is --orthanc the URL of an "
                               "Orthanc server (its REST API root)?") from None

    def __call__(self, name: str) -> bytes:
        """The original DICOM file of ``instances/{id}``; ImageDecodeError (that study only) when it is
        gone or keeps failing."""
        r = self.get(f"{name}/file")
        if r.status_code == 404:
            raise ImageDecodeError(name, f"not in Orthanc any more (HTTP 404 from {self.url}/{name}/file); "
                                         "deleted after it was listed")
        if not r.ok:
            raise ImageDecodeError(name, f"Orthanc could not send the file (HTTP {r.status_code} from "
                                         f"{self.url}/{name}/file after {self.retries} tries: {r.text[:200]})")
        return r.content


class OrthancSource(StudySource):
    """Every study of an Orthanc server, for ``embed_archive`` (see the module doc)."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None, *,
                 page_size: int = DEFAULT_PAGE_SIZE, list_threads: int = 4, timeout: float = 60.0,
                 retries: int = 4, backoff: float = 0.5):
        if page_size < 1:
            raise ValueError(f"--orthanc-page-size must be >= 1, got {page_size}")
        self.client = OrthancClient(url, user, password, timeout=timeout, retries=retries, backoff=backoff)
        self.page_size = int(page_size)
        self.list_threads = max(1, int(list_threads))
        self.description = f"orthanc {self.client.url}"

    def open(self) -> dict:
        """Check that the server answers and accepts the credentials (before any store is opened)."""
        system = self.client.get_json("system")
        if not isinstance(system, dict) or "ApiVersion" not in system:
            raise OrthancError(f"{self.client.url}/system is not Orthanc's answer; pass the Orthanc REST root as "
                               "--orthanc")
        return system

    def reader(self) -> OrthancClient:
        return self.client

    def study_ids(self) -> list[str]:
        """Every study id, in Orthanc's order, page by page (since/limit)."""
        ids: list[str] = []
        since = 0
        while True:
            page = self.client.get_json(f"studies?since={since}&limit={self.page_size}")
            if not isinstance(page, list):
                raise OrthancError(f"{self.client.url}/studies did not answer a list of ids")
            ids.extend(str(x) for x in page)
            if len(page) < self.page_size:
                break
            since += len(page)
        seen: set[str] = set()  # a study added while paging can shift a page: keep the first of each
        return [i for i in ids if not (i in seen or seen.add(i))]

    def _study_rows(self, study: str, salt: bytes | None) -> list[dict] | str:
        """Manifest rows of the instances of one study's CR/DX series, or why there are none.

        The series list (Modality is one of its main tags) comes first, so the headers of a CT or
        MR series, and the report text of an SR, are never fetched."""
        from .views import modality_allowed

        r = self.client.get(f"studies/{study}/series")
        if r.status_code == 404:
            return "deleted from Orthanc while it was being listed"
        if not r.ok:
            return f"Orthanc could not list its series (HTTP {r.status_code}: {r.text[:200]})"
        try:
            series = [s for s in r.json() if isinstance(s, dict) and "ID" in s]
        except (ValueError, TypeError):
            return "Orthanc's series list is not JSON"
        modalities = {str((s.get("MainDicomTags") or {}).get("Modality") or "").strip(): s["ID"] for s in series}
        wanted = sorted(s["ID"] for s in series
                        if modality_allowed({"Modality": (s.get("MainDicomTags") or {}).get("Modality")}))
        if not wanted:
            found = "/".join(sorted(m or "blank" for m in modalities)) or "none"
            return f"no CR/DX series (modalities: {found}); not a chest radiograph study"
        rows = []
        for sid in wanted:
            r = self.client.get(f"series/{sid}/instances-tags?simplify")
            if r.status_code == 404:
                continue  # the series went away while listing: its study keeps the others
            if not r.ok:
                return f"Orthanc could not list the instances of series {sid} (HTTP {r.status_code}: {r.text[:200]})"
            try:
                headers = r.json()
            except ValueError:
                return f"Orthanc's instances-tags answer for series {sid} is not JSON"
            for instance, tags in sorted(headers.items()):
                if not isinstance(tags, dict):
                    continue
                row = header_row(tags, path=f"instances/{instance}", file_size=None, salt=salt)
                row.update(orthanc_study=study, orthanc_instance=instance)
                rows.append(row)
        return rows

    def collect(self, store: Path, workers: int, salt: bytes | None, scan_errors: list[dict], progress: bool,
                done: pa.Array) -> tuple[list[StudyTask], list[StudyMeta]]:
        from tqdm import tqdm

        from .phi import salt_fingerprint
        from .views import pick_views

        previous = _previous_manifest(store / MANIFEST_NAME)
        fingerprint = salt_fingerprint(salt) if salt is not None else None
        if previous is not None:
            old = (previous.schema.metadata or {}).get(b"clinvla.salt_fingerprint", b"").decode() or None
            if old != fingerprint:
                previous = None  # hashed with another salt (or none): its rows are not carried over
        ids = self.study_ids()
        is_done = (pc.is_in(pa.array(ids, pa.string()), value_set=done).to_pylist()
                   if len(done) and ids else [False] * len(ids))
        todo = [i for i, d in zip(ids, is_done) if not d]
        kept = None
        if previous is not None and len(ids) > len(todo):
            mask = pc.is_in(previous.column("orthanc_study"), value_set=pa.array(
                [i for i, d in zip(ids, is_done) if d], pa.string()))
            kept = previous.filter(mask)

        bar = tqdm(total=len(todo), unit="study", desc="Orthanc headers", disable=not progress)
        listed: dict[str, list[dict] | str] = {}
        with ThreadPoolExecutor(max_workers=self.list_threads) as pool:
            for study, rows in zip(todo, pool.map(lambda s: self._study_rows(s, salt), todo)):
                listed[study] = rows
                bar.update(1)
        bar.close()

        tasks: list[StudyTask] = []
        metas: list[StudyMeta] = []
        manifest_rows: list[dict] = []
        for study in todo:
            rows = listed[study]
            if isinstance(rows, str):
                scan_errors.append(error_row(f"studies/{study}", "scan", rows, study))
                continue
            manifest_rows.extend(rows)
            candidates = []
            for row in rows:
                if row.get("error"):
                    scan_errors.append(error_row(row["path"], "scan", row["error"], study))
                    continue
                candidates.append(row)
            if not candidates:
                continue
            frontal, lateral = pick_views(candidates)
            if frontal is None:
                views = "/".join(sorted({c.get("view_label") or c.get("view") or "?" for c in candidates}))
                scan_errors.append(error_row(f"studies/{study}", "scan",
                                             f"study has no frontal (PA/AP) image (views: {views}); skipped", study))
                continue
            tasks.append(StudyTask(study, frontal["path"], lateral["path"] if lateral is not None else None))
            codes = [frontal.get("view_label") or frontal.get("view_position") or ""]
            if lateral is not None:
                codes.append(lateral.get("view_label") or lateral.get("view_position") or "")
            metas.append(StudyMeta(study, "orthanc", frontal["path"], lateral["path"] if lateral is not None else None,
                                   codes, subject_hash=frontal.get("patient_id_hash"),
                                   accession_hash=frontal.get("accession_number_hash")))

        table = pa.Table.from_pylist(manifest_rows, schema=ORTHANC_MANIFEST_SCHEMA)
        if kept is not None and kept.num_rows:
            table = pa.concat_tables([kept.select(ORTHANC_MANIFEST_SCHEMA.names).cast(ORTHANC_MANIFEST_SCHEMA),
                                      table])
        table = table.replace_schema_metadata({
            b"clinvla.source": b"orthanc", b"clinvla.orthanc_url": self.client.url.encode(),
            b"clinvla.salt_fingerprint": (fingerprint or "").encode()})
        write_table_atomic(table, store / MANIFEST_NAME)
        return tasks, metas


def _previous_manifest(path: Path) -> pa.Table | None:
    """The manifest of an earlier Orthanc run into this store; refuses a store of another source."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # it is re-listed: a damaged one costs only the rows of done studies
        warnings.warn(f"{path}: previous manifest unreadable ({exc}); rows of embedded studies are not "
                      "carried over", stacklevel=3)
        return None
    if "orthanc_study" not in table.column_names:
        raise StoreError(f"{path.parent} holds a store embedded from a DICOM tree (its manifest has no Orthanc "
                         "ids); embed Orthanc into a new --out folder")
    return table


def orthanc_source_from_args(url: str, user: str | None, password_env: str | None,
                             password_file: str | None, page_size: int) -> OrthancSource:
    """The CLI's options -> an OrthancSource (the password never comes from the command line)."""
    if password_env is not None and password_file is not None:
        raise ValueError("pass only one of --orthanc-password-env and --orthanc-password-file")
    password = read_password(password_env, password_file) if user else None
    if user is None and (password_env is not None or password_file is not None):
        raise ValueError("--orthanc-password-env / --orthanc-password-file need --orthanc-user")
    return OrthancSource(url, user, password, page_size=page_size)
