"""`clinvla serve` end to end: a real tiny engine bundle, a synthetic archive embedded with pooled
local features, a real index and SearchService; the HTTP API in process (every bad-input case, the
token rule, the body and k limits), a real uvicorn process started through the CLI (concurrent
clients, schemathesis against its OpenAPI schema), and the page in Debian's chromium via Playwright.
"""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="fastapi is not installed: pip install 'clinvla-engine[serve]'")
pytest.importorskip("multipart", reason="python-multipart is not installed: pip install 'clinvla-engine[serve]'")
httpx = pytest.importorskip("httpx", reason="httpx is not installed: pip install 'clinvla-engine[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

from clinvla_engine.serve.app import (  # noqa: E402
    DEFAULT_MAX_K, DEFAULT_MAX_UPLOAD_BYTES, ServeError, check_listen, create_app, is_loopback, read_token)

STUDIES = 40
MAX_K = 20
MAX_UPLOAD = 64 * 1024  # the synthetic images are 64 px JPEGs of about 2 KiB
TOKEN = "test-token-0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


# ---- fixtures: built the way tests/test_embed.py builds them (and shared with it in one run) -------
@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    for name in ("onnx", "onnxscript", "onnxruntime", "onnx_graphsurgeon"):
        pytest.importorskip(name, reason=f"{name} is not installed: pip install 'clinvla-engine[export]'")
    from clinvla_engine.export.testing import bundle

    # the same root as test_embed.py: bundle() is cached per root, so one run builds it once
    return bundle(str(tmp_path_factory.getbasetemp() / "embed-engines"), "onnxruntime", "cpu")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from clinvla_engine.data.synth import generate_archive

    out = tmp_path_factory.getbasetemp() / "embed-archive-mimic"  # test_embed.py's archive, same seed
    if not out.exists():
        generate_archive(out, STUDIES, seed=3, fmt="mimic", size=64, progress=False, workers=1)
    return out


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, engine_dir, archive):
    from clinvla_engine.pipeline.embed import embed_archive
    from clinvla_engine.search.index_dir import build_index

    base = tmp_path_factory.mktemp("serve")
    summary = embed_archive(archive, engine_dir, base / "store", workers=0, batch_size=8,
                            local_features="pooled", progress=False)
    assert summary["embedded"] == STUDIES and summary["failed"] == 0
    build_index(base / "store", base / "index")
    return base / "index"


@pytest.fixture(scope="module")
def service(index_dir, engine_dir):
    from clinvla_engine.search import SearchService

    svc = SearchService.open(index_dir, engine_dir)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service, max_k=MAX_K, max_upload_bytes=MAX_UPLOAD)) as c:
        yield c


@pytest.fixture(scope="module")
def keys(client):
    """Study keys from the API itself (the union of a few k=MAX_K text searches), sorted."""
    found = set()
    for text in ("pleural effusion", "no acute cardiopulmonary process", "cardiomegaly", "pneumothorax"):
        answer = client.post("/search/text", json={"text": text, "k": MAX_K}).json()
        found |= {r["study_key"] for r in answer["results"]}
    return sorted(found)


@pytest.fixture(scope="module")
def frontal_jpeg(client, service, archive):
    """(study key, bytes of its own frontal JPEG) of a study without a lateral view: an image query
    whose best match is known (a two-view study's embedding also holds its lateral)."""
    one_view = client.post("/search/text", json={"text": "lungs", "k": 1, "filters": {"has_lateral": False}})
    key = one_view.json()["results"][0]["study_key"]
    return key, (archive / service.study(key)["frontal_path"]).read_bytes()


def _png(jpeg: bytes) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, format="PNG")
    return buf.getvalue()


def _dicom(jpeg: bytes) -> bytes:
    """The JPEG's pixels as an uncompressed 8-bit MONOCHROME2 DICOM file (what a PACS export holds)."""
    pydicom = pytest.importorskip("pydicom", reason="pydicom is not installed: pip install 'clinvla-engine[dicom]'")
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _keys(results):
    return [r["study_key"] for r in results]


def _check_ranked(results, k):
    assert len(results) == k
    assert [r["rank"] for r in results] == list(range(1, k + 1))
    for r in results:
        assert set(r) >= {"study_key", "score", "local_score", "rank", "views", "report", "labels"}
        assert r["views"] and r["views"][0] == "frontal"


