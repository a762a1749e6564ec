"""clinvla_engine.runtime.Engine: loading and verification, inputs, buckets, threads, refusals.

Uses the tiny CPU bundles that clinvla_engine.export.testing builds once per test session
(ONNX Runtime and AOTInductor, and OpenVINO where it is installed). GPU paths (pinned memory, CUDA
graphs, the compile and TensorRT backends) are the `gpu` / `trt` tests at the end, run by tools/gpu_suite.sh.
"""
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from clinvla_engine import backends  # noqa: E402
from clinvla_engine.data.transforms import preprocess  # noqa: E402
from clinvla_engine.export.testing import TEST_BATCH_SIZES, cpu_bundles, tiny_model  # noqa: E402
from clinvla_engine.runtime import BundleError, Engine  # noqa: E402

# OpenVINO joins where the [openvino] extra is installed: the shared auto build keeps its candidate.
BACKENDS = ["onnxruntime", "aoti"] + (["openvino"] if backends.openvino() else [])
GRAPH_FILE = {"onnxruntime": "image.onnx", "aoti": "image.pt2", "openvino": "image.xml"}


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    # the CPU bundles need the export extra (ONNX Runtime is one of the two CPU backends)
    for name in ("onnx", "onnxscript", "onnxruntime", "onnx_graphsurgeon"):
        pytest.importorskip(name, reason=f"{name} is not installed: pip install 'clinvla-engine[export]'")
    built = dict(cpu_bundles(str(tmp_path_factory.getbasetemp() / "engines")))
    if "openvino" in BACKENDS:
        built["openvino"] = built["aoti"].parent / "openvino"  # kept beside the other candidates
    return built


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, bundles):
    e = Engine.load(bundles[request.param])
    yield e
    e.close()


def pictures(n, seed, size=80, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, (n, size, size + 7)).astype(np.uint8)  # not square: resize + crop
    return out if dtype == np.uint8 else out.astype(np.float32) / 255.0


def reference(model, frontals, laterals):
    """Eager PyTorch on the training preprocessing; missing laterals skipped."""
    v = model.config.vision
    f = torch.stack([preprocess(x, v.image_size, v.pixel_mean, v.pixel_std) for x in frontals])
    present = torch.tensor([x is not None for x in laterals])
    lat = torch.stack([preprocess(x, v.image_size, v.pixel_mean, v.pixel_std) if x is not None
                       else torch.zeros(3, v.image_size, v.image_size) for x in laterals])
    with torch.no_grad():
        emb, regions, mask = model.encode_images(f, lat, present, return_local=True)
    return emb.numpy(), regions.numpy(), mask.numpy()


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---- embedding --------------------------------------------------------------------------------
def test_embed_studies_matches_pytorch_with_mixed_views_and_buckets(engine, model):
    n = 19  # > the largest bucket (8): three calls, the last one padded on static-shape backends
    fronts = list(pictures(n, 1))
    lats = [x if i % 4 else None for i, x in enumerate(pictures(n, 2))]  # some studies lack a lateral
    emb, regions, region_mask = engine.embed_studies(fronts, lats, return_local=True)
    ref_emb, ref_regions, ref_mask = reference(model, fronts, lats)
    assert emb.shape == (n, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert cos_rows(emb, ref_emb).min() >= 0.9999
    assert regions.shape == ref_regions.shape == (n, 2 * 16, 32)
    assert cos_rows(regions, ref_regions).min() >= 0.9999
    np.testing.assert_array_equal(region_mask, ref_mask)
    assert not region_mask[0, 16:].any() and region_mask[1].all()
    # a study's embedding does not depend on its batch-mates
    alone = engine.embed_studies([fronts[5]], [lats[5]])
    np.testing.assert_allclose(alone[0], emb[5], atol=1e-5)


def test_embed_studies_takes_uint8_float_batches_and_paths(engine, tmp_path):
    from PIL import Image

    u8 = pictures(3, 5)
    f32 = u8.astype(np.float32) / 255.0
    paths = []
    for i, x in enumerate(u8):
        p = tmp_path / f"f{i}.png"
        Image.fromarray(x).save(p)
        paths.append(str(p))
    a = engine.embed_studies(u8)  # (N, H, W) batch, frontal only
    b = engine.embed_studies(list(f32))
    c = engine.embed_studies(paths)
    d = engine.embed_studies(torch.from_numpy(u8))
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-5)
    np.testing.assert_allclose(a, d, atol=1e-6)
    one = engine.embed_studies(u8[0])  # one (H, W) picture = one study
    assert one.shape == (1, 32)


