"""The TensorRT backend.

TensorRT cannot be installed on the CI machines, so the real builds are marked ``trt`` and skip
with that reason; what runs everywhere is the builder's logic against a recording stand-in for the
TensorRT 10/11 Python API (profiles per bucket, strong vs weak typing, float32 pinning of norms,
timing cache, parser errors) and the ONNX it would be given.
"""
import json
import types

import pytest
import torch

from clinvla_engine import backends
from clinvla_engine.export import trt_backend
from clinvla_engine.export.context import BuildError

TRT = backends.tensorrt()
needs_trt = pytest.mark.skipif(not TRT, reason=f"TensorRT unavailable: {TRT.why}")


# ---- a recording stand-in for the tensorrt module ------------------------------------------------
class _Enum:
    def __init__(self, *names):
        for i, n in enumerate(names):
            setattr(self, n, i)


def fake_trt(strong: bool = True, weak: bool = True, parse_ok: bool = True, layers=()):
    rec = {"flags": set(), "profiles": [], "pinned": [], "cache_in": None, "network_flags": None}
    flag_names = [n for n, on in (("FP16", weak), ("BF16", weak), ("FP8", weak), ("OBEY_PRECISION_CONSTRAINTS", weak)) if on]
    trt = types.SimpleNamespace(__version__="10.99.0", float32="float32")
    trt.NetworkDefinitionCreationFlag = _Enum(*(["STRONGLY_TYPED"] if strong else ["EXPLICIT_BATCH"]))
    trt.BuilderFlag = _Enum(*flag_names) if flag_names else types.SimpleNamespace()
    trt.LayerType = _Enum("CONVOLUTION", "NORMALIZATION", "SOFTMAX", "MATRIX_MULTIPLY")
    trt.MemoryPoolType = _Enum("WORKSPACE")

    class Layer:
        def __init__(self, name, kind):
            self.name, self.type, self.num_outputs, self.precision = name, getattr(trt.LayerType, kind), 1, None

        def set_output_type(self, i, dtype):
            rec["pinned"].append(self.name)

    class Network:
        def __init__(self):
            self._layers = [Layer(n, k) for n, k in layers]
            self.num_layers = len(self._layers)

        def get_layer(self, i):
            return self._layers[i]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Cache:
        def serialize(self):
            return b"timing-cache"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            rec["workspace"] = size

        def set_flag(self, flag):
            rec["flags"].add(flag)

        def add_optimization_profile(self, p):
            rec["profiles"].append(p.shapes)

        def create_timing_cache(self, data):
            rec["cache_in"] = data
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            rec["cache_set"] = True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            rec["network_flags"] = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"PLAN"

    class Parser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return parse_ok

        def get_error(self, i):
            return "Unsupported ONNX data type: FLOAT8E4M3FN"

    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt, rec


TEXT_SPEC = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"]},
                        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "tokens"]}]}
IMAGE_SPEC = {"inputs": [{"name": "frontal", "dtype": "float32", "shape": ["batch", 3, 64, 64]},
                         {"name": "lateral_present", "dtype": "float32", "shape": ["batch"]}]}


def test_reasons_it_cannot_build_here():
    assert "GPU engines only" in trt_backend.unsupported("cpu", "fp16")
    if not TRT:
        assert trt_backend.unsupported("cuda", "fp16") == TRT.why


def test_one_profile_per_bucket_with_token_range():
    shapes = trt_backend.profile_shapes(TEXT_SPEC, 8, 128)
    assert shapes["input_ids"] == ((8, 3), (8, 128), (8, 128))
    shapes = trt_backend.profile_shapes(IMAGE_SPEC, 64, 128)
    assert shapes["frontal"] == ((64, 3, 64, 64),) * 3 and shapes["lateral_present"] == ((64,),) * 3


def test_typing_mode_follows_the_tensorrt_release():
    trt10, _ = fake_trt(strong=True, weak=True)
    trt11, _ = fake_trt(strong=True, weak=False)
    old, _ = fake_trt(strong=False, weak=True)
    assert trt_backend.typing_mode(trt10) == "strong" and trt_backend.typing_mode(trt10, "weak") == "weak"
    assert trt_backend.typing_mode(trt11) == "strong" and trt_backend.typing_mode(old) == "weak"
    with pytest.raises(BuildError, match="no weak typing"):
        trt_backend.typing_mode(trt11, "weak")


