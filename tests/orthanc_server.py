"""Start a real Orthanc for tests: private storage, free ports, loopback-only REST, stopped by PID.

Orthanc 1.10 cannot bind its HTTP server to loopback only, so every server started here runs with
``RemoteAccessAllowed: false`` (Orthanc answers 403 to any client that is not on the loopback
interface) on free ports, with its storage, index and log in a private directory.

Typical use in a test module (one server per module, never per test)::

    from orthanc_server import OrthancServer, orthanc_fixture, gdcm_plugin

    orthanc = orthanc_fixture(plugins=lambda: [gdcm_plugin()], auth=True)

    @pytest.mark.orthanc
    def test_upload(orthanc):
        info = orthanc.upload(path)
        assert orthanc.get(f"/instances/{info['ID']}").status_code == 200

Or directly::

    server = OrthancServer(tmp_dir, plugins=[...], extra_config={"ClinVLA": {...}}, auth=True)
    server.start()
    try: ...
    finally: server.stop()

When the ``Orthanc`` binary is missing, :func:`require_orthanc` skips with the reason; with ``CI``
set it fails instead, because the Makefile's set-up installs Debian's ``orthanc`` package there.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pytest
import requests

__all__ = [
    "OrthancServer", "OrthancError", "orthanc_binary", "orthanc_plugin_dir", "gdcm_plugin",
    "require_orthanc", "orthanc_fixture", "free_port",
]

# Where Debian installs Orthanc; /usr/sbin is often not on a normal user's PATH.
_DEBIAN_BINARY = "/usr/sbin/Orthanc"
_DEBIAN_PLUGIN_DIR = "/usr/share/orthanc/plugins"
DEFAULT_USER = "clinvla-test"


class OrthancError(RuntimeError):
    """Orthanc did not start, died, or answered an unexpected status."""


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable: ``$CLINVLA_ORTHANC_BINARY``, ``Orthanc`` on PATH, or Debian's."""
    env = os.environ.get("CLINVLA_ORTHANC_BINARY")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("Orthanc")
    if found:
        return found
    return _DEBIAN_BINARY if os.access(_DEBIAN_BINARY, os.X_OK) else None


def orthanc_plugin_dir() -> Path:
    return Path(os.environ.get("CLINVLA_ORTHANC_PLUGIN_DIR", _DEBIAN_PLUGIN_DIR))


def gdcm_plugin() -> str | None:
    """Path of Orthanc's GDCM decoder plugin (Debian ``orthanc-gdcm``), or None when absent."""
    path = orthanc_plugin_dir() / "libOrthancGdcm.so"
    return str(path) if path.is_file() else None


def _missing_reason(need_gdcm: bool) -> str | None:
    if orthanc_binary() is None:
        return ("the Orthanc executable is not installed (not on PATH, not at /usr/sbin/Orthanc): "
                "install Debian's 'orthanc' package (make setup does it as root) or set "
                "CLINVLA_ORTHANC_BINARY")
    if need_gdcm and gdcm_plugin() is None:
        return (f"Orthanc's GDCM plugin is not at {orthanc_plugin_dir()}/libOrthancGdcm.so: install "
                "Debian's 'orthanc-gdcm' package or set CLINVLA_ORTHANC_PLUGIN_DIR")
    return None