def test_embed_texts_matches_pytorch(engine, model):
    texts = ["FINDINGS: Small left pleural effusion.", "No acute cardiopulmonary process.",
             "Moderate cardiomegaly with mild pulmonary edema and bibasilar atelectasis."] * 4
    emb, words, word_mask = engine.embed_texts(texts, return_local=True)
    ids, mask = engine.tokenize(texts)
    with torch.no_grad():
        ref_emb, ref_words, ref_mask = model.encode_text((ids, mask), return_local=True)
    assert emb.shape == (12, 32) and words.shape == tuple(ref_words.shape)
    assert cos_rows(emb, ref_emb.numpy()).min() >= 0.9999
    real = ref_mask.numpy()  # word features are compared at the real words: padding rows mean nothing
    assert cos_rows(words[real], ref_words.numpy()[real]).min() >= 0.9999
    np.testing.assert_array_equal(word_mask, real)
    np.testing.assert_allclose(engine.embed_texts(texts[:1])[0], emb[0], atol=1e-5)


def test_a_result_is_not_overwritten_by_the_next_call(engine):
    # run_graph hands a single chunk's tensors straight back, and the OpenVINO runner shares its
    # inputs with the request: a returned tensor must still be the caller's after later calls
    rng = np.random.default_rng(3)
    size = engine.image_size
    feeds = [{k: torch.from_numpy(rng.standard_normal((2, 3, size, size)).astype(np.float32)) for k in ("frontal", "lateral")}
             for _ in range(2)]
    for f in feeds:
        f["lateral_present"] = torch.ones(2)
    spec = {t["name"] for t in engine.manifest["graphs"]["image"]["inputs"]}
    feeds = [{k: v for k, v in f.items() if k in spec} for f in feeds]
    first = engine.run_graph("image", feeds[0])
    kept = {k: v.clone() for k, v in first.items()}
    second = engine.run_graph("image", feeds[1])
    assert not torch.equal(second["image_emb"], kept["image_emb"])  # the check below can fail
    for k in kept:
        assert torch.equal(first[k], kept[k]), k
    again = engine.run_graph("image", feeds[0])
    torch.testing.assert_close(again["image_emb"], kept["image_emb"], atol=1e-5, rtol=0)


def test_info_describes_the_engine(engine):
    info = engine.info()
    assert info["backend"] in BACKENDS and info["device"] == "cpu" and info["precision"] == "fp32"
    assert info["batch_sizes"] == list(TEST_BATCH_SIZES) and info["embed_dim"] == 32 and info["views"] == 2
    assert info["parity"]["passed"] and set(info["graphs"]) == {"image", "text"}
    assert info["runner"]["backend"] == info["backend"]
    assert repr(engine).startswith("Engine(")