# ---- the API, in process -------------------------------------------------------------------------
def test_text_search_is_the_services_answer_best_first(client, service):
    got = client.post("/search/text", json={"text": "small left pleural effusion", "k": 7})
    assert got.status_code == 200, got.text
    results = got.json()["results"]
    _check_ranked(results, 7)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(r["local_score"] is None for r in results)
    want = service.search_text("small left pleural effusion", k=7)
    assert _keys(results) == _keys(want)
    np.testing.assert_allclose(scores, [w["score"] for w in want], rtol=1e-6)


def test_rerank_orders_by_local_score_within_the_global_candidates(client):
    text = "moderate pulmonary edema"
    glob = client.post("/search/text", json={"text": text, "k": 15}).json()["results"]
    reranked = client.post("/search/text", json={"text": text, "k": 5, "rerank": 15}).json()["results"]
    _check_ranked(reranked, 5)
    local = [r["local_score"] for r in reranked]
    assert all(isinstance(s, float) for s in local) and local == sorted(local, reverse=True)
    assert set(_keys(reranked)) <= set(_keys(glob))  # re-ranking reorders the 15, never adds one


def test_filters_restrict_the_exact_search(client, service):
    results = client.post("/search/text", json={"text": "effusion", "k": MAX_K,
                                                "filters": {"has_lateral": False}}).json()["results"]
    assert results, "the synthetic archive has studies without a lateral view"
    assert all(r["views"] == ["frontal"] for r in results)
    want = service.search_text("effusion", k=MAX_K, filters={"has_lateral": False})
    assert _keys(results) == _keys(want)


@pytest.mark.parametrize("kind", ["jpeg", "png", "dicom"])
def test_image_search_finds_the_study_the_image_came_from(client, service, frontal_jpeg, kind):
    key, jpeg = frontal_jpeg
    data = {"jpeg": lambda b: b, "png": _png, "dicom": _dicom}[kind](jpeg)
    got = client.post("/search/image", files={"frontal": (f"query.{kind}", data)}, data={"k": "5"})
    assert got.status_code == 200, got.text
    results = got.json()["results"]
    _check_ranked(results, 5)
    assert _keys(results) == _keys(service.search_image(data, k=5))
    if kind != "dicom":  # same pixels as the stored study: it must be the best match
        assert results[0]["study_key"] == key and results[0]["score"] > 0.99


def test_image_search_with_lateral_and_filters(client, service, archive, keys):
    with_lateral = next(k for k in keys if len(service.study(k)["views"]) == 2)
    info = service.study(with_lateral)
    front, side = (archive / info["frontal_path"]).read_bytes(), (archive / info["lateral_path"]).read_bytes()
    got = client.post("/search/image", files={"frontal": ("f.jpg", front), "lateral": ("l.jpg", side)},
                      data={"k": "3", "filters": json.dumps({"has_lateral": True})})
    assert got.status_code == 200, got.text
    results = got.json()["results"]
    assert results[0]["study_key"] == with_lateral
    assert all(r["views"] == ["frontal", "lateral"] for r in results)


def test_study_similar_and_thumbnail(client, service, keys):
    from PIL import Image

    key = keys[3]
    study = client.get(f"/studies/{key}")
    assert study.status_code == 200 and study.json()["study_key"] == key
    assert study.json()["report"] == service.study(key)["report"]

    similar = client.get(f"/studies/{key}/similar", params={"k": 6}).json()["results"]
    _check_ranked(similar, 6)
    assert key not in _keys(similar) and _keys(similar) == _keys(service.similar(key, k=6))

    thumb = client.get(f"/studies/{key}/thumbnail", params={"size": 48})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(thumb.content))
    assert img.format == "PNG" and max(img.size) == 48


def test_health_counts_queries_on_one_shared_service(client):
    before = client.get("/health").json()
    for _ in range(3):
        assert client.post("/search/text", json={"text": "atelectasis", "k": 2}).status_code == 200
    after = client.get("/health").json()
    assert after["studies"] == STUDIES
    assert after["limits"] == {"max_k": MAX_K, "max_rerank": 1000, "max_upload_bytes": MAX_UPLOAD,
                               "token_required": False}
    # a service reopened per request would start its counter again
    assert after["queries_served"] == before["queries_served"] + 3