def require_orthanc(need_gdcm: bool = False) -> str:
    """Return the Orthanc binary, or skip the calling test with the reason (fail when CI is set)."""
    reason = _missing_reason(need_gdcm)
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}", pytrace=False)
        pytest.skip(reason)
    return orthanc_binary()  # type: ignore[return-value]


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; start() retries on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, predicate, timeout: float = 60.0, interval: float = 0.1):
    """Polls predicate() until it returns a true value (returned); AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class OrthancServer:
    """One Orthanc process with its own configuration, storage, index and log under ``tmp_dir``.

    ``auth``: None (no authentication), True (a generated user and password), or ``(user, password)``.
    ``plugins``: paths of plugin shared libraries (or folders) for Orthanc's ``Plugins`` list.
    ``extra_config``: merged at the top level of the configuration (e.g. ``{"ClinVLA": {...}}``).
    ``modalities``: extra ``DicomModalities`` entries; the SCU used by :meth:`c_store` is always added.
    """

    SCU_AET = "CLINVLA_SCU"

    def __init__(self, tmp_dir: str | os.PathLike, plugins: Iterable[str | os.PathLike] = (),
                 extra_config: Mapping[str, Any] | None = None,
                 auth: bool | tuple[str, str] | None = None, *, aet: str = "ORTHANC",
                 modalities: Mapping[str, Any] | None = None, stable_age: int = 1,
                 verbose: bool = True, http_port: int | None = None, dicom_port: int | None = None,
                 env: Mapping[str, str] | None = None):
        self.dir = Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}  # the Orthanc process's environment
        self.plugins = [str(Path(p)) for p in plugins]
        for p in self.plugins:
            if not Path(p).exists():
                raise FileNotFoundError(f"Orthanc plugin {p} does not exist: build or install it first")
        self.extra_config = dict(extra_config or {})
        if auth is True:
            self.auth: tuple[str, str] | None = (DEFAULT_USER, secrets.token_urlsafe(16))
        elif auth:
            self.auth = (str(auth[0]), str(auth[1]))
        else:
            self.auth = None
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.stable_age = int(stable_age)
        self.verbose = verbose
        self._fixed_ports = http_port is not None or dicom_port is not None
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.storage_dir = self.dir / "storage"
        self.config_path = self.dir / "orthanc.json"
        self.log_path = self.dir / "orthanc.log"
        self._stdout_path = self.dir / "orthanc.stdout"
        self.proc: subprocess.Popen | None = None
        self._session = requests.Session()
        if self.auth:
            self._session.auth = self.auth

    # ----------------------------------------------------------------------------- properties
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config(self) -> dict:
        """The configuration written to ``orthanc.json`` at each start."""
        modalities = {self.SCU_AET.lower(): [self.SCU_AET, "127.0.0.1", free_port()]}
        modalities.update(self.modalities)
        cfg: dict[str, Any] = {
            "Name": f"clinvla-test-{self.http_port}",
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,       # 1.10 binds every interface: refuse non-loopback
            "HttpDescribeErrors": True,
            "DicomServerEnabled": True,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            "DicomModalities": modalities,
            "StableAge": self.stable_age,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 8,
            "DicomThreadsCount": 2,
            "Plugins": self.plugins,
            "AuthenticationEnabled": self.auth is not None,
            "RegisteredUsers": {self.auth[0]: self.auth[1]} if self.auth else {},
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
        }
        cfg.update(self.extra_config)
        return cfg

    # ----------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 30.0) -> "OrthancServer":
        """Start Orthanc and wait until ``/system`` answers; raise with the log's tail otherwise."""
        if self.running:
            return self
        binary = require_orthanc()
        attempts = 1 if self._fixed_ports else 3
        for attempt in range(attempts):
            tmp = self.config_path.with_name(f".{self.config_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.config(), indent=2))
            os.replace(tmp, self.config_path)
            args = [binary]
            if self.verbose:
                args.append("--verbose")
            args += [f"--logfile={self.log_path}", "--no-jobs", str(self.config_path)]
            with open(self._stdout_path, "ab") as out:
                self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=self.dir, env=self.env)
            try:
                self._wait_ready(timeout)
                return self
            except OrthancError:
                died = self.proc.poll() is not None
                self.kill()
                port_race = died and "address already in use" in self.log_text().lower()
                if not port_race or attempt == attempts - 1:
                    raise
                self.http_port, self.dicom_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with status {self.proc.returncode} while starting "
                                   f"(config {self.config_path}):\n{self.log_tail()}")
            try:
                r = self._session.get(self.url + "/system", timeout=2)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except requests.RequestException as exc:
                last = str(exc)
            time.sleep(0.1)
        raise OrthancError(f"Orthanc did not answer {self.url}/system within {timeout:.0f} s "
                           f"(last: {last}):\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM by PID, SIGKILL after ``timeout`` seconds; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL by PID: a crash, for durability tests."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, timeout: float = 30.0) -> "OrthancServer":
        """Stop (gracefully) and start again on the same ports, storage and configuration."""
        self.stop()
        self._fixed_ports = True
        return self.start(timeout=timeout)

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- logs
    def log_text(self) -> str:
        parts = []
        for path in (self.log_path, self._stdout_path):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_text().splitlines()
        return "\n".join(text[-lines:]) if text else f"(no log written at {self.log_path})"

    # ----------------------------------------------------------------------------- REST
    def request(self, method: str, path: str, *, check: bool = False, timeout: float = 30,
                **kwargs) -> requests.Response:
        """``method`` on ``path`` (relative to :attr:`url`) with the server's credentials.

        ``check=True`` raises :class:`OrthancError` naming the path, status and body on non-2xx.
        """
        url = path if path.startswith("http") else self.url + "/" + path.lstrip("/")
        r = self._session.request(method, url, timeout=timeout, **kwargs)
        if check and not r.ok:
            raise OrthancError(f"{method} {path} -> HTTP {r.status_code}: {r.text[:500]}")
        return r

    def get(self, path: str, **kw) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return self.request("POST", path, **kw)

    def put(self, path: str, **kw) -> requests.Response:
        return self.request("PUT", path, **kw)

    def delete(self, path: str, **kw) -> requests.Response:
        return self.request("DELETE", path, **kw)

    def upload(self, path_or_bytes: str | os.PathLike | bytes) -> dict:
        """POST one DICOM file to ``/instances``; returns Orthanc's answer (``ID``, ``ParentStudy``...)."""
        data = (bytes(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray))
                else Path(path_or_bytes).read_bytes())
        r = self.post("/instances", data=data, headers={"Content-Type": "application/dicom"})
        if not r.ok:
            name = "<bytes>" if isinstance(path_or_bytes, (bytes, bytearray)) else str(path_or_bytes)
            raise OrthancError(f"uploading {name} -> HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    def c_store(self, paths: Sequence[str | os.PathLike] | str | os.PathLike,
                calling_aet: str | None = None, timeout: float = 30) -> list[int]:
        """Send files with DICOM C-STORE (pynetdicom); returns each status, raises on any failure."""
        from pydicom import dcmread
        from pynetdicom import AE

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        datasets = [(str(p), dcmread(p)) for p in paths]
        ae = AE(ae_title=calling_aet or self.SCU_AET)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        for _, ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", self.dicom_port, ae_title=self.aet)
        if not assoc.is_established:
            raise OrthancError(f"C-STORE association to {self.aet}@127.0.0.1:{self.dicom_port} "
                               f"was not established:\n{self.log_tail()}")
        statuses = []
        try:
            for name, ds in datasets:
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is None or code != 0x0000:
                    raise OrthancError(f"C-STORE of {name} failed with status "
                                       f"{code if code is None else hex(code)}:\n{self.log_tail()}")
                statuses.append(int(code))
        finally:
            assoc.release()
        return statuses

    def wait_for_change(self, change_type: str, resource_id: str | None = None,
                        timeout: float = 30) -> dict:
        """Poll ``/changes`` until an event (e.g. ``StableStudy``) appears; return it."""
        deadline = time.monotonic() + timeout
        since = 0
        while time.monotonic() < deadline:
            body = self.get(f"/changes?since={since}&limit=1000", check=True).json()
            for change in body["Changes"]:
                if change["ChangeType"] == change_type and resource_id in (None, change["ID"]):
                    return change
            since = body["Last"]
            if body["Done"]:
                time.sleep(0.2)
        raise OrthancError(f"no {change_type} change{'' if resource_id is None else ' for ' + resource_id}"
                           f" within {timeout:.0f} s")

    def clear(self) -> None:
        """Delete every patient (and so every study, series, instance) stored."""
        for patient in self.get("/patients", check=True).json():
            self.delete(f"/patients/{patient}", check=True)