def test_calls_from_several_threads_agree_with_one_thread(engine):
    batches = [pictures(5, 20 + i) for i in range(4)]
    texts = [[f"effusion number {i} and {j} small opacities" for j in range(3)] for i in range(4)]
    expected = [engine.embed_studies(b) for b in batches]
    expected_t = [engine.embed_texts(t) for t in texts]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = (engine.embed_studies(batches[i]), engine.embed_texts(texts[i]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        np.testing.assert_allclose(results[i][0], expected[i], atol=1e-5)
        np.testing.assert_allclose(results[i][1], expected_t[i], atol=1e-5)


# ---- bad input --------------------------------------------------------------------------------
def test_refuses_images_of_the_wrong_shape(engine):
    with pytest.raises(ValueError, match=r"frontal\[1\].*grey \(H, W\) picture"):
        engine.embed_studies([pictures(1, 0)[0], np.zeros((64, 64, 7), np.uint8)])
    with pytest.raises(ValueError, match=r"frontal\[0\].*too small"):
        engine.embed_studies([np.zeros((4, 4), np.uint8)])
    with pytest.raises(ValueError, match="got an array of shape"):
        engine.embed_studies(np.zeros((2, 2, 64, 64, 1), np.uint8))
    with pytest.raises(ValueError, match="frontal has 2 studies but lateral has 1"):
        engine.embed_studies(pictures(2, 0), [pictures(1, 1)[0]])
    with pytest.raises(TypeError, match=r"frontal\[0\] must be a pixel array"):
        engine.embed_studies([42])
    with pytest.raises(ValueError, match="frontal is empty"):
        engine.embed_studies([])
    with pytest.raises(ValueError, match=r"image graph input frontal must be \(batch, 3, 64, 64\) float32, got \(2, 3, 32, 32\)"):
        engine.run_graph("image", {"frontal": torch.zeros(2, 3, 32, 32), "lateral": torch.zeros(2, 3, 32, 32),
                                   "lateral_present": torch.zeros(2)})
    with pytest.raises(ValueError, match="text graph input input_ids must be"):
        engine.run_graph("text", {"input_ids": torch.zeros(2, 60, dtype=torch.long),
                                  "attention_mask": torch.ones(2, 60, dtype=torch.long)})


def test_refuses_an_empty_text_list_and_bad_texts(engine):
    with pytest.raises(ValueError, match="texts is empty"):
        engine.embed_texts([])
    with pytest.raises(TypeError, match="wrap it in a list"):
        engine.embed_texts("a single report")
    with pytest.raises(ValueError, match=r"texts\[1\] is empty"):
        engine.embed_texts(["effusion", "   "])


# ---- bundle verification ------------------------------------------------------------------------
def _copy(bundles, backend, tmp_path):
    d = tmp_path / backend
    shutil.copytree(bundles[backend], d)
    return d


@pytest.mark.parametrize("backend", BACKENDS)
def test_refuses_a_bundle_with_one_byte_changed(bundles, tmp_path, backend):
    d = _copy(bundles, backend, tmp_path)
    target = d / GRAPH_FILE[backend]
    original = target.read_bytes()
    raw = bytearray(original)
    raw[len(raw) // 3] ^= 0x20
    target.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=f"{target.name} does not match its size and SHA-256"):
        Engine.load(d)
    target.write_bytes(original)
    Engine.load(d).close()  # restored: loads again
    (d / "tokenizer" / "vocab.txt").unlink()
    with pytest.raises(BundleError, match="tokenizer/vocab.txt is listed in manifest.json but missing"):
        Engine.load(d)


@pytest.mark.parametrize("package,version,backend", [("clinvla_engine", "0.0.1", "onnxruntime"),
                                                     ("onnxruntime", "1.0.0", "onnxruntime"),
                                                     ("torch", "2.11.0+cu130", "aoti")])
def test_refuses_a_bundle_built_by_another_version(bundles, tmp_path, package, version, backend):
    d = _copy(bundles, backend, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["versions"][package] = version
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=f"built with {package} {version.replace('+', '[+]')} but this machine has {package}"):
        Engine.load(d)


def test_refuses_what_is_not_a_bundle(tmp_path, bundles):
    with pytest.raises(BundleError, match="no such directory"):
        Engine.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="has no manifest.json"):
        Engine.load(tmp_path / "empty")
    d = _copy(bundles, "onnxruntime", tmp_path)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid UTF-8 JSON"):
        Engine.load(d)
    d = _copy(bundles, "aoti", tmp_path / "x")
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = {"bytes": 1, "sha256": "0" * 64}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="not a plain relative path inside the bundle"):
        Engine.load(d)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_cpu_aoti_bundle_does_not_run_on_cuda(bundles):
    with pytest.raises(BundleError, match="compiled for cpu"):
        Engine.load(bundles["aoti"], device="cuda")


# ---- AOTInductor under CUDA graphs (issue 9, item 6) ---------------------------------------------
def _record_aoti_loads(monkeypatch):
    """Replaces torch._inductor.aoti_load_package with a recorder of the same signature."""
    import torch._inductor

    calls = []

    class Loaded:
        def __call__(self, *xs):
            raise AssertionError("not run in this test")

    def fake(path, run_single_threaded: bool = False, device_index: int = -1):
        calls.append({"path": str(path), "run_single_threaded": run_single_threaded, "device_index": device_index})
        return Loaded()

    monkeypatch.setattr(torch._inductor, "aoti_load_package", fake)
    return calls


@pytest.mark.parametrize("device,cuda_graphs,single", [("cuda:0", True, True), ("cuda:0", False, False),
                                                        ("cpu", True, False)])
