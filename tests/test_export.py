"""clinvla-build-engine: ONNX export + GraphSurgeon passes, precision rewrites, the build, the CLI.

One ``auto`` build of the tiny preset on the CPU (AOTInductor and ONNX Runtime candidates, both
kept) is shared by this file and test_runtime.py (clinvla_engine.export.testing caches it per
process); everything else reuses its ONNX files.
"""
import json
import pickle
import shutil

import numpy as np
import pytest
import torch

for _name in ("onnx", "onnxscript", "onnxruntime", "onnx_graphsurgeon"):
    pytest.importorskip(_name, reason=f"{_name} is not installed: pip install 'clinvla-engine[export]'")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from clinvla_engine.export import surgery  # noqa: E402
from clinvla_engine.export.commands import build_engine_main, engine_main  # noqa: E402
from clinvla_engine.export.graphs import example_inputs, specs  # noqa: E402
from clinvla_engine.export.testing import cpu_bundles, tiny_model  # noqa: E402

COS = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.999, "fp8": 0.98}


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    return cpu_bundles(str(tmp_path_factory.getbasetemp() / "engines"))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def cosine(a, b):
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def feeds_for(model, graph, batch=8, seed=3):
    names = specs(model)[graph].input_names
    return {n: x.numpy() for n, x in zip(names, example_inputs(model, graph, batch=batch, seed=seed))}


def run_ort(m, feeds):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


# ---- the exported graphs ------------------------------------------------------------------------
def test_onnx_graphs_are_clean_dynamic_and_checked(bundles):
    for graph in ("image", "text"):
        m = onnx.load(str(bundles["onnxruntime"] / f"{graph}.onnx"))
        onnx.checker.check_model(m, full_check=True)
        assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
        first = m.graph.input[0].type.tensor_type.shape.dim[0]
        assert first.dim_param == "batch", "the batch dimension must be dynamic"
        ops = [n.op_type for n in m.graph.node]
        marked = surgery.fp32_nodes(m)
        by_name = {n.name: n.op_type for n in m.graph.node}
        assert ops.count("LayerNormalization") >= 5 and "Softmax" in ops
        assert {by_name[n] for n in marked} == {"LayerNormalization", "Softmax", "ReduceL2"}
        assert all(len(n.output) == 1 for n in m.graph.node if n.op_type == "LayerNormalization")
        assert len({n.name for n in m.graph.node}) == len(m.graph.node), "node names must be unique"
        # training-only parts are not in the graphs
        assert not any("decoder" in i.name for i in m.graph.initializer)
    names = [i.name for i in onnx.load(str(bundles["onnxruntime"] / "image.onnx")).graph.input]
    assert names == ["frontal", "lateral", "lateral_present"]


def test_surgery_removes_dead_outputs_and_redundant_casts():
    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    x = helper.make_tensor_value_info("x", f16, ["batch", 4])
    y = helper.make_tensor_value_info("y", f32, ["batch", 4])
    extra = helper.make_tensor_value_info("extra", f32, ["batch", 4])
    scale = helper.make_tensor("scale", f32, [4], np.ones(4, np.float32))
    bias = helper.make_tensor("bias", f32, [4], np.zeros(4, np.float32))
    nodes = [
        helper.make_node("Cast", ["x"], ["x32"], to=f32),
        helper.make_node("Cast", ["x32"], ["x16"], to=f16),  # undoes the widening cast: removable
        helper.make_node("Cast", ["x16"], ["a"], to=f32),
        helper.make_node("Cast", ["a"], ["b"], to=f32),  # identity cast: removable
        helper.make_node("LayerNormalization", ["b", "scale", "bias"], ["y", "mean", "inv_std"], axis=-1),
        helper.make_node("Relu", ["b"], ["extra"]),
    ]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y, extra], [scale, bias]),
                          opset_imports=[helper.make_opsetid("", 18)])
    cleaned, report = surgery.clean(m, keep_outputs=["y"])
    assert report["outputs_removed"] == ["extra"]
    assert report["casts_removed"] == 2 and report["optional_outputs_removed"] == 2
    assert [n.op_type for n in cleaned.graph.node] == ["Cast", "LayerNormalization"]
    surgery.check(cleaned)
    xv = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float16)
    (out,) = run_ort(cleaned, {"x": xv})
    (ref,) = run_ort(m, {"x": xv})[:1]
    np.testing.assert_allclose(out, ref, atol=1e-6)
    with pytest.raises(ValueError, match="no output"):
        surgery.clean(m, keep_outputs=["nope"])


