"""The OpenVINO backend: fp32 / bf16 / int8 bundles of the tiny model, built, loaded, checked.

One checkpoint, one shared ONNX export (BuildOptions.onnx_cache) and one bundle per precision,
built once per session; bf16 only where OpenVINO reports the CPU has BF16. Skipped where
openvino (or the export extra) is not installed.
"""
import json
import shutil
import threading

import numpy as np
import pytest
import torch

for _name, _extra in (("openvino", "openvino"), ("nncf", "openvino"), ("onnx", "export"), ("onnxscript", "export"),
                      ("onnx_graphsurgeon", "export")):
    pytest.importorskip(_name, reason=f"{_name} is not installed: pip install 'clinvla-engine[{_extra}]'")

from clinvla_engine.export import openvino_backend  # noqa: E402
from clinvla_engine.export.build import build_engine  # noqa: E402
from clinvla_engine.export.commands import build_engine_main  # noqa: E402
from clinvla_engine.export.parity import THRESHOLDS  # noqa: E402
from clinvla_engine.export.testing import TEST_BATCH_SIZES, TEST_TEXT_LEN, tiny_checkpoint, tiny_model  # noqa: E402
from clinvla_engine.runtime import BundleError, Engine  # noqa: E402
from clinvla_engine.runtime import runners  # noqa: E402
from clinvla_engine.runtime.runners import openvino_cpu_info  # noqa: E402

HAS_BF16 = "BF16" in openvino_cpu_info()["capabilities"]
NO_BF16 = (f"this CPU ({openvino_cpu_info()['name']}) has no native bf16 (OpenVINO capabilities "
           f"{openvino_cpu_info()['capabilities']}): bf16 builds are refused here")
PRECISIONS = ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(not HAS_BF16, reason=NO_BF16)), "int8"]
PARITY_STUDIES = 24


@pytest.fixture(scope="session")
def ov(tmp_path_factory):
    """{"checkpoint", "root", "cache", "bundles": {precision: path}}; bundles are built on first use."""
    root = tmp_path_factory.mktemp("openvino")
    return {"checkpoint": tiny_checkpoint(root / "ckpt"), "root": root, "cache": {}, "bundles": {}}