def test_aoti_runner_loads_single_threaded_when_cuda_graphs_capture(monkeypatch, tmp_path, device, cuda_graphs,
                                                                    single):
    """Without run_single_threaded=True the AOTI container queries CUDA events inside the capture,
    the capture fails and every call runs eagerly; with it, the runner can replay graphs."""
    from clinvla_engine.runtime.runners import AotiRunner

    calls = _record_aoti_loads(monkeypatch)
    manifest = {"graphs": {"image": {"file": "image.pt2"}, "text": {"file": "text.pt2"}}}
    runner = AotiRunner(tmp_path, manifest, torch.device(device), cuda_graphs=cuda_graphs)
    assert [c["path"].rsplit("/", 1)[-1] for c in calls] == ["image.pt2", "text.pt2"]
    assert all(c["run_single_threaded"] is single for c in calls), calls
    assert all(c["device_index"] == (0 if device == "cuda:0" else -1) for c in calls), calls
    assert runner.static_shapes is single and all(g.enabled is single for g in runner.calls.values())


def test_aoti_runner_turns_cuda_graphs_off_when_torch_lacks_single_threaded(monkeypatch, tmp_path):
    import torch._inductor

    from clinvla_engine.runtime.runners import AotiRunner

    seen = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path, device_index=-1: seen.append(path) or object())
    runner = AotiRunner(tmp_path, {"graphs": {"text": {"file": "text.pt2"}}}, torch.device("cuda:0"))
    assert len(seen) == 1 and not runner.static_shapes
    assert any("run_single_threaded" in n for n in runner.notes)


def test_a_real_aoti_package_loaded_single_threaded_computes_the_same(bundles):
    """The kwarg on this torch's real loader (CPU): the single-threaded container gives the same
    outputs as the default one, so turning it on under CUDA graphs changes nothing but the capture."""
    from clinvla_engine.export.graphs import example_inputs
    from clinvla_engine.runtime.runners import load_aoti_package

    path = bundles["aoti"] / "text.pt2"
    ids, mask = example_inputs(tiny_model(), "text", batch=3, seed=5, max_tokens=48)
    plain = load_aoti_package(path, torch.device("cpu"))(ids, mask)
    single = load_aoti_package(path, torch.device("cpu"), single_threaded=True)(ids, mask)
    for a, b in zip(plain, single):
        assert a.shape == b.shape and torch.equal(a, b)


def test_an_aoti_load_leaves_no_extraction_folder_behind(bundles, tmp_path, monkeypatch):
    """torch extracts a .pt2 into $TMPDIR/aotinductor_* and removes it only when the model is destroyed,
    which a process exiting while it holds the model never does (one folder leaked per load). On the CPU
    the folder goes at load, and the model still computes what it did."""
    import tempfile

    from clinvla_engine.export.graphs import example_inputs
    from clinvla_engine.runtime import runners

    path = bundles["aoti"] / "text.pt2"
    ids, mask = example_inputs(tiny_model(), "text", batch=2, seed=3, max_tokens=40)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # torch's loader takes its folder from TMPDIR
    monkeypatch.setattr(tempfile, "tempdir", None)
    seen = []
    real = runners._remove_extraction
    monkeypatch.setattr(runners, "_remove_extraction", lambda folders, *a: (seen.append(set(folders)), real(folders, *a)))
    module = runners.load_aoti_package(path, torch.device("cpu"))
    assert len(seen) == 1 and len(seen[0]) == 1, seen  # this load's folder, found by what it maps
    folder = next(iter(seen[0]))
    assert folder.startswith(str(tmp_path / "aotinductor_")), folder
    assert not list(tmp_path.glob("aotinductor_*"))  # gone while the model is still alive
    monkeypatch.setattr(runners, "_remove_extraction", lambda *a: None)  # the reference: torch's own behaviour
    reference = runners.load_aoti_package(path, torch.device("cpu"))
    assert len(list(tmp_path.glob("aotinductor_*"))) == 1  # what used to be left behind
    for a, b in zip(module(ids, mask), reference(ids, mask)):
        assert torch.equal(a, b)


# ---- structure: the runtime stands alone ----------------------------------------------------------
def test_the_runtime_imports_neither_the_builder_nor_itself_in_a_cycle():
    """A deployment ships the runtime without export/; and runners must not reach back into engine."""
    import ast
    from pathlib import Path

    import clinvla_engine.runtime as rt

    imports = {}
    for path in Path(rt.__file__).parent.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names.add("." * node.level + (node.module or ""))
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        imports[path.stem] = names
    for module, names in imports.items():
        assert not any("export" in n for n in names), (module, names)
    assert not any(n in (".engine", "..runtime.engine") for n in imports["runners"]), imports["runners"]
    assert not any(n in (".engine", ".runners") for n in imports["bundle"] | imports["graphs"])