@pytest.mark.parametrize("graph", ["image", "text"])
def test_fp16_rewrite_keeps_norms_in_float32_and_matches(bundles, model, graph):
    fp32 = onnx.load(str(bundles["onnxruntime"] / f"{graph}.onnx"))
    low = surgery.to_precision(fp32, "fp16")
    surgery.check(low)
    inferred = onnx.shape_inference.infer_shapes(low)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    kept = [n for n in inferred.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert kept and all(types.get(i, TensorProto.FLOAT) == TensorProto.FLOAT for n in kept for i in n.input if i)
    assert all(types[o.name] == TensorProto.FLOAT for o in inferred.graph.output)  # float32 I/O
    assert any(t.data_type == TensorProto.FLOAT16 for t in inferred.graph.initializer)
    feeds = feeds_for(model, graph)
    for a, b in zip(run_ort(fp32, feeds), run_ort(low, feeds)):
        assert cosine(a, b).min() >= COS["fp16"]


def test_bf16_rewrite_matches_in_the_reference_evaluator(bundles, model):
    from onnx.reference import ReferenceEvaluator

    fp32 = onnx.load(str(bundles["onnxruntime"] / "text.onnx"))
    low = surgery.to_precision(fp32, "bf16")
    surgery.check(low)
    assert any(t.data_type == TensorProto.BFLOAT16 for t in low.graph.initializer)
    feeds = feeds_for(model, "text", batch=4)
    for a, b in zip(run_ort(fp32, feeds), ReferenceEvaluator(low).run(None, feeds)):
        assert cosine(a, b).min() >= COS["bf16"]


def test_fp8_qdq_fake_quantised_graph_stays_close(bundles, model):
    from clinvla_engine.export.quantize import calibrate, insert_fp8_qdq

    fp32 = onnx.load(str(bundles["onnxruntime"] / "image.onnx"))
    feeds = feeds_for(model, "image")
    q = insert_fp8_qdq(fp32, calibrate(fp32, [feeds]))
    surgery.check(q)
    ops = [n.op_type for n in q.graph.node]
    gemms = int(surgery.get_meta(q, "clinvla.fp8_gemms"))
    assert gemms >= 10 and ops.count("QuantizeLinear") == 2 * gemms == ops.count("DequantizeLinear")
    assert max(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) >= 19
    for a, b in zip(run_ort(fp32, feeds), run_ort(q, feeds)):
        assert cosine(a, b).min() >= COS["fp8"]
    # and on top of fp16, as TensorRT gets it
    surgery.check(insert_fp8_qdq(surgery.to_precision(fp32, "fp16"), calibrate(fp32, [feeds])))


# ---- the build -----------------------------------------------------------------------------------
def test_auto_build_measures_candidates_and_keeps_the_fastest(bundles):
    m = json.loads((bundles["auto"] / "manifest.json").read_text())
    cands = m["build"]["candidates"]
    from clinvla_engine import backends

    # every CPU backend installed here is a candidate (openvino with the [openvino] extra)
    expected = {"aoti", "onnxruntime"} | ({"openvino"} if backends.openvino() else set())
    assert set(cands) == expected and all(c["built"] for c in cands.values()), cands
    fastest = min(cands, key=lambda k: cands[k]["measured"]["score_ms"])
    assert m["backend"] == m["build"]["chosen"] == fastest
    assert {"image_ms", "text_ms", "image_per_s", "text_per_s"} <= set(cands[fastest]["measured"])
    stages = [s["stage"] for s in m["build"]["stages"]]
    assert any("GraphSurgeon" in s for s in stages) and any("AOTInductor" in s for s in stages)


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_bundle_manifest_and_build_time_parity(bundles, backend):
    d = bundles[backend]
    m = json.loads((d / "manifest.json").read_text())
    assert m["backend"] == backend and m["device"] == "cpu" and m["precision"] == "fp32"
    assert m["batch_sizes"] == [1, 4, 8] and m["max_text_len"] == 48
    assert m["config"]["name"] == "tiny" and m["tokenizer"]["vocab"] == "tokenizer/vocab.txt"
    assert {"clinvla_engine", "torch", "onnxruntime", "python"} <= set(m["versions"])
    files = set(m["files"])
    assert {"config.json", "tokenizer/vocab.txt", "tokenizer/tokenizer_config.json"} <= files
    assert {f"image.{'onnx' if backend == 'onnxruntime' else 'pt2'}", f"text.{'onnx' if backend == 'onnxruntime' else 'pt2'}"} <= files
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in m["files"].values())
    for name, g in m["graphs"].items():
        assert [t["name"] for t in g["outputs"]] == (["image_emb", "regions"] if name == "image" else ["text_emb", "words"])
    assert m["complete"] is True  # a kept candidate is a finished bundle of its own
    p = m["parity"]
    assert p["data"] == {"source": "synthetic", "studies": 24, "seed": 0, "format": "mimic"}
    assert p["passed"], p["failures"]
    assert all(s["cos_min"] >= COS["fp32"] for s in p["outputs"].values())
    assert p["retrieval"]["text_to_image"] >= 0.95 and p["retrieval"]["image_to_text"] >= 0.95


