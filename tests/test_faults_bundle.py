"""Engine bundles and the index under faults: tampering, malformed manifests, a killed build,
concurrent index saves, and a k too large for memory (issue 10).

One real ONNX Runtime bundle of the tiny model is built for the module (about 20-35 s on two
cores); every tamper case works on a copy of it. Each case checks the refusal from both sides a
user meets: ``Engine.load`` raises ``BundleError`` with a message naming the problem, and
``clinvla engine inspect`` exits non-zero with one line (never a traceback) or reports "NO".
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

for _name in ("onnx", "onnxscript", "onnxruntime", "onnx_graphsurgeon"):
    pytest.importorskip(_name, reason=f"{_name} is not installed: pip install 'clinvla-engine[export]'")

from clinvla_engine.export.commands import engine_main  # noqa: E402
from clinvla_engine.export.testing import tiny_checkpoint  # noqa: E402
from clinvla_engine.runtime import BundleError, Engine  # noqa: E402
from clinvla_engine.runtime.bundle import MANIFEST  # noqa: E402

BUILD = dict(backend="onnxruntime", device="cpu", batch_sizes=(1, 4), max_text_len=24, parity_random=4,
             progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(checkpoint, bundle, what the builder saw at the moment it marked the bundle complete).

    The build checks parity on a folder of "user" studies (a small MIMIC-format archive), and its
    last step, mark_complete, is wrapped to look at the bundle just before: it must already be at
    its final path and still be refused, so a kill in that instant leaves nothing usable."""
    from clinvla_engine.data.synth import generate_archive
    from clinvla_engine.export import build as build_module
    from clinvla_engine.export.build import build_engine

    root = tmp_path_factory.mktemp("faults")
    ck = tiny_checkpoint(root / "ckpt")
    generate_archive(root / "studies", 6, 3, fmt="mimic", size=64, progress=False)
    out = root / "engine"
    seen = {}
    real = build_module.mark_complete

    def watched(directory, manifest):
        seen["at_final_path"] = Path(directory) == out and (out / MANIFEST).is_file()
        try:
            Engine.load(out).close()
            seen["refused"] = None
        except BundleError as exc:
            seen["refused"] = str(exc)
        seen["inspect_rc"] = engine_main(["inspect", str(out)])
        real(directory, manifest)

    mp = pytest.MonkeyPatch()
    mp.setattr(build_module, "mark_complete", watched)
    try:
        build_engine(ck, out, parity_data=root / "studies", parity_studies=6, **BUILD)
    finally:
        mp.undo()
    return ck, out, seen, root / "studies"


def copy_of(built, tmp_path) -> Path:
    d = tmp_path / "bundle"
    shutil.copytree(built[1], d, symlinks=True)
    return d


def manifest_of(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


def write_manifest_raw(d: Path, manifest) -> None:
    (d / MANIFEST).write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))