def test_openapi_declares_limits_and_the_png(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/search/text", "/search/image", "/studies/{key}", "/studies/{key}/similar",
                                    "/studies/{key}/thumbnail", "/health"}
    thumb = schema["paths"]["/studies/{key}/thumbnail"]["get"]["responses"]["200"]["content"]
    assert list(thumb) == ["image/png"]
    k = next(p for p in schema["paths"]["/studies/{key}/similar"]["get"]["parameters"] if p["name"] == "k")
    assert k["schema"]["maximum"] == MAX_K and k["schema"]["minimum"] == 1
    assert "securitySchemes" not in schema.get("components", {})  # no token: no security in the schema


# ---- bad input: a 4xx that names the problem, and the service keeps serving ------------------------
def _chunks(data: bytes, size: int = 8192):
    for i in range(0, len(data), size):
        yield data[i:i + size]


BAD = [
    # (name, request, status, words the message must hold)
    ("unknown study", lambda c: c.get("/studies/no-such-study"), 404, ["no-such-study"]),
    ("unknown study, similar", lambda c: c.get("/studies/no-such-study/similar"), 404, ["no-such-study"]),
    ("unknown study, thumbnail", lambda c: c.get("/studies/no/such/thumbnail"), 404, ["no/such"]),
    ("empty text", lambda c: c.post("/search/text", json={"text": ""}), 422, ["text"]),
    ("blank text", lambda c: c.post("/search/text", json={"text": "  \n "}), 422, ["text", "blank"]),
    ("no text", lambda c: c.post("/search/text", json={"k": 3}), 422, ["text", "required"]),
    ("not JSON", lambda c: c.post("/search/text", content=b"{text", headers={"content-type": "application/json"}),
     422, ["JSON"]),
    ("k of 0", lambda c: c.post("/search/text", json={"text": "x", "k": 0}), 422, ["k", "greater than or equal to 1"]),
    ("k over the limit", lambda c: c.post("/search/text", json={"text": "x", "k": MAX_K + 1}), 422,
     ["k", f"less than or equal to {MAX_K}"]),
    ("k as a boolean", lambda c: c.post("/search/text", json={"text": "x", "k": True}), 422, ["k", "integer"]),
    ("k of 0, similar", lambda c: c.get("/studies/x/similar?k=0"), 422, ["k"]),
    ("k over the limit, image", lambda c: c.post("/search/image", files={"frontal": ("a.png", b"\x89PNG\r\n\x1a\n")},
                                                 data={"k": str(MAX_K + 1)}), 422, ["k"]),
    ("unknown filter", lambda c: c.post("/search/text", json={"text": "x", "filters": {"colour": "red"}}), 422,
     ["colour"]),
    ("rerank over the limit", lambda c: c.post("/search/text", json={"text": "x", "rerank": 10**6}), 422, ["rerank"]),
    ("non-image upload", lambda c: c.post("/search/image", files={"frontal": ("notes.txt", b"chest pain, r/o PE")}),
     415, ["notes.txt", "DICOM, PNG or JPEG"]),
    ("empty upload", lambda c: c.post("/search/image", files={"frontal": ("a.png", b"")}), 400, ["empty"]),
    ("no upload", lambda c: c.post("/search/image", data={"k": "3"}), 422, ["frontal", "required"]),
    ("corrupt DICOM", lambda c: c.post("/search/image", files={
        "frontal": ("bad.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00junk" + bytes(range(64)))}),
     400, ["DICOM"]),
    ("corrupt PNG", lambda c: c.post("/search/image",
                                     files={"frontal": ("bad.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 99)}),
     400, ["image"]),
    ("upload over the limit", lambda c: c.post("/search/image", files={
        "frontal": ("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_UPLOAD)}), 413, ["big.png", f"{MAX_UPLOAD:,}"]),
    ("body over the limit", lambda c: c.post("/search/image", files={
        "frontal": ("huge.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * MAX_UPLOAD))}), 413, ["request body"]),
    ("chunked body over the limit", lambda c: c.post("/search/text", content=_chunks(b" " * (4 * MAX_UPLOAD)),
                                                     headers={"content-type": "application/json"}),
     413, ["request body"]),
    ("bad filters field", lambda c: c.post("/search/image", files={"frontal": ("a.png", b"\x89PNG\r\n\x1a\n")},
                                           data={"filters": "{not json"}), 400, ["filters"]),
    ("thumbnail size", lambda c: c.get("/studies/x/thumbnail?size=5000"), 422, ["size"]),
]


@pytest.mark.parametrize("name,call,status,words", BAD, ids=[b[0] for b in BAD])
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the corrupt DICOM it is given
def test_bad_input_is_a_4xx_that_names_the_problem(client, name, call, status, words):
    got = call(client)
    assert got.status_code == status, f"{name}: {got.status_code} {got.text[:300]}"
    body = got.json()
    message = body.get("message") or body["detail"]
    assert isinstance(message, str)
    for word in words:
        assert word.lower() in message.lower(), f"{name}: {word!r} not in {message!r}"
    # and the service keeps serving
    assert client.post("/search/text", json={"text": "pneumonia", "k": 1}).status_code == 200


# ---- the token rule ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(service):
    with TestClient(create_app(service, token=TOKEN, max_k=MAX_K)) as c:
        yield c


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/search/text", {"json": {"text": "effusion", "k": 2}}),
    ("POST", "/search/image", {"files": {"frontal": ("a.png", b"\x89PNG\r\n\x1a\n")}}),
    ("GET", "/studies/x", {}), ("GET", "/studies/x/similar", {}), ("GET", "/studies/x/thumbnail", {}),
    ("GET", "/health", {}),
])
def test_every_api_route_needs_the_token(guarded, method, path, body):
    for headers, why in [({}, "missing"), ({"Authorization": "Bearer wrong-token-0123456789"}, "wrong"),
                         ({"Authorization": "Basic " + TOKEN}, "missing"),
                         ({"Authorization": "Bearer " + TOKEN[:-1]}, "wrong"),
                         ({"Authorization": ("Bearer " + TOKEN + "é").encode("latin-1")}, "wrong")]:
        got = guarded.request(method, path, headers=headers, **body)
        assert got.status_code == 401, (headers, got.text)
        assert got.headers["www-authenticate"].startswith("Bearer")
        assert why in got.json()["detail"]


def test_the_right_token_opens_the_api_and_the_page_needs_none(guarded):
    auth = {"Authorization": "Bearer " + TOKEN}
    got = guarded.post("/search/text", json={"text": "effusion", "k": 2}, headers=auth)
    assert got.status_code == 200 and len(got.json()["results"]) == 2
    assert guarded.get("/health", headers=auth).json()["limits"]["token_required"] is True
    page = guarded.get("/")
    assert page.status_code == 200 and "<form id=\"token-form\"" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert guarded.get("/static/app.js").status_code == 200
    schema = guarded.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_listening_beyond_loopback_needs_a_token(tmp_path):
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        check_listen(host, None)
    for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.4", "example.org", "localhost.example.org"):
        assert not is_loopback(host)
        with pytest.raises(ServeError, match="--token-file"):
            check_listen(host, None)
        check_listen(host, TOKEN)
    good = tmp_path / "token"
    good.write_text(TOKEN + "\n")
    assert read_token(good) == TOKEN
    for bad in ("", "short", "has a space in it 0123456789"):
        (tmp_path / "bad").write_text(bad)
        with pytest.raises(ServeError, match="at least 16"):
            read_token(tmp_path / "bad")
    with pytest.raises(ServeError, match="cannot read"):
        read_token(tmp_path / "absent")


def test_cli_refuses_a_public_host_without_a_token_before_loading_anything(tmp_path):
    start = time.monotonic()
    # the index and engine do not exist: the refusal must come first, from the host check alone
    got = subprocess.run([sys.executable, "-m", "clinvla_engine.serve.cli", "serve", str(tmp_path / "index"),
                          "--engine", str(tmp_path / "engine"), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 2, got.stderr
    assert "refusing to listen on 0.0.0.0 without a token" in got.stderr and "--token-file" in got.stderr
    assert time.monotonic() - start < 30
    from clinvla_engine.serve import cli

    assert cli.DEFAULT_MAX_K == DEFAULT_MAX_K and cli.DEFAULT_MAX_UPLOAD_MB * 2**20 == DEFAULT_MAX_UPLOAD_BYTES


def test_cli_refuses_a_corrupt_index_naming_the_file(index_dir, engine_dir, tmp_path):
    broken = tmp_path / "index"
    shutil.copytree(index_dir, broken)
    meta = broken / "metadata.parquet"
    meta.write_bytes(meta.read_bytes()[:-100])
    got = subprocess.run([sys.executable, "-m", "clinvla_engine.serve.cli", "serve", str(broken), "--engine",
                          str(engine_dir), "--port", str(_free_port())], capture_output=True, text=True, timeout=120)
    assert got.returncode == 2 and "metadata.parquet" in got.stderr, got.stderr[-2000:]
    assert "Traceback" not in got.stderr


def test_no_page_loads_from_elsewhere(client):
    # FastAPI's /docs and /redoc pull their scripts from a CDN: switched off
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    for path in ("/", "/static/app.js", "/static/app.css"):
        text = client.get(path).text
        assert "http://" not in text and "https://" not in text, path


def test_create_app_refuses_limits_above_the_services(service):
    with pytest.raises(ValueError, match="max_k=5000"):
        create_app(service, max_k=5000)
    with pytest.raises(ValueError, match="token"):
        create_app(service, token="")


# ---- a real server: `python -m clinvla_engine.serve.cli serve` on a free loopback port ----------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(index_dir, engine_dir, tmp_path_factory):
    """(base URL, auth headers, log path) of one server process for this module, stopped by PID."""
    folder = tmp_path_factory.mktemp("server")
    token_file = folder / "token"
    token_file.write_text(TOKEN + "\n")
    log = folder / "server.log"
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clinvla_engine.serve.cli", "serve", str(index_dir), "--engine", str(engine_dir),
             "--host", "127.0.0.1", "--port", str(port), "--token-file", str(token_file), "--max-k", str(MAX_K),
             "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer within 90 s: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url, {"Authorization": "Bearer " + TOKEN}, log
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def test_concurrent_clients_get_the_same_answers_as_one(server, frontal_jpeg, keys):
    url, auth, _ = server
    _, jpeg = frontal_jpeg
    queries = [("text", t) for t in ("left pleural effusion", "cardiomegaly", "right upper lobe pneumonia",
                                     "no acute process")]
    queries += [("similar", k) for k in keys[:3]] + [("image", jpeg)]

    def ask(http, kind, q):
        if kind == "text":
            r = http.post(url + "/search/text", json={"text": q, "k": 8, "rerank": 12 if "pneu" in q else 0})
        elif kind == "similar":
            r = http.get(f"{url}/studies/{q}/similar", params={"k": 8})
        else:
            r = http.post(url + "/search/image", files={"frontal": ("q.jpg", q)}, data={"k": "8"})
        assert r.status_code == 200, r.text
        return [(h["study_key"], h["score"], h["local_score"]) for h in r.json()["results"]]

    with httpx.Client(headers=auth, timeout=60) as http:
        reference = [ask(http, kind, q) for kind, q in queries]
    answers: list = []
    errors: list = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            with httpx.Client(headers=auth, timeout=60) as http:
                for i in rng.permutation(len(queries)).tolist() * 2:
                    answers.append((i, ask(http, *queries[i])))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert len(answers) == 6 * 2 * len(queries)
    for i, got in answers:
        assert [g[0] for g in got] == [r[0] for r in reference[i]], queries[i][0]
        np.testing.assert_allclose([g[1] for g in got], [r[1] for r in reference[i]], rtol=1e-5, atol=1e-6)


def test_schemathesis_finds_no_server_error(server, keys, tmp_path):
    pytest.importorskip("schemathesis", reason="schemathesis is not installed: pip install schemathesis")
    st = Path(sys.executable).with_name("st")
    if not st.is_file():
        pytest.skip(f"schemathesis's `st` command is not beside {sys.executable}")
    url, auth, log = server
    # real keys for the path parameter most of the time, so the 200 answers are checked too
    config = tmp_path / "schemathesis.toml"
    config.write_text(f"[dictionaries.study_keys]\nvalues = {json.dumps(keys[:5])}\n\n"
                      '[parameters]\n"path.key" = { dictionary = "study_keys", probability = 0.7 }\n')
    # every check but positive_data_acceptance: the schema can say "binary", not "a decodable chest
    # X-ray", so random bytes that are valid by the schema are rightly refused (415/400)
    cmd = [str(st), "--config-file", str(config), "run", url + "/openapi.json", "-H",
           f"Authorization: {auth['Authorization']}", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
           "-n", "25", "--seed", "7", "--generation-database", "none", "--no-color", "-w", "2",
           "--request-timeout", "30"]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert got.returncode == 0, f"{got.stdout[-6000:]}\n{got.stderr[-2000:]}\nserver log:\n{log.read_text()[-3000:]}"
    assert "generated" in got.stdout
    # the server survived it
    assert httpx.get(url + "/health", headers=auth, timeout=10).status_code == 200


# ---- the page in a real browser ------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        why = f"{CHROMIUM} is absent: apt-get install chromium (Playwright's own download is not used)"
        if os.environ.get("CI"):  # CI's `make test` installs it: a missing browser there is a failure
            pytest.fail(why)
        pytest.skip(why)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        yield b
        b.close()


def _card_keys(page):
    return page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.key)")


def _wait_for_thumbnails(page):
    page.wait_for_function("() => [...document.querySelectorAll('.card .thumb')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=20000)


def test_page_text_search_more_like_this_and_upload(browser, server, frontal_jpeg, archive, service, tmp_path):
    url, auth, _ = server
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    outside = []  # the page must load nothing from anywhere but this server
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith((url, "blob:", "data:")) else None)
    page.goto(url + "/")

    # the server needs a token: the page asks for it, then works with it
    page.wait_for_selector("#token-form:not([hidden])", timeout=10000)
    page.fill("#token", TOKEN)
    page.click("#token-form button")
    page.wait_for_function("() => document.querySelector('#index-info').textContent.includes('40 studies')",
                           timeout=10000)
    page.wait_for_selector("#token-form", state="hidden", timeout=5000)  # asked once, then out of the way
    problems.clear()  # the first /health 401 is logged by chromium as a failed resource; it was expected

    text = "small right pleural effusion"
    page.fill("#text", text)
    page.fill("#k", "8")
    page.click("#search-button")
    page.wait_for_function("() => document.querySelectorAll('.card').length === 8", timeout=20000)
    _wait_for_thumbnails(page)
    with httpx.Client(headers=auth, timeout=30) as http:
        want = http.post(url + "/search/text", json={"text": text, "k": 8}).json()["results"]
    assert _card_keys(page) == _keys(want)
    first = page.locator(".card").first
    assert first.locator(".score").inner_text() == f"{want[0]['score']:.3f}"
    assert first.locator(".views").inner_text() == " + ".join(want[0]["views"])
    assert first.locator(".report").inner_text().split()[:3] == want[0]["report"].split()[:3]
    assert page.locator(".card .more").count() == 8  # "more like this" on every result
    page.screenshot(path=str(tmp_path / "search_page.png"), full_page=True)
    if os.environ.get("CLINVLA_SCREENSHOT"):  # how benchmarks/results/search_page.png (the README's screenshot) is refreshed
        shutil.copy(tmp_path / "search_page.png", os.environ["CLINVLA_SCREENSHOT"])

    source = _card_keys(page)[1]
    page.locator(".card").nth(1).locator(".more").click()
    page.wait_for_function(f"() => document.querySelector('#status').textContent.includes('like {source}')",
                           timeout=20000)
    _wait_for_thumbnails(page)
    with httpx.Client(headers=auth, timeout=30) as http:
        similar = http.get(f"{url}/studies/{source}/similar", params={"k": 8}).json()["results"]
    assert _card_keys(page) == _keys(similar) and source not in _card_keys(page)
    page.screenshot(path=str(tmp_path / "more_like_this.png"), full_page=True)

    key, jpeg = frontal_jpeg
    upload = tmp_path / "query.jpg"
    upload.write_bytes(jpeg)
    page.set_input_files("#frontal", str(upload))
    page.click("#image-button")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('uploaded image')",
                           timeout=20000)
    assert _card_keys(page)[0] == key

    # a bad query shows the service's message, and the page keeps working
    page.fill("#rerank", "5000")
    page.click("#search-button")
    page.wait_for_selector("#status.error", timeout=10000)
    assert "rerank" in page.inner_text("#status") and "less than or equal to 1000" in page.inner_text("#status")
    page.fill("#rerank", "10")
    page.click("#search-button")
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('8 results')",
                           timeout=20000)

    assert (tmp_path / "search_page.png").stat().st_size > 10_000
    assert not outside, outside
    assert not [p for p in problems if "422" not in p], problems  # the one 422 above is the expected one
    page.close()