@pytest.mark.parametrize("backend", ["onnxruntime", "aoti"])
def test_compare_command_reports_per_output_error_and_cosine(bundles, backend, capsys):
    rc = engine_main(["compare", str(bundles["checkpoint"]), str(bundles[backend]), "--studies", "16", "--seed", "7"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, captured.err
    for name in ("image_emb", "regions", "text_emb", "words"):
        assert name in out
    assert "max abs err" in out and "cos min" in out and "top-10 retrieval overlap" in out and "PASSED" in out


def test_inspect_command_lists_files_versions_and_parity(bundles, capsys, tmp_path):
    assert engine_main(["inspect", str(bundles["auto"])]) == 0
    out = capsys.readouterr().out
    assert "usable here: yes" in out and "candidate aoti" in out and "sha256" in out and "version check: ok" in out
    copy = tmp_path / "bundle"
    shutil.copytree(bundles["onnxruntime"], copy)
    raw = bytearray((copy / "text.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (copy / "text.onnx").write_bytes(bytes(raw))
    assert engine_main(["inspect", str(copy), "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["files"]["text.onnx"]["status"] == "CHANGED" and not info["usable"]


def test_cli_builds_an_onnxruntime_engine(tmp_path, bundles, capsys):
    out = tmp_path / "eng"
    rc = build_engine_main([str(bundles["checkpoint"] / "model.safetensors"), "-o", str(out), "--backend",
                            "onnxruntime", "--device", "cpu", "--batch-sizes", "2,1", "--max-text-len", "32",
                            "--parity-studies", "12", "--quiet", "--json", str(tmp_path / "b.json")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "PASSED" in captured.out and "onnxruntime on cpu" in captured.out
    m = json.loads((out / "manifest.json").read_text())
    assert m["batch_sizes"] == [1, 2] and m["max_text_len"] == 32
    assert json.loads((tmp_path / "b.json").read_text())["backend"] == "onnxruntime"
    # an existing bundle is not overwritten without --force
    rc = build_engine_main([str(bundles["checkpoint"]), "-o", str(out), "--backend", "onnxruntime", "--quiet"])
    assert rc == 2 and "--force" in capsys.readouterr().err


# ---- the user's own studies: parity and calibration -------------------------------------------------
@pytest.fixture(scope="module")
def user_studies(tmp_path_factory):
    """A folder of studies as a hospital would give it (here a small MIMIC-CXR-JPG-style archive)."""
    from clinvla_engine.data.synth import generate_archive

    root = tmp_path_factory.mktemp("user") / "studies"
    generate_archive(root, 6, 11, fmt="mimic", size=64, progress=False)
    return root


def test_compare_on_the_users_studies(bundles, user_studies, capsys):
    rc = engine_main(["compare", str(bundles["checkpoint"]), str(bundles["onnxruntime"]), "--data", str(user_studies),
                      "--studies", "5", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(captured.out)
    assert report["data"] == {"source": "user", "path": str(user_studies.resolve()), "format": "mimic", "studies": 5}
    assert report["retrieval"]["studies"] == 5 and report["passed"]


def test_calibration_feeds_are_the_users_studies_preprocessed(bundles, user_studies, model):
    """FP8 calibration reads the studies given (images as the runtime preprocesses them, reports as
    it tokenises them) instead of random inputs; the activation ranges come from those."""
    from clinvla_engine.data import open_dataset
    from clinvla_engine.data.io import load_image
    from clinvla_engine.data.transforms import preprocess
    from clinvla_engine.export.context import BuildContext, Progress
    from clinvla_engine.export.quantize import calibrate
    from clinvla_engine.export.studies import open_user_studies

    studies, record = open_user_studies(user_studies, 0, "--calibration")
    assert record == {"source": "user", "path": str(user_studies.resolve()), "format": "mimic", "studies": 6}
    def fp8_context(calibration):
        return BuildContext(model=model, device=torch.device("cpu"), precision="fp8", batch_sizes=[1, 4],
                            max_text_len=48, out=bundles["onnxruntime"], progress=Progress(False),
                            calibration=calibration)

    ctx = fp8_context(studies)
    image_feeds, text_feeds = ctx.calibration_feeds("image"), ctx.calibration_feeds("text")
    assert [len(f["frontal"]) for f in image_feeds] == [6]  # one batch of up to 8
    v = model.config.vision
    first = list(open_dataset(user_studies))[0]
    np.testing.assert_array_equal(image_feeds[0]["frontal"][0],
                                  preprocess(load_image(first.frontal), v.image_size, v.pixel_mean, v.pixel_std).numpy())
    present = image_feeds[0]["lateral_present"]
    assert present.tolist() == [float(s.lateral is not None) for s in studies]
    assert sum(len(f["input_ids"]) for f in text_feeds) == sum(1 for s in studies if s.report)
    random_ctx = fp8_context(None)
    fp32 = onnx.load(str(bundles["onnxruntime"] / "image.onnx"))
    from_users, from_random = calibrate(fp32, image_feeds), calibrate(fp32, random_ctx.calibration_feeds("image"))
    assert set(from_users) == set(from_random) and all(a > 0 for a in from_users.values())
    assert from_users != from_random


# ---- refused inputs ------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_refuses_a_pickle_that_would_run_code(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _Evil()}, f)
    assert build_engine_main([str(bad), "-o", str(tmp_path / "eng"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "weights_only=True" in err and "refused" in err
    assert not (tmp_path / "eng").exists()


def test_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    from safetensors.torch import save_file

    other = tmp_path / "vit.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, str(other), metadata={"format": "pt"})
    assert build_engine_main([str(other), "-o", str(tmp_path / "eng"), "--quiet"]) == 2
    assert "not a ClinVLA checkpoint" in capsys.readouterr().err
    pt = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "clinvla_config": json.dumps({"model_type": "gloria"}),
                "clinvla_tokenizer": "{}"}, pt)
    assert build_engine_main([str(pt), "-o", str(tmp_path / "eng"), "--quiet"]) == 2
    assert "not a ClinVLA config" in capsys.readouterr().err


def test_refuses_impossible_builds(bundles, user_studies, tmp_path, capsys):
    ck = str(bundles["checkpoint"])
    cases = [
        (["--calibration", str(user_studies)], "--calibration applies to --precision fp8 or int8 only"),
        (["--parity-data", str(user_studies), "--parity-studies", "0"], "--parity-studies 0 turns the study check off"),
        (["--parity-data", str(tmp_path / "nowhere")], f"--parity-data {tmp_path / 'nowhere'}: no such folder"),
        (["--backend", "tensorrt", "--device", "cpu"], "GPU engines only"),
        (["--backend", "onnxruntime", "--device", "cpu", "--precision", "fp8"], "fp8"),
        (["--backend", "aoti", "--device", "cpu", "--precision", "fp16"], "fp16 on the CPU"),
        (["--batch-sizes", "8,zero"], "--batch-sizes"),
        (["--max-text-len", "2"], "--max-text-len"),
        (["--opset", "13", "--backend", "onnxruntime", "--device", "cpu"], "opset 13 is too old"),
    ]
    for extra, message in cases:
        rc = build_engine_main([ck, "-o", str(tmp_path / "eng"), "--quiet", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (extra, err)
        assert not (tmp_path / "eng").exists()
    if not torch.cuda.is_available():
        assert build_engine_main([ck, "-o", str(tmp_path / "eng"), "--device", "cuda", "--quiet"]) == 2
        assert "--device cuda is unavailable" in capsys.readouterr().err


# ---- the AOTInductor crash guard -----------------------------------------------------------------
def test_probe_reports_a_crash_as_a_signal(monkeypatch):
    import subprocess

    from clinvla_engine.runtime import aoti_probe

    class Done:
        returncode, stdout, stderr = -11, "loading x.pt2 on cuda\n", "Fatal Python error: Segmentation fault\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    r = aoti_probe.probe("x.pt2", None, "cuda", [])
    assert not r["ok"] and r["signal"] == "SIGSEGV" and "Segmentation fault" in r["output"]


def test_probe_loads_and_runs_a_real_package(bundles):
    from clinvla_engine.runtime import aoti_probe
    from clinvla_engine.runtime.aoti_probe import probe_inputs

    m = json.loads((bundles["aoti"] / "manifest.json").read_text())
    r = aoti_probe.probe(str(bundles["aoti"] / "text.pt2"), None, "cpu", probe_inputs(m, "text", batch=2))
    assert r["ok"], r


def test_aoti_build_falls_back_to_external_constants_then_gives_evidence(monkeypatch, tmp_path, model):
    """The control flow of the GPU crash guard, with compilation and the child process faked."""
    from clinvla_engine.export import aoti_backend
    from clinvla_engine.export.context import BuildContext, BuildError, Progress
    from clinvla_engine.runtime import aoti_probe

    calls = []
    monkeypatch.setattr(aoti_backend, "_compile", lambda ep, path, packaging, device: path.write_bytes(b"pkg"))
    monkeypatch.setattr(aoti_backend, "_constants_file", lambda ep, path: path.write_bytes(b"consts"))
    crash = {"ok": False, "returncode": -11, "signal": "SIGSEGV", "seconds": 0.1, "output": "Segmentation fault"}

    def fake_probe(package, constants, device, inputs, timeout=300.0):
        calls.append((package.rsplit("/", 1)[-1], constants is not None))
        return crash if constants is None else {"ok": True, "returncode": 0, "seconds": 0.1, "output": "ok"}

    monkeypatch.setattr(aoti_probe, "probe", fake_probe)
    ctx = BuildContext(model=model, device=torch.device("cpu"), precision="fp32", batch_sizes=[1, 4], max_text_len=48,
                       out=tmp_path, progress=Progress(False), options={"aoti_probe": True})
    part = aoti_backend.build(ctx)
    assert calls == [("image.pt2", False), ("image.pt2", True), ("text.pt2", False), ("text.pt2", True)]
    assert (tmp_path / "image.constants.safetensors").is_file()
    assert part["graphs"]["image"]["constants"] == "image.constants.safetensors"
    assert part["graphs"]["image"]["packaging"] == "external_constants"
    assert [a["probe"].get("signal") for a in part["aoti"]["attempts"]] == ["SIGSEGV", None, "SIGSEGV", None]
    monkeypatch.setattr(aoti_probe, "probe", lambda *a, **k: crash)
    with pytest.raises(BuildError, match="every AOTInductor packaging of the image graph crashed.*--backend compile"):
        aoti_backend.build(ctx)


def test_external_constants_package_runs(tmp_path, model):
    """The fallback packaging for real: constants outside the shared object, loaded from the bundle."""
    from clinvla_engine.export import aoti_backend
    from clinvla_engine.export.context import BuildContext, Progress
    from clinvla_engine.runtime.runners import load_aoti_package

    ctx = BuildContext(model=model, device=torch.device("cpu"), precision="fp32", batch_sizes=[1, 4], max_text_len=48,
                       out=tmp_path, progress=Progress(False), options={"aoti_constants": "external", "aoti_probe": False})
    entry = aoti_backend.build(ctx, graph_names=("text",))["graphs"]["text"]  # the text graph compiles fastest
    assert entry["packaging"] == "external_constants" and (tmp_path / entry["constants"]).is_file()
    module = load_aoti_package(tmp_path / entry["file"], torch.device("cpu"), tmp_path / entry["constants"])
    ids, mask = example_inputs(model, "text", batch=3)
    emb, words = module(ids, mask)
    ref_emb, ref_words, real = model.encode_text((ids, mask), return_local=True)
    assert cosine(emb, ref_emb.detach()).min() >= COS["fp32"]
    # at the real words: the rows of padding mean nothing (eager packs them out, the graph does not)
    assert cosine(words[real], ref_words.detach()[real]).min() >= COS["fp32"]