def bundle(ov, precision, **options):
    if precision not in ov["bundles"]:
        # strict=False: the test reads the parity report itself (see test_parity_gates_each_precision)
        build_engine(ov["checkpoint"], ov["root"] / precision, backend="openvino", device="cpu", precision=precision,
                     batch_sizes=TEST_BATCH_SIZES, max_text_len=TEST_TEXT_LEN, parity_studies=PARITY_STUDIES,
                     progress=False, force=True, strict=False, onnx_cache=ov["cache"], **options)
        ov["bundles"][precision] = ov["root"] / precision
    return ov["bundles"][precision]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def cos_rows(a, b):
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---- build and load, each precision --------------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
def test_build_and_load_each_precision(ov, model, precision):
    d = bundle(ov, precision)
    m = json.loads((d / "manifest.json").read_text())
    assert (m["backend"], m["device"], m["precision"], m["complete"]) == ("openvino", "cpu", precision, True)
    files = set(m["files"])
    assert {"image.xml", "image.bin", "text.xml", "text.bin"} <= files
    assert all(not f.endswith(".onnx") for f in files), "the bundle holds the IR, not the ONNX it came from"
    for graph in ("image", "text"):
        assert m["graphs"][graph]["file"] == f"{graph}.xml" and m["graphs"][graph]["weights"] == f"{graph}.bin"
    details = m["backend_details"]
    assert details["inference_precision"] == {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[precision]
    assert details["cpu"] == openvino_cpu_info()["name"] and m["versions"]["openvino"]
    xml = (d / "image.xml").read_text()
    if precision == "int8":
        assert "FakeQuantize" in xml and details["quantization"]["model_type"] == "TRANSFORMER"
        # 7-bit weights in every layer where this CPU's 8-bit dot products can saturate (no VNNI)
        assert details["quantization"]["overflow_fix"] == openvino_backend.overflow_fix_for(openvino_cpu_info()["isa"])
        assert m["calibration"] == {"source": "synthetic", "studies": 64, "seed": 1000, "format": "mimic"}
    else:
        assert "FakeQuantize" not in xml and "calibration" not in m
    with Engine.load(d) as engine:
        assert engine.info()["backend"] == "openvino"
        notes = " ".join(engine.runner.describe()["notes"])
        assert f"inference precision {details['inference_precision']}" in notes
        texts = ["small left pleural effusion", "no acute cardiopulmonary process", "mild cardiomegaly"]
        got = engine.embed_texts(texts)
        ids, mask = engine.tokenize(texts)
        with torch.no_grad():
            ref = model.encode_text((ids, mask))
        ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
        assert got.shape == ref.shape and cos_rows(got, ref).min() >= THRESHOLDS[precision]["cosine_min"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_parity_gates_each_precision(ov, precision):
    m = json.loads((bundle(ov, precision) / "manifest.json").read_text())
    p = m["parity"]
    assert p["thresholds"] == THRESHOLDS[precision]
    gated = p.get("outputs_on_studies", p["outputs"])
    assert all(s["cos_min"] >= THRESHOLDS[precision]["cosine_min"] and s["finite"] for s in gated.values()), gated
    p10 = p["retrieval"]["p_at_10"]
    assert p10["k"] == 10 and p10["change"] == pytest.approx(p10["engine"] - p10["reference"])
    assert p["data"]["source"] == "synthetic" and p["retrieval"]["studies"] == PARITY_STUDIES
    if precision == "fp32":
        assert p["passed"], p["failures"]
        assert p10["change"] == 0 and p["retrieval"]["image_to_text"] >= 0.95
    elif precision == "int8":
        assert p["passed"], p["failures"]
        assert -p10["change"] <= THRESHOLDS["int8"]["p10_drop_max"]
        # calibrated on studies: noise images are off its ranges and are reported, not gated
        assert p["outputs_on_studies"]["image_emb"]["samples"] == PARITY_STUDIES
    else:
        # bf16's outputs pass their cosine; the tiny random model's image->text scores lie within
        # ~3e-3 of each other, so any rounding reorders its top 10 and the 0.95 overlap gate
        # (bf16's, kept as it is) can fail here. Nothing else may.
        assert all("retrieval overlap" in f for f in p["failures"]), p["failures"]


def test_int8_on_the_users_calibration_studies(ov, tmp_path):
    from clinvla_engine.data.synth import generate_archive

    studies = tmp_path / "mine"
    generate_archive(studies, 12, 5, fmt="mimic", size=64, progress=False)
    out = tmp_path / "int8-user"
    build_engine(ov["checkpoint"], out, backend="openvino", device="cpu", precision="int8", calibration=studies,
                 calibration_studies=10, batch_sizes=TEST_BATCH_SIZES, max_text_len=TEST_TEXT_LEN,
                 parity_studies=PARITY_STUDIES, progress=False, force=True, strict=False, onnx_cache=ov["cache"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["calibration"] == {"source": "user", "path": str(studies.resolve()), "format": "mimic", "studies": 10}
    q = m["backend_details"]["quantization"]["graphs"]
    assert q["image"]["samples"] == 10 and q["image"]["batches"] == 2
    # other calibration data, other ranges: the IR differs from the synthetic-calibrated one
    assert m["files"]["image.bin"]["sha256"] != json.loads(
        (bundle(ov, "int8") / "manifest.json").read_text())["files"]["image.bin"]["sha256"]


def test_p10_drop_beyond_the_threshold_is_refused(ov, model, monkeypatch):
    from clinvla_engine.export import parity

    real = parity.p_at_10_change

    def worse(*args):
        r = real(*args)
        r["engine"], r["change"] = r["reference"] - 0.05, -0.05
        return r

    monkeypatch.setattr(parity, "p_at_10_change", worse)
    with Engine.load(bundle(ov, "int8")) as engine:
        report = parity.check_parity(model, engine, "int8", random=2, studies=12, seed=3)
        assert not report["passed"]
        assert any("P@10 dropped by 0.0500" in f and "> 0.01" in f for f in report["failures"]), report["failures"]
        assert parity.check_parity(model, engine, "int8", random=2, studies=12, seed=3, max_p10_change=0.06)["passed"]


# ---- the runtime ---------------------------------------------------------------------------------
def test_throughput_hint_threads_and_concurrent_calls_agree(ov):
    d = bundle(ov, "fp32")
    texts = [f"report {i}: small left effusion and {i % 3} nodules" for i in range(11)]
    with Engine.load(d) as latency:
        ref = latency.embed_texts(texts)
        rng = np.random.default_rng(0)
        pics = rng.integers(0, 256, (11, 70, 75)).astype(np.uint8)
        ref_img = latency.embed_studies(list(pics))
    with Engine.load(d, performance_hint="throughput", threads=2) as tput:
        info = tput.runner.describe()
        assert info["performance_hint"] == "throughput" and info["threads"] == 2
        np.testing.assert_allclose(tput.embed_texts(texts), ref, atol=1e-5)
        np.testing.assert_allclose(tput.embed_studies(list(pics)), ref_img, atol=1e-5)
        results, errors = {}, []

        def work(i):
            try:
                results[i] = tput.embed_texts(texts)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and all(np.allclose(r, ref, atol=1e-5) for r in results.values())
    with pytest.raises(ValueError, match="performance_hint must be one of latency, throughput"):
        Engine.load(d, performance_hint="fast")
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        Engine.load(d, threads=0)


def test_latency_engine_runs_bucket_batches_on_static_shapes(ov):
    """Each graph is also compiled once per bucket with static shapes (text at max_text_len tokens);
    a call of exactly that shape takes it, any other size or length the dynamic model, same numbers."""
    d = bundle(ov, "fp32")
    with Engine.load(d) as eng:
        runner = eng.runner
        assert runner.static == {"image": list(TEST_BATCH_SIZES), "text": list(TEST_BATCH_SIZES)}
        assert set(runner.pools) == {("image", None), ("text", None)} | {
            (g, b) for g in ("image", "text") for b in TEST_BATCH_SIZES}
        notes = " ".join(runner.describe()["notes"])
        assert "static shapes for image at batch" in notes and f"text at {eng.max_text_len} tokens" in notes
        rng = np.random.default_rng(3)
        pics = list(rng.integers(0, 256, (max(TEST_BATCH_SIZES) + 1, 64, 64)).astype(np.uint8))
        used = []
        for key, pool in runner.pools.items():  # record which compiled model each call takes
            req = pool.get_nowait()
            original = req.start_async
            req.start_async = (lambda k, f: (lambda *a, **kw: (used.append(k), f(*a, **kw))[1]))(key, original)
            pool.put(req)
        b = max(TEST_BATCH_SIZES)
        at_bucket = eng.embed_studies(pics[:b])
        odd = eng.embed_studies(pics[:b - 1])  # not a bucket unless the buckets are consecutive
        image_used = list(used)
        assert ("image", b) in image_used
        if b - 1 not in TEST_BATCH_SIZES:
            assert ("image", None) in image_used
        np.testing.assert_allclose(odd, at_bucket[:b - 1], atol=1e-5)
        # text: a bucket's rows at exactly max_text_len tokens take the static model; fewer tokens,
        # or another batch size, the dynamic one; the numbers agree
        ids = torch.from_numpy(rng.integers(1000, 5000, (b, eng.max_text_len))).long()
        ids[:, 0], ids[:, -1] = eng.tokenizer.cls_id, eng.tokenizer.sep_id
        mask = torch.ones_like(ids)
        used.clear()
        full = eng.run_graph("text", {"input_ids": ids, "attention_mask": mask}, ["text_emb"])["text_emb"]
        short = ids[:, :eng.max_text_len - 4].clone()
        short[:, -1] = eng.tokenizer.sep_id
        eng.run_graph("text", {"input_ids": short, "attention_mask": mask[:, :-4]}, ["text_emb"])
        fewer = eng.run_graph("text", {"input_ids": ids[:b - 1], "attention_mask": mask[:b - 1]}, ["text_emb"])
        assert used == [("text", b), ("text", None), ("text", None) if b - 1 not in TEST_BATCH_SIZES else ("text", b - 1)]
        for pool in runner.pools.values():  # drop the wrappers: no request keeps a cycle to itself
            req = pool.get_nowait()
            del req.start_async
            pool.put(req)
        np.testing.assert_allclose(fewer["text_emb"], full[:b - 1], atol=1e-5)
    with Engine.load(d, performance_hint="throughput") as tput:  # splits batches over requests: dynamic only
        assert tput.runner.static == {}
        np.testing.assert_allclose(tput.embed_studies(pics[:b]), at_bucket, atol=1e-5)


def _copy(ov, precision, tmp_path):
    d = tmp_path / precision
    shutil.copytree(bundle(ov, precision), d)
    return d


@pytest.mark.parametrize("target", ["image.bin", "text.xml"])
def test_refuses_a_tampered_bundle(ov, tmp_path, target):
    d = _copy(ov, "fp32", tmp_path)
    raw = bytearray((d / target).read_bytes())
    raw[len(raw) // 2] ^= 0x04
    (d / target).write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=f"{target} does not match its size and SHA-256"):
        Engine.load(d)


def _edit(d, change):
    m = json.loads((d / "manifest.json").read_text())
    change(m)
    (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("change,message", [
    (lambda m: m.update(precision="fp16"), "precision must be one of fp32, bf16, int8 for a openvino bundle"),
    (lambda m: m.update(device="cuda"), "device must be cpu for a openvino bundle"),
    (lambda m: m["graphs"]["image"].pop("weights"), "graphs.image.weights must be a listed .bin file"),
    (lambda m: m["graphs"]["text"].update(file="text.bin"), "graphs.text.file must be a listed .xml file"),
    (lambda m: m["backend_details"].update(inference_precision="bf16"),
     "backend_details.inference_precision must be \"f32\" for a fp32 openvino bundle"),
])
def test_refuses_a_manifest_edited_into_a_bad_combination(ov, tmp_path, change, message):
    d = _copy(ov, "fp32", tmp_path)
    _edit(d, change)
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Engine.load(d)


def test_an_int8_manifest_may_not_claim_bf16_either(ov, tmp_path):
    d = _copy(ov, "int8", tmp_path)
    _edit(d, lambda m: m["backend_details"].update(inference_precision="bf16"))
    with pytest.raises(BundleError, match="must be \"f32\" for a int8 openvino bundle"):
        Engine.load(d)


# ---- refusals at build time, and auto ----------------------------------------------------------
def test_overflow_fix_covers_every_layer_on_cpus_whose_int8_dot_products_saturate():
    assert openvino_backend.overflow_fix_for(["avx2"]) == "enable"
    assert openvino_backend.overflow_fix_for(["avx2", "avx512f"]) == "enable"  # AVX-512 without VNNI
    for vnni in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert openvino_backend.overflow_fix_for(["avx2", vnni]) == "first_layer_only"  # NNCF's default


def test_an_int8_engine_built_for_vnni_says_so_on_a_cpu_without_it(ov, tmp_path, monkeypatch):
    d = tmp_path / "int8"
    shutil.copytree(bundle(ov, "int8"), d)
    m = json.loads((d / "manifest.json").read_text())
    m["backend_details"]["quantization"]["overflow_fix"] = "first_layer_only"
    (d / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(runners, "openvino_cpu_info",
                        lambda: {"name": "Old Xeon", "capabilities": ["FP32", "INT8"], "isa": ["avx2"]})
    with Engine.load(d) as engine:
        notes = engine.runner.describe()["notes"]
        assert any("built for a CPU with VNNI" in n and "rebuild it here" in n for n in notes), notes
    monkeypatch.setattr(runners, "openvino_cpu_info",
                        lambda: {"name": "New Xeon", "capabilities": ["FP32", "INT8"], "isa": ["avx2", "avx512_vnni"]})
    with Engine.load(d) as engine:
        assert not any("VNNI" in n for n in engine.runner.describe()["notes"])


def test_bf16_is_refused_with_the_reason_on_a_cpu_without_it(ov, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(openvino_backend, "openvino_cpu_info",
                        lambda: {"name": "Old Xeon", "capabilities": ["FP32", "INT8"], "isa": ["avx2"]})
    rc = build_engine_main([str(ov["checkpoint"]), "-o", str(tmp_path / "eng"), "--backend", "openvino",
                            "--device", "cpu", "--precision", "bf16", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "this CPU (Old Xeon) has no native bf16" in err and "FP32, INT8" in err
    assert not (tmp_path / "eng").exists()


@pytest.mark.parametrize("extra,message", [
    (["--backend", "onnxruntime", "--precision", "int8"], "--precision int8 is built by --backend openvino"),
    (["--backend", "openvino", "--precision", "fp16"], "the openvino backend builds fp32, bf16, int8, not fp16"),
    (["--backend", "openvino", "--precision", "int8", "--max-p10-change", "2"], "--max-p10-change must be"),
    (["--backend", "openvino", "--calibration", "x"], "--calibration applies to --precision fp8 or int8 only"),
])
def test_refuses_impossible_openvino_builds(ov, tmp_path, capsys, extra, message):
    rc = build_engine_main([str(ov["checkpoint"]), "-o", str(tmp_path / "eng"), "--device", "cpu", "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "eng").exists()


def test_auto_measures_openvino_and_picks_a_backend_that_exists_here(ov, tmp_path, monkeypatch):
    from clinvla_engine.export import build

    # AOTInductor's compile of even the tiny model takes a minute on 2 cores; test_export's auto
    # build covers it. Here: the ONNX-based candidates, OpenVINO among them.
    monkeypatch.setitem(build.AUTO_ORDER, "cpu", ("onnxruntime", "openvino"))
    keep = tmp_path / "kept"
    result = build_engine(ov["checkpoint"], tmp_path / "auto", backend="auto", device="cpu",
                          batch_sizes=TEST_BATCH_SIZES, max_text_len=TEST_TEXT_LEN, parity_studies=12,
                          progress=False, onnx_cache=ov["cache"], keep_candidates=keep)
    m = result.manifest
    cands = m["build"]["candidates"]
    assert set(cands) == {"onnxruntime", "openvino"} and all(c["built"] for c in cands.values()), cands
    passing = {k: c for k, c in cands.items() if c["parity_passed"]}
    fastest = min(passing, key=lambda k: passing[k]["measured"]["score_ms"])
    assert m["backend"] == m["build"]["chosen"] == fastest
    with Engine.load(tmp_path / "auto") as engine:
        assert engine.info()["backend"] == fastest
    with Engine.load(keep / "openvino") as engine:
        assert engine.embed_texts(["no effusion"]).shape == (1, m["config"]["embed_dim"])
    # performance_hint is OpenVINO's: an ONNX Runtime engine refuses it rather than ignore it
    with pytest.raises(ValueError, match="performance_hint applies to OpenVINO engines only"):
        Engine.load(keep / "onnxruntime", performance_hint="throughput")


# ---- a deployed engine scored by the evaluation protocols (clinvla eval ENGINE_DIR) ------------------
@pytest.fixture(scope="module")
def eval_archive(tmp_path_factory):
    from clinvla_engine.data.synth import generate_archive

    out = tmp_path_factory.mktemp("ov-eval") / "archive"
    generate_archive(out, studies=160, seed=5, fmt="mimic", size=64, split_fractions=(0.2, 0.0, 0.8),
                     progress=False, workers=1)
    return out


def test_an_engine_is_scored_like_its_checkpoint(ov, eval_archive, tmp_path):
    from clinvla_engine.evaluate import evaluate
    from clinvla_engine.model import load_checkpoint
    from clinvla_engine.runtime.as_model import EngineModel, is_engine_dir

    manifest = tmp_path / "manifest.json"
    ref = evaluate(load_checkpoint(ov["checkpoint"]), eval_archive, protocols=("5x200", "instance"), per_class=6,
                   manifest_out=manifest, keep_items=True)
    assert is_engine_dir(bundle(ov, "fp32")) and not is_engine_dir(ov["checkpoint"])
    fp32 = EngineModel.load(bundle(ov, "fp32"))
    got = evaluate(fp32, eval_archive, protocols=("5x200", "instance"), per_class=6, manifest_in=manifest, keep_items=True)
    for proto in ("5x200", "instance"):  # the same sets, the same numbers (fp32 parity >= 0.9999 cosine)
        for k, v in ref[proto].items():
            assert got[proto][k] == pytest.approx(v, abs=0.02), (proto, k)
    with pytest.raises(ValueError, match="local features and masking take the checkpoint"):
        fp32.encode_images(torch.zeros(1, 3, 64, 64), return_local=True)
    fp32.close()


def test_clinvla_eval_takes_an_engine_folder(ov, eval_archive, tmp_path, capsys):
    from clinvla_engine.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", str(bundle(ov, "int8")), "--data", str(eval_archive), "--protocols", "5x200",
                 "--per-class", "6", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ClinVLA evaluation of" in printed and "5x200" in printed
    res = json.loads(out.read_text())
    assert 0.0 <= res["5x200"]["i2t_P@10"] <= 1.0
    with pytest.raises(SystemExit, match="engine bundle: the claims protocols"):
        main(["eval", str(bundle(ov, "int8")), "--data", str(eval_archive), "--claims"])
    with pytest.raises(SystemExit, match="engine bundle: the rsna protocol"):
        main(["eval", str(bundle(ov, "int8")), "--data", str(eval_archive), "--protocols", "5x200,rsna"])