# ---- slow: the compile backend on the CPU ---------------------------------------------------------
@pytest.mark.slow
def test_compile_backend_on_cpu(bundles, tmp_path, model):
    from clinvla_engine.export.build import build_engine

    r = build_engine(bundles["checkpoint"], tmp_path / "c", backend="compile", device="cpu", batch_sizes=(2,),
                     max_text_len=16, parity_studies=8, parity_random=4, progress=False)
    assert r.manifest["parity"]["passed"] and "weights.safetensors" in r.manifest["files"]
    e = Engine.load(tmp_path / "c")
    fronts = list(pictures(3, 9))
    np.testing.assert_allclose(e.embed_studies(fronts), reference(model, fronts, [None] * 3)[0], atol=1e-4)


# ---- GPU (tools/gpu_suite.sh) -----------------------------------------------------------------------
GPU_BUCKETS = (2, 8)  # two buckets: every bucket is compiled (and captured) once per graph


def _gpu_cases():
    from clinvla_engine import backends

    cases = [("aoti", "fp16"), ("compile", "fp16")]  # what fits the GPU suite's time slice
    if backends.onnxruntime_cuda() and backends.onnx_graphsurgeon():
        cases.append(("onnxruntime", "fp16"))
    return cases


def build_gpu_test_bundle(root, backend: str, precision: str) -> Path:
    """The GPU tests' bundle of the tiny model; reused when `root` already holds a matching one.
    tools/gpu_suite.sh calls this ahead of the test step (CLINVLA_GPU_TEST_BUNDLES), so the tests
    load bundles instead of building them inside their time slice."""
    from clinvla_engine.export.build import build_engine
    from clinvla_engine.export.testing import tiny_checkpoint

    root = Path(root)
    out = root / f"{backend}-{precision}"
    manifest = out / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if (m.get("device"), m.get("precision"), m.get("batch_sizes"), m.get("max_text_len")) == (
                "cuda", precision, sorted(GPU_BUCKETS), 48) and m.get("complete", True):
            return out
    build_engine(tiny_checkpoint(root / "ckpt"), out, backend=backend, device="cuda", precision=precision,
                 batch_sizes=GPU_BUCKETS, max_text_len=48, parity_studies=16, parity_random=8, progress=False,
                 force=True)
    return out


@pytest.fixture(scope="session")
def gpu_bundles(tmp_path_factory):
    import functools
    import os

    root = os.environ.get("CLINVLA_GPU_TEST_BUNDLES") or tmp_path_factory.getbasetemp() / "gpu-engines"
    return functools.partial(build_gpu_test_bundle, root)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend,precision", _gpu_cases())
def test_gpu_engine_parity_and_cuda_graphs(gpu_bundles, backend, precision, model):
    e = Engine.load(gpu_bundles(backend, precision))
    m = e.manifest
    assert m["device"] == "cuda" and m["parity"]["passed"], m["parity"]["failures"]
    fronts = list(pictures(11, 3))
    lats = [x if i % 3 else None for i, x in enumerate(pictures(11, 4))]
    emb = e.embed_studies(fronts, lats)
    floor = 0.9999 if precision == "fp32" else 0.999
    assert cos_rows(emb, reference(model, fronts, lats)[0]).min() >= floor
    if backend != "onnxruntime":
        assert e.runner.static_shapes and not e.runner.notes, e.runner.notes  # every bucket replayed as a graph
    if backend == "aoti":
        assert m["aoti"]["attempts"] and m["aoti"]["fingerprint"]["device"] == "cuda"
        print("AOTInductor packaging on this GPU:", [(a["graph"], a["packaging"], a["probe"]["ok"]) for a in m["aoti"]["attempts"]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engine_from_several_threads(gpu_bundles):
    e = Engine.load(gpu_bundles("compile", "fp16"))
    expected = {i: e.embed_studies(pictures(6, i)) for i in range(3)}
    out, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                out[i] = e.embed_studies(pictures(6, i))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for i in range(3):
        np.testing.assert_allclose(out[i], expected[i], atol=2e-3)