def inspect(d: Path, capsys) -> tuple[int, str, str]:
    rc = engine_main(["inspect", str(d)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def refused(d: Path, capsys, match: str, inspect_rc: int) -> None:
    """Engine.load raises BundleError matching `match`; inspect exits with inspect_rc, no traceback."""
    with pytest.raises(BundleError, match=match):
        Engine.load(d)
    with pytest.raises(BundleError, match=match):
        Engine.load(d, verify=False)  # skipping the hashes never skips the shape and file-list checks
    rc, out, err = inspect(d, capsys)
    assert rc == inspect_rc, (rc, out, err)
    assert "Traceback" not in out + err
    if inspect_rc == 2:
        assert err.startswith("clinvla engine inspect: error: ") and err.count("\n") <= 2, err
    else:
        assert "usable here: NO" in out


# ---- the intact bundle, and the build's own record ------------------------------------------------
def test_the_built_bundle_is_usable_and_records_its_data(built, capsys):
    ck, out, seen, studies = built
    assert seen["at_final_path"] and "incomplete" in (seen["refused"] or ""), seen
    assert seen["inspect_rc"] == 2
    m = manifest_of(out)
    assert m["complete"] is True
    assert m["parity"]["data"] == {"source": "user", "path": str(studies.resolve()), "format": "mimic", "studies": 6}
    assert m["parity"]["retrieval"]["studies"] == 6
    rc, text, err = inspect(out, capsys)
    assert rc == 0 and "usable here: yes" in text and f"parity checked on: user studies {studies.resolve()}" in text
    Engine.load(out).close()
    assert not [p for p in out.parent.iterdir() if ".building-" in p.name], "the build left its working folder"


# ---- tampered bundles ------------------------------------------------------------------------------
def test_changed_file(built, tmp_path, capsys):
    d = copy_of(built, tmp_path)
    raw = bytearray((d / "text.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (d / "text.onnx").write_bytes(bytes(raw))
    refused_hash = "text.onnx does not match its size and SHA-256"
    with pytest.raises(BundleError, match=refused_hash):
        Engine.load(d)
    rc, out, _ = inspect(d, capsys)
    assert rc == 1 and "CHANGED" in out and "usable here: NO" in out


@pytest.mark.parametrize("name", ["config.json", "tokenizer/tokenizer_config.json"])
def test_removed_manifest_entry(built, tmp_path, capsys, name):
    """The attack of the issue: drop a file's entry, change the file; it must not load unverified."""
    d = copy_of(built, tmp_path)
    m = manifest_of(d)
    del m["files"][name]
    write_manifest_raw(d, m)
    (d / name).write_text((d / name).read_text() + " ")
    refused(d, capsys, f"{name} is not listed in manifest.json", inspect_rc=1)
    rc, out, _ = inspect(d, capsys)
    assert "UNLISTED" in out


def test_removed_entry_of_a_file_the_manifest_refers_to(built, tmp_path, capsys):
    d = copy_of(built, tmp_path)
    m = manifest_of(d)
    del m["files"]["tokenizer/vocab.txt"]
    write_manifest_raw(d, m)
    refused(d, capsys, "field tokenizer.vocab must be the name of a listed file", inspect_rc=2)


@pytest.mark.parametrize("extra", ["notes.txt", "tokenizer/extra_vocab.txt", ".image.onnx.tmp-k2j3"])
def test_extra_unknown_file(built, tmp_path, capsys, extra):
    d = copy_of(built, tmp_path)
    (d / extra).write_bytes(b"x")
    refused(d, capsys, f"{extra} is not listed in manifest.json", inspect_rc=1)
    if ".tmp-" in extra:
        with pytest.raises(BundleError, match="left by an interrupted write"):
            Engine.load(d)


def test_symbolic_link_in_the_bundle(built, tmp_path, capsys):
    d = copy_of(built, tmp_path)
    target = d / "tokenizer" / "vocab.txt"
    outside = tmp_path / "vocab.txt"
    shutil.move(target, outside)
    target.symlink_to(outside)
    refused(d, capsys, "tokenizer/vocab.txt is a link or special file", inspect_rc=1)


def test_missing_file(built, tmp_path, capsys):
    d = copy_of(built, tmp_path)
    (d / "image.onnx").unlink()
    refused(d, capsys, "image.onnx is listed in manifest.json but missing", inspect_rc=1)


# ---- malformed manifests ---------------------------------------------------------------------------
MALFORMED_TEXT = {
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "not utf-8": lambda text: "\udcff",  # written with surrogateescape: a lone 0xff byte
    "a list": lambda text: "[1, 2]",
    "a string": lambda text: '"clinvla-engine-bundle"',
    "nested 100000 deep": lambda text: "[" * 100000 + "]" * 100000,
}


@pytest.mark.parametrize("kind", list(MALFORMED_TEXT))
def test_malformed_manifest_text(built, tmp_path, capsys, kind):
    d = copy_of(built, tmp_path)
    text = MALFORMED_TEXT[kind]((d / MANIFEST).read_text())
    (d / MANIFEST).write_bytes(text.encode("utf-8", "surrogateescape"))
    refused(d, capsys, "not valid UTF-8 JSON|is not a ClinVLA engine manifest", inspect_rc=2)


def _set(path: str, value):
    def change(m):
        *parents, last = path.split(".")
        node = m
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return change


FIELD_CASES = {
    # field changed -> (how, what the refusal says)
    "format_version newer": (_set("format_version", 99), "format_version 99, newer"),
    "format_version 1": (_set("format_version", 1), "format_version 1, written by an older"),
    "format_version text": (_set("format_version", "2"), "field format_version must be an integer"),
    "not complete": (_set("complete", False), "is incomplete"),
    "complete missing": (_set("complete", KeyError), "is incomplete"),
    "files empty": (_set("files", {}), "field files must be a non-empty object"),
    "files a list": (_set("files", ["config.json"]), "field files must be a non-empty object"),
    "sha256 not hex": (lambda m: m["files"]["config.json"].update(sha256="zz" * 32), r"field files\['config.json'\]"),
    "bytes negative": (lambda m: m["files"]["config.json"].update(bytes=-1), r"field files\['config.json'\]"),
    "bytes a bool": (lambda m: m["files"]["config.json"].update(bytes=True), r"field files\['config.json'\]"),
    "path escapes": (lambda m: m["files"].update({"../x": m["files"]["config.json"]}), "not a plain relative path"),
    "absolute path": (lambda m: m["files"].update({"/etc/passwd": m["files"]["config.json"]}),
                      "not a plain relative path"),
    "manifest lists itself": (lambda m: m["files"].update({MANIFEST: m["files"]["config.json"]}),
                              "not a plain relative path"),
    "batch_sizes empty": (_set("batch_sizes", []), "field batch_sizes must be"),
    "batch_sizes zero": (_set("batch_sizes", [0, 4]), "field batch_sizes must be"),
    "batch_sizes unsorted": (_set("batch_sizes", [4, 1]), "field batch_sizes must be"),
    "batch_sizes repeated": (_set("batch_sizes", [1, 1, 4]), "field batch_sizes must be"),
    "batch_sizes text": (_set("batch_sizes", ["1", "4"]), "field batch_sizes must be"),
    "batch_sizes bool": (_set("batch_sizes", [True]), "field batch_sizes must be"),
    "batch_sizes huge": (_set("batch_sizes", [1, 10**9]), "field batch_sizes must be"),
    "batch_sizes missing": (_set("batch_sizes", KeyError), "field batch_sizes must be"),
    "max_text_len 2": (_set("max_text_len", 2), "field max_text_len must be"),
    "backend unknown": (_set("backend", "tensorrt_x"), "field backend must be one of"),
    "backend missing": (_set("backend", KeyError), "field backend must be one of"),
    "backend on the wrong device": (_set("backend", "tensorrt"), "field device must be cuda for a tensorrt bundle"),
    "precision for backend": (_set("precision", "fp8"), "field precision must be one of fp32, fp16 for a onnxruntime"),
    "device unknown": (_set("device", "tpu"), "field device must be"),
    "graph missing": (lambda m: m["graphs"].pop("text"), "field graphs must be an object with exactly"),
    "graph extra": (lambda m: m["graphs"].update(audio=m["graphs"]["text"]), "field graphs must be"),
    "graph file unlisted": (_set("graphs.image.file", "other.onnx"), "field graphs.image.file must be a listed .onnx"),
    "graph file of another kind": (_set("graphs.image.file", "config.json"), "field graphs.image.file must be"),
    "graph inputs renamed": (lambda m: m["graphs"]["text"]["inputs"][0].update(name="ids"),
                             "field graphs.text.inputs must be the tensors"),
    "graph inputs a string": (_set("graphs.image.inputs", "frontal"), "field graphs.image.inputs must be"),
    "graph dtype": (lambda m: m["graphs"]["image"]["inputs"][0].update(dtype="float64"),
                    r"field graphs.image.inputs\[frontal\] must be"),
    "graph shape": (lambda m: m["graphs"]["image"]["inputs"][0].update(shape=[-1, 3]),
                    r"field graphs.image.inputs\[frontal\] must be"),
    "views": (_set("config.vision.num_views", 3), "field config.vision.num_views must be 1 or 2"),
    "image size": (_set("config.vision.image_size", "64"), "field config.vision.image_size must be"),
    "pixel std": (_set("config.vision.pixel_std", 0), "field config.vision.pixel_std must be"),
    "config missing": (_set("config", KeyError), "field config.vision must be"),
}


@pytest.mark.parametrize("case", list(FIELD_CASES))
def test_bad_manifest_field(built, tmp_path, capsys, case):
    change, message = FIELD_CASES[case]
    d = copy_of(built, tmp_path)
    m = manifest_of(d)
    change(m)
    write_manifest_raw(d, m)
    refused(d, capsys, message, inspect_rc=2)


# ---- a killed build ----------------------------------------------------------------------------------
def _build_command() -> list[str]:
    script = Path(sys.executable).with_name("clinvla-build-engine")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from clinvla_engine.export.commands import build_engine_main; "
                                  "sys.exit(build_engine_main(sys.argv[1:]))"]


@pytest.mark.parametrize("replacing", [False, True], ids=["new-target", "force-over-a-bundle"])
def test_a_killed_build_leaves_nothing_usable(built, tmp_path, capsys, replacing):
    """SIGKILL clinvla-build-engine once it has written into its working folder (the bundle's
    config and tokenizer, before the ONNX export): at the target there is no bundle, or with
    --force the old bundle, whole and usable; the working folder left behind is refused by
    inspect and load, and the next build removes it."""
    from clinvla_engine.export.build import remove_stale_staging

    ck = built[0]
    out = tmp_path / "engine"
    if replacing:
        shutil.copytree(built[1], out)
    proc = subprocess.Popen([*_build_command(), str(ck), "-o", str(out), "--backend", "onnxruntime", "--device", "cpu",
                             "--batch-sizes", "1,4", "--max-text-len", "24", "--parity-studies", "0", "--quiet",
                             *(["--force"] if replacing else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 150
    work = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = [p for p in tmp_path.glob(".engine.building-*") if (p / "bundle" / "config.json").is_file()]
            if found:
                work = found[0]
                break
            time.sleep(0.05)
        assert work is not None, f"the build never started writing: {proc.poll()} " + (
            proc.stderr.read().decode()[-800:] if proc.poll() is not None else "")
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    if replacing:
        assert manifest_of(out) == manifest_of(built[1])
        assert inspect(out, capsys)[0] == 0
        Engine.load(out).close()
    else:
        assert not out.exists(), "a killed build left something at the target"
        with pytest.raises(BundleError):
            Engine.load(out)
    for leftover in (work / "bundle", work):
        rc, text, err = inspect(leftover, capsys)
        assert rc == 2 and "did not finish" in err and "Traceback" not in err, (leftover, err)
        with pytest.raises(BundleError, match="did not finish"):
            Engine.load(leftover)
    # a leftover that got as far as a manifest (complete or not) is refused too: it is a working folder
    shutil.copy(built[1] / MANIFEST, work / "bundle" / MANIFEST)
    rc, _, err = inspect(work / "bundle", capsys)
    assert rc == 2 and "did not finish" in err
    assert remove_stale_staging(out) == [work] and not work.exists()


# ---- the index -------------------------------------------------------------------------------------------
def _index_or_skip():
    from clinvla_engine import backends

    if not backends.extension():
        pytest.skip(f"clinvla_engine._C is not built: {backends.extension().why}")
    from clinvla_engine.index import Index

    return Index


def _writer_index(Index, writer: int, rows: int = 3000, dim: int = 32):
    index = Index(dim, "float32")
    rng = np.random.default_rng(writer)
    index.add(rng.standard_normal((rows, dim)).astype(np.float32), ids=np.arange(rows) + writer * 10**6)
    return index


def test_concurrent_index_saves_to_one_path(tmp_path):
    """Threads saving different indexes to one path, and a reader loading it all the while: every
    load succeeds (checksum verified) and equals one whole writer's index; no temporary is left."""
    Index = _index_or_skip()
    writers = [_writer_index(Index, w) for w in range(6)]
    expected = {int(ix.ids()[0]) // 10**6: ix.ids() for ix in writers}
    path = tmp_path / "archive.clvx"
    writers[0].save(path)
    errors, loads = [], [0]
    stop = threading.Event()

    def write(ix):
        try:
            for _ in range(8):
                ix.save(path)
        except Exception as exc:  # collected: a failing thread must fail the test
            errors.append(exc)

    def read():
        while not stop.is_set():
            try:
                got = Index.load(path, verify=True).ids()
                assert np.array_equal(got, expected[int(got[0]) // 10**6])
                loads[0] += 1
            except Exception as exc:
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write, args=(ix,)) for ix in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reader.join()
    assert not errors, errors[:3]
    assert loads[0] > 0
    final = Index.load(path).ids()
    assert any(np.array_equal(final, ids) for ids in expected.values())
    assert sorted(os.listdir(tmp_path)) == ["archive.clvx"], "temporary files were left behind"


_SAVE_IN_A_PROCESS = """
import sys
import numpy as np
from clinvla_engine.index import Index
writer, path = int(sys.argv[1]), sys.argv[2]
index = Index(32, "float32")
rng = np.random.default_rng(writer)
index.add(rng.standard_normal((20000, 32)).astype(np.float32), ids=np.arange(20000) + writer * 10**6)
for _ in range(10):
    index.save(path)
"""


def test_concurrent_index_saves_from_processes(tmp_path):
    Index = _index_or_skip()
    path = tmp_path / "archive.clvx"
    procs = [subprocess.Popen([sys.executable, "-c", _SAVE_IN_A_PROCESS, str(w), str(path)]) for w in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    ids = Index.load(path, verify=True).ids()
    writer = int(ids[0]) // 10**6
    assert writer in range(4) and np.array_equal(ids, np.arange(20000) + writer * 10**6)
    assert sorted(os.listdir(tmp_path)) == ["archive.clvx"]


def test_k_too_large_is_refused_before_any_allocation(tmp_path):
    Index = _index_or_skip()
    from clinvla_engine.index import MAX_K, MAX_RESULT_BYTES

    index = _writer_index(Index, 1, rows=100, dim=8)
    q = np.ones((2, 8), np.float32)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=f"k must be <= {MAX_K} .*holds 100 vectors"):
        index.search(q, 10**9)  # 12 GB of results per query before the bound
    assert time.perf_counter() - t0 < 1.0
    many = np.ones((MAX_RESULT_BYTES // (12 * MAX_K) + 1, 8), np.float32)
    with pytest.raises(ValueError, match="search at most 1365 queries per call"):
        index.search(many, MAX_K)
    scores, ids = index.search(q, MAX_K)  # the bound itself is allowed: slots past 100 are padding
    assert ids.shape == (2, MAX_K) and (ids[:, 100:] == -1).all() and np.isneginf(scores[:, 100:]).all()
    assert (ids[:, :100] >= 0).all()


def test_atomic_writes_keep_the_usual_file_mode(tmp_path):
    # mkstemp makes 0600 files and a rename keeps the mode: checkpoints and bundles written that way
    # would be unreadable to a serving process of another user
    from clinvla_engine.files import atomic_write_text

    fresh = atomic_write_text(tmp_path / "new.json", "{}")
    assert fresh.stat().st_mode & 0o777 == 0o644
    shared = tmp_path / "shared.json"
    shared.write_text("{}")
    shared.chmod(0o664)
    atomic_write_text(shared, "{\"a\": 1}")
    assert shared.stat().st_mode & 0o777 == 0o664 and shared.read_text() == "{\"a\": 1}"