def test_strongly_typed_build_sets_profiles_and_timing_cache(tmp_path):
    trt, rec = fake_trt(layers=[("node_layer_norm", "NORMALIZATION"), ("node_matmul", "MATRIX_MULTIPLY")])
    onnx = tmp_path / "text.onnx"
    onnx.write_bytes(b"x")
    plan, cache, info = trt_backend.build_plan(trt, onnx, TEXT_SPEC, [1, 8, 64], 48, "fp16", "strong", b"old", [])
    assert plan == b"PLAN" and cache == b"timing-cache" and rec["cache_in"] == b"old"
    assert rec["network_flags"] == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert [p["input_ids"][0][0] for p in rec["profiles"]] == [1, 8, 64]
    assert not rec["flags"] and not rec["pinned"], "strong typing takes its precision from the ONNX"
    assert info["typing"] == "strong"


def test_weakly_typed_build_pins_norms_and_softmax_to_float32(tmp_path):
    layers = [("node_layer_norm", "NORMALIZATION"), ("node_Softmax_3", "SOFTMAX"), ("node_matmul", "MATRIX_MULTIPLY"),
              ("node_linalg_vector_norm_output_0", "MATRIX_MULTIPLY")]
    trt, rec = fake_trt(layers=layers)
    onnx = tmp_path / "image.onnx"
    onnx.write_bytes(b"x")
    _, _, info = trt_backend.build_plan(trt, onnx, IMAGE_SPEC, [4], 48, "fp16", "weak", b"", ["node_linalg_vector_norm"])
    assert {trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS} <= rec["flags"]
    assert rec["pinned"] == ["node_layer_norm", "node_Softmax_3", "node_linalg_vector_norm_output_0"]
    assert info["fp32_pinned_layers"] == 3 and rec["network_flags"] == 0


def test_parser_errors_name_the_file(tmp_path):
    trt, _ = fake_trt(parse_ok=False)
    onnx = tmp_path / "image.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(BuildError, match="refused image.onnx: Unsupported ONNX data type"):
        trt_backend.build_plan(trt, onnx, IMAGE_SPEC, [1], 48, "fp8", "strong", b"", [])


def test_build_writes_onnx_plans_and_cache_with_a_stand_in(tmp_path, monkeypatch):
    """trt_backend.build end to end on the CPU: real ONNX export and passes, TensorRT faked."""
    for name in ("onnx", "onnxscript", "onnx_graphsurgeon"):
        pytest.importorskip(name, reason=f"{name} is not installed: pip install 'clinvla-engine[export]'")
    from clinvla_engine.export.context import BuildContext, Progress
    from clinvla_engine.export.testing import tiny_model

    trt, rec = fake_trt()
    monkeypatch.setattr(backends, "import_backend", lambda name, extra, feature: trt if name == "tensorrt"
                        else __import__(name))
    ctx = BuildContext(model=tiny_model(), device=torch.device("cpu"), precision="fp16", batch_sizes=[1, 4],
                       max_text_len=32, out=tmp_path, progress=Progress(False))
    part = trt_backend.build(ctx)
    for g in ("image", "text"):
        assert (tmp_path / f"{g}.plan").read_bytes() == b"PLAN" and (tmp_path / f"{g}.onnx").is_file()
        assert part["graphs"][g]["profiles"] == [1, 4]
    assert (tmp_path / trt_backend.TIMING_CACHE).read_bytes() == b"timing-cache"
    assert part["backend_details"]["typing"] == "strong"
    import onnx

    m = onnx.load(str(tmp_path / "image.onnx"))
    assert any(p.key == "clinvla.precision" and p.value == "fp16" for p in m.metadata_props)


# ---- the real thing --------------------------------------------------------------------------------
@pytest.mark.trt
@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "fp8"])
def test_tensorrt_engine_parity(tmp_path_factory, precision):
    from clinvla_engine.export.testing import bundle
    from clinvla_engine.runtime import Engine

    d = bundle(str(tmp_path_factory.getbasetemp() / "trt"), "tensorrt", "cuda", precision)
    m = json.loads((d / "manifest.json").read_text())
    assert m["parity"]["passed"], m["parity"]["failures"]
    assert {"image.plan", "text.plan", "trt_timing.cache"} <= set(m["files"])
    e = Engine.load(d)
    assert e.embed_texts(["small left pleural effusion"]).shape == (1, 32)
    assert not e.runner.notes, e.runner.notes


@pytest.mark.trt
@pytest.mark.gpu
@needs_trt
def test_tensorrt_plan_from_another_release_is_refused(tmp_path_factory, tmp_path):
    import shutil

    from clinvla_engine.export.testing import bundle
    from clinvla_engine.runtime import BundleError, Engine

    d = tmp_path / "b"
    shutil.copytree(bundle(str(tmp_path_factory.getbasetemp() / "trt"), "tensorrt", "cuda", "fp16"), d)
    m = json.loads((d / "manifest.json").read_text())
    m["versions"]["tensorrt"] = "9.0.0"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="built with tensorrt 9.0.0"):
        Engine.load(d)