def orthanc_fixture(scope: str = "module", *, plugins: Iterable | Callable[[], Iterable] = (),
                    extra_config: Mapping | Callable[[Path], Mapping] | None = None,
                    auth: bool | tuple[str, str] | None = None, need_gdcm: bool = False,
                    start_timeout: float = 30.0, **server_kwargs):
    """Make a pytest fixture that starts one Orthanc per ``scope`` (module by default).

    ``plugins`` and ``extra_config`` may be callables, evaluated when the fixture runs (so a module
    can name a plugin that another fixture builds; ``extra_config`` receives the server's dir).
    The server is stopped by PID in the finalizer, whether the tests passed or not.
    """

    @pytest.fixture(scope=scope)
    def _orthanc(tmp_path_factory):
        require_orthanc(need_gdcm=need_gdcm)
        tmp = tmp_path_factory.mktemp("orthanc")
        plugin_list = list(plugins() if callable(plugins) else plugins)
        plugin_list = [p for p in plugin_list if p]
        cfg = extra_config(tmp) if callable(extra_config) else extra_config
        server = OrthancServer(tmp, plugins=plugin_list, extra_config=cfg, auth=auth,
                               **server_kwargs)
        try:
            server.start(timeout=start_timeout)
            yield server
        finally:
            server.stop()

    return _orthanc
