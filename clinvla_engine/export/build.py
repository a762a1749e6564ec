"""``build_engine``: checkpoint -> verified engine bundle (what ``clinvla-build-engine`` runs).

Stages: read the checkpoint (safetensors, or a .pt opened with weights_only=True) -> for each
backend to try: export/compile into a staging folder, write a provisional manifest, load it with
the runtime, check parity against PyTorch, time it -> keep the chosen one, write the final
manifest (parity figures, measurements, a SHA-256 per file), rename the folder into place, and
only then mark the manifest complete.

Crash safety. Everything is built inside a fresh hidden folder ``.<name>.building-<pid>-XXXX``
beside the target, and every file in it is written under a unique temporary name and renamed. A
build that is killed at any point leaves either no bundle at the target or one whose manifest is
not marked complete, which the runtime and ``clinvla engine inspect`` refuse; the next build of
the same target deletes working folders whose process is gone. (Replacing a bundle with --force
moves the old one aside first: a kill in that instant leaves no bundle, never a mixed one.)

Data. Parity is checked on the user's studies when ``parity_data`` (``--parity-data DIR``) is
given, else on a synthetic archive; FP8 calibration uses ``calibration`` (``--calibration DIR``),
else random inputs. The manifest records which (see ``studies``).

Int8 (openvino only) is calibrated on ``calibration`` too; where none is given it is calibrated on
a synthetic archive (never random tensors: NNCF's ranges must follow real studies and reports),
drawn with another seed than the parity archive so that the quality check does not grade the
calibration set. The int8 parity check also measures image->text P@10 against the fp32 reference
and refuses a drop beyond ``max_p10_change`` (see ``parity``).

``backend="auto"`` builds every candidate that can build here (tensorrt, aoti, onnxruntime,
compile on a GPU; aoti, onnxruntime and openvino on a CPU), measures image and text throughput at a
representative bucket, and keeps the fastest that passes parity; every candidate's measurements
(or why it could not be built) go into the manifest under ``build.candidates``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import backends
from ..model import load_checkpoint
from ..runtime.bundle import MANIFEST, STAGING_MARK, installed_versions, mark_complete, write_manifest
from ..files import atomic_write_text, sha256_file
from . import aoti_backend, compile_backend, openvino_backend, ort_backend, trt_backend
from .context import PRECISIONS as _TORCH_AND_TRT_PRECISIONS
from .context import BuildContext, BuildError, Progress
from .graphs import text_limit

BACKENDS = {m.NAME: m for m in (trt_backend, aoti_backend, ort_backend, compile_backend, openvino_backend)}
AUTO_ORDER = {"cuda": ("tensorrt", "aoti", "onnxruntime", "compile"), "cpu": ("aoti", "onnxruntime", "openvino")}
# int8 is NNCF post-training quantization, which only the openvino backend does; the other
# backends' unsupported() predate it, so the rule is kept here, once, for all of them.
PRECISIONS = (*_TORCH_AND_TRT_PRECISIONS, "int8")
INT8_BACKENDS = ("openvino",)
CALIBRATED = ("fp8", "int8")  # the precisions that take --calibration
DEFAULT_MAX_P10_CHANGE = 0.01
DEFAULT_BATCH_SIZES = (1, 8, 64, 256)


@dataclass
class BuildOptions:
    backend: str = "auto"  # auto | tensorrt | aoti | onnxruntime | compile | openvino
    device: str | None = None  # cuda | cpu; None = cuda when available
    precision: str = "fp32"  # fp32 | fp16 | bf16 | fp8 | int8 (openvino)
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    max_text_len: int = 128
    opset: int = 18
    parity_random: int = 16  # random studies/texts through the graphs
    parity_studies: int = 48  # studies through the public API (0 = none); of parity_data when given
    parity_data: Path | None = None  # a folder of the user's studies for parity (None = synthetic archive)
    calibration: Path | None = None  # fp8/int8: a folder of the user's studies to calibrate on (None = fp8:
    #   random inputs; int8: a synthetic archive)
    calibration_studies: int = 64  # fp8/int8: how many of the calibration folder's studies (0 = all)
    max_p10_change: float = DEFAULT_MAX_P10_CHANGE  # int8: largest image->text P@10 drop vs fp32 accepted
    strict: bool = True  # refuse a build whose parity fails
    force: bool = False  # replace an existing bundle at the output path
    keep_candidates: Path | None = None  # auto: keep every candidate's full bundle here
    progress: bool = True
    seed: int = 0
    extra: dict = field(default_factory=dict)  # aoti_constants, aoti_probe, trt_typing, trt_timing_cache
    # A dict shared by several builds (tests, benchmarks) so that a checkpoint's ONNX export is done
    # once: entries are keyed by the checkpoint's SHA-256, opset, largest bucket and token count.
    onnx_cache: dict | None = None


@dataclass
class BuildResult:
    path: Path
    manifest: dict
    report: str


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--batch-sizes must be comma-separated positive integers, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"--batch-sizes must be comma-separated positive integers, got {text!r}")
    return tuple(sizes)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if backends.cuda() else "cpu")
    d = torch.device(device)
    if d.type == "cuda":
        backends.require(backends.cuda(), "--device cuda")
    elif d.type != "cpu":
        raise ValueError(f"--device must be cuda or cpu, got {device!r}")
    return d


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise BuildError(f"output {out} exists and is not a folder")
        if any(out.iterdir()):
            if not (out / MANIFEST).is_file():
                raise BuildError(f"output {out} is a non-empty folder that is not an engine bundle; "
                                 "give a new or empty folder")
            if not force:
                raise BuildError(f"output {out} already holds an engine bundle; pass --force to replace it")


def _staging_prefix(out: Path) -> str:
    return f".{out.name}{STAGING_MARK}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process: not ours to judge
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Deletes the working folders of earlier builds of `out` whose process is gone (a kill leaves
    them); returns what it removed. A folder of a live process (a concurrent build) is left alone."""
    removed = []
    prefix = _staging_prefix(out)
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        if not (p.name.startswith(prefix) and p.is_dir()):
            continue
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _replace_dir(src: Path, dst: Path, aside: Path) -> None:
    """Moves folder `src` to `dst`; an existing `dst` is first renamed to `aside` (same file system:
    both are renames, never a copy), then deleted."""
    if dst.exists():
        os.replace(dst, aside)
    os.replace(src, dst)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)


def _common_files(ctx: BuildContext) -> dict:
    model = ctx.model
    atomic_write_text(ctx.out / "config.json", model.config.to_json())
    state = model.tokenizer.state()
    atomic_write_text(ctx.out / "tokenizer" / "vocab.txt", state["vocab"])
    atomic_write_text(ctx.out / "tokenizer" / "tokenizer_config.json",
                      json.dumps({"do_lower_case": state["lowercase"], "max_length": state["max_length"]}))
    return {"vocab": "tokenizer/vocab.txt", "config": "tokenizer/tokenizer_config.json",
            "lowercase": state["lowercase"], "max_length": state["max_length"]}


def _measure(engine, model, batch: int, repeats: int = 5) -> dict:
    """Median ms per call of each graph at one bucket, and the resulting items/s."""
    from .graphs import example_inputs

    names = {g: [t["name"] for t in engine.manifest["graphs"][g]["inputs"]] for g in ("image", "text")}
    result = {"batch": batch}
    for graph in ("image", "text"):
        feeds = dict(zip(names[graph], example_inputs(model, graph, batch=batch, max_tokens=engine.max_text_len)))
        times = []
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            engine.run_graph(graph, feeds)
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
        med = statistics.median(times)
        result[f"{graph}_ms"] = round(med, 3)
        result[f"{graph}_per_s"] = round(batch / med * 1e3, 1)
    result["score_ms"] = round(result["image_ms"] + result["text_ms"], 3)
    return result


def build_backend(model, name: str, out: Path, device: torch.device, opts: BuildOptions, progress: Progress,
                  onnx_cache: dict, checkpoint_info: dict, data: dict | None = None) -> BuildResult:
    """Builds one backend's bundle in `out` (created), checks parity; returns the result (its
    manifest is not marked complete: only build_engine does that, at the final path).

    data: {"parity": (studies, record) | None, "calibration": (studies, record) | None}."""
    from ..runtime import Engine
    from .parity import check_parity, format_report

    module = BACKENDS[name]
    why = unsupported(name, device.type, opts.precision)
    if why:
        raise BuildError(f"--backend {name} cannot build {opts.precision} on {device.type} here: {why}")
    out.mkdir(parents=True, exist_ok=True)
    data = data or {}
    calibration = data.get("calibration")
    ctx = BuildContext(model=model, device=device, precision=opts.precision, batch_sizes=list(opts.batch_sizes),
                       max_text_len=opts.max_text_len, out=out, progress=progress, opset=opts.opset,
                       options=dict(opts.extra), onnx_cache=onnx_cache,
                       calibration=calibration[0] if calibration else None)
    t0 = time.perf_counter()
    tokenizer = _common_files(ctx)
    part = module.build(ctx)
    manifest = {
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "backend": name,
        "device": device.type,
        "precision": opts.precision,
        "batch_sizes": sorted(opts.batch_sizes),
        "max_text_len": ctx.tokens,
        "max_text_len_asked": opts.max_text_len,
        "opset": opts.opset,
        "patches": model.visual.num_patches,
        "config": model.config.to_dict(),
        "tokenizer": tokenizer,
        "checkpoint": checkpoint_info,
        "graphs": part["graphs"],
        "backend_details": part.get("backend_details", {}),
        "versions": installed_versions(),
        "build": {"seconds": None, "stages": None},
    }
    if "aoti" in part:
        manifest["aoti"] = part["aoti"]
    if opts.precision in CALIBRATED:
        manifest["calibration"] = calibration[1] if calibration else {"source": "random", "samples": 8}
    write_manifest(out, manifest)
    with progress.stage(f"load the {name} engine and check parity against PyTorch") as st:
        engine = Engine.load(out, device=device, verify=True, staging=True)
        parity = check_parity(model, engine, opts.precision, random=opts.parity_random, studies=opts.parity_studies,
                              seed=opts.seed, workdir=out.parent, user_studies=data.get("parity"),
                              max_p10_change=opts.max_p10_change)
        s = parity["summary"]
        st["note"] = (f"cos min {s['cos_min']:.6f}, max abs {s['max_abs']:.2e}"
                      + (f", top-10 overlap {s['top10_overlap']:.3f}" if "top10_overlap" in s else "")
                      + ("" if parity["passed"] else " FAILED"))
    with progress.stage(f"time the {name} engine") as st:
        batch = _measure_batch(opts.batch_sizes, device)
        measured = _measure(engine, model, batch)
        st["note"] = (f"batch {batch}: image {measured['image_ms']:.2f} ms ({measured['image_per_s']:.0f}/s), "
                      f"text {measured['text_ms']:.2f} ms ({measured['text_per_s']:.0f}/s)")
    notes = engine.runner.describe()["notes"]
    engine.close()
    manifest["parity"] = parity
    manifest["build"] = {"seconds": round(time.perf_counter() - t0, 1), "measured": measured, "runner_notes": notes}
    write_manifest(out, manifest)
    return BuildResult(out, manifest, format_report(parity, f"{name} {device.type} {opts.precision} vs PyTorch eager fp32"))


def _measure_batch(batch_sizes, device) -> int:
    target = 64 if device.type == "cuda" else 8
    fitting = [b for b in batch_sizes if b <= target]
    return max(fitting) if fitting else min(batch_sizes)


def build_engine(checkpoint: str | os.PathLike, out: str | os.PathLike, options: BuildOptions | None = None,
                 **kwargs) -> BuildResult:
    """Builds an engine bundle from a ClinVLA checkpoint; see the module docstring."""
    opts = options or BuildOptions()
    for k, v in kwargs.items():
        if not hasattr(opts, k):
            raise TypeError(f"build_engine() got an unknown option {k!r}")
        setattr(opts, k, v)
    if opts.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {opts.precision!r}")
    if opts.backend != "auto" and opts.backend not in BACKENDS:
        raise ValueError(f"--backend must be auto or one of {', '.join(BACKENDS)}, got {opts.backend!r}")
    opts.batch_sizes = parse_batch_sizes(",".join(str(b) for b in opts.batch_sizes))
    if opts.max_text_len < 3:
        raise ValueError(f"--max-text-len must be at least 3 ([CLS] word [SEP]), got {opts.max_text_len}")
    if opts.calibration is not None and opts.precision not in CALIBRATED:
        raise ValueError(f"--calibration applies to --precision fp8 or int8 only (the calibrated precisions), "
                         f"not {opts.precision}; drop it or build fp8 (tensorrt) or int8 (openvino)")
    if opts.backend not in ("auto", *INT8_BACKENDS) and opts.precision == "int8":
        raise ValueError(f"--precision int8 is built by --backend {' or '.join(INT8_BACKENDS)} (NNCF), not "
                         f"{opts.backend}; pass --backend openvino or auto")
    if not (isinstance(opts.max_p10_change, (int, float)) and 0 <= opts.max_p10_change <= 1):
        raise ValueError(f"--max-p10-change must be a number in 0..1 (a P@10 drop), got {opts.max_p10_change!r}")
    if opts.parity_data is not None and opts.parity_studies < 1:
        raise ValueError("--parity-studies 0 turns the study check off, so --parity-data would not be used; "
                         "give a count (default 48) or drop --parity-data")
    out = Path(out)
    _prepare_out(out, opts.force)
    device = resolve_device(opts.device)
    progress = Progress(opts.progress)
    t0 = time.perf_counter()
    with progress.stage(f"read checkpoint {checkpoint}") as st:
        model = load_checkpoint(checkpoint).float().eval()
        from ..model.checkpoint import _resolve

        ck = _resolve(Path(checkpoint))
        checkpoint_info = {"path": str(ck), "sha256": sha256_file(ck), "name": model.config.name}
        st["note"] = (f"{model.config.name}: {model.config.vision.image_size}px, {model.config.vision.num_views} views, "
                      f"text <= {text_limit(model, opts.max_text_len)} tokens")
    data = _user_data(opts, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_staging(out):
        progress.say(f"removed {stale.name}, left by a build of {out.name} that did not finish")
    work = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=out.parent))
    staging = work / "bundle"
    onnx_cache: dict = {}
    if opts.onnx_cache is not None:
        key = (checkpoint_info["sha256"], opts.opset, max(opts.batch_sizes), text_limit(model, opts.max_text_len))
        onnx_cache = opts.onnx_cache.setdefault(key, {})
    try:
        if opts.precision == "int8" and data["calibration"] is None and not unsupported("openvino", device.type, "int8"):
            # (where openvino cannot build int8, the build below says why; no archive is drawn for it)
            data["calibration"] = _synthetic_calibration(model, work, opts, progress)
        if opts.backend == "auto":
            result = _auto(model, work, device, opts, progress, onnx_cache, checkpoint_info, data)
        else:
            result = build_backend(model, opts.backend, staging, device, opts, progress, onnx_cache, checkpoint_info,
                                   data)
        manifest = result.manifest
        manifest["build"]["total_seconds"] = round(time.perf_counter() - t0, 1)
        manifest["build"]["stages"] = progress.log
        manifest["build"]["options"] = {"backend": opts.backend, "device": device.type, "precision": opts.precision,
                                        "batch_sizes": list(opts.batch_sizes), "max_text_len": opts.max_text_len}
        write_manifest(staging, manifest)
        if opts.strict and not manifest["parity"]["passed"]:
            raise BuildError(f"the {manifest['backend']} engine failed the parity check:\n{result.report}\n"
                             "(pass --no-strict to keep it anyway)")
        _replace_dir(staging, out, work / "replaced")
        mark_complete(out, manifest)  # the last step: until here, whatever is at `out` is refused
    finally:
        shutil.rmtree(work, ignore_errors=True)
    progress.say(f"engine bundle written to {out} ({manifest['backend']}, {device.type}, {opts.precision}) "
                 f"in {time.perf_counter() - t0:.0f} s")
    return BuildResult(out, manifest, result.report)


def _user_data(opts: BuildOptions, progress: Progress) -> dict:
    """The user's studies for parity and calibration, read once before any backend is built."""
    from .studies import open_user_studies

    data = {"parity": None, "calibration": None}
    if opts.parity_data is not None:
        with progress.stage(f"read the parity studies in {opts.parity_data}") as st:
            data["parity"] = open_user_studies(opts.parity_data, opts.parity_studies, "--parity-data")
            st["note"] = f"{data['parity'][1]['studies']} {data['parity'][1]['format']} studies"
    if opts.calibration is not None:
        with progress.stage(f"read the calibration studies in {opts.calibration}") as st:
            data["calibration"] = open_user_studies(opts.calibration, opts.calibration_studies, "--calibration")
            st["note"] = f"{data['calibration'][1]['studies']} {data['calibration'][1]['format']} studies"
    return data


def unsupported(name: str, device: str, precision: str) -> str | None:
    """Why backend `name` cannot build (device, precision) here, or None when it can."""
    if precision == "int8" and name not in INT8_BACKENDS:
        return f"int8 (NNCF post-training quantization) is built by {' or '.join(INT8_BACKENDS)} only"
    return BACKENDS[name].unsupported(device, precision)


CALIBRATION_SEED_OFFSET = 1000  # the synthetic calibration archive never repeats the parity one's seed


def _synthetic_calibration(model, work: Path, opts: BuildOptions, progress: Progress) -> tuple[list, dict]:
    """(studies, record) of a synthetic archive to calibrate int8 on when the user gave none; it
    lives in the build's working folder (deleted with it)."""
    from ..data import open_dataset
    from ..data.synth import generate_archive

    n = opts.calibration_studies if opts.calibration_studies > 0 else 64
    seed = opts.seed + CALIBRATION_SEED_OFFSET
    with progress.stage(f"generate {n} synthetic studies to calibrate int8 on (no --calibration given)") as st:
        root = work / "calibration-archive"
        generate_archive(root, n, seed, fmt="mimic", size=max(64, model.config.vision.image_size), progress=False)
        studies = list(open_dataset(root))
        st["note"] = f"{len(studies)} studies; give --calibration DIR to calibrate on your own"
    return studies, {"source": "synthetic", "studies": len(studies), "seed": seed, "format": "mimic"}


def _auto(model, work: Path, device, opts: BuildOptions, progress: Progress, onnx_cache, checkpoint_info, data):
    candidates = {}
    best = None
    root = work / "candidates"
    staging = work / "bundle"
    for name in AUTO_ORDER[device.type]:
        why = unsupported(name, device.type, opts.precision)
        if why:
            candidates[name] = {"built": False, "why": why}
            progress.say(f"auto: skipping {name}: {why}")
            continue
        progress.say(f"auto: building candidate {name}")
        try:
            res = build_backend(model, name, root / name, device, opts, progress, onnx_cache, checkpoint_info, data)
        except Exception as exc:  # a candidate that fails is recorded, not fatal
            candidates[name] = {"built": False, "why": f"{type(exc).__name__}: {str(exc)[:600]}"}
            progress.say(f"auto: {name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        m = res.manifest
        candidates[name] = {"built": True, "parity_passed": m["parity"]["passed"], "parity": m["parity"]["summary"],
                            "measured": m["build"]["measured"], "build_seconds": m["build"]["seconds"]}
        if m["parity"]["passed"] and (best is None or m["build"]["measured"]["score_ms"] < best.manifest["build"]["measured"]["score_ms"]):
            best = res
    if best is None:
        raise BuildError("auto: no backend built an engine that passes parity here: "
                         + "; ".join(f"{k}: {v.get('why') or 'parity failed'}" for k, v in candidates.items()))
    chosen = best.manifest["backend"]
    progress.say("auto: measured " + ", ".join(
        f"{k} {v['measured']['score_ms']:.2f} ms" for k, v in candidates.items() if v.get("built"))
        + f" -> {chosen}")
    best.manifest["build"]["candidates"] = candidates
    best.manifest["build"]["chosen"] = chosen
    if opts.keep_candidates:
        _keep_candidates(root, [n for n, v in candidates.items() if v.get("built")], chosen,
                         Path(opts.keep_candidates))
    os.replace(root / chosen, staging)
    return BuildResult(staging, best.manifest, best.report)


def _keep_candidates(root: Path, names: list[str], chosen: str, keep: Path) -> None:
    """Each built candidate into keep/NAME as a complete bundle of its own (the chosen one copied,
    the others moved); each is renamed into place before it is marked complete, like the result."""
    keep.mkdir(parents=True, exist_ok=True)
    for name in names:
        manifest = json.loads((root / name / MANIFEST).read_text())
        aside = Path(tempfile.mkdtemp(prefix=f".{name}{STAGING_MARK}{os.getpid()}-", dir=keep))
        try:
            # into `keep`'s file system first (a copy or cross-device move), then renames only
            if name == chosen:
                shutil.copytree(root / name, aside / "new")
            else:
                shutil.move(str(root / name), str(aside / "new"))
            _replace_dir(aside / "new", keep / name, aside / "replaced")
            mark_complete(keep / name, manifest)
        finally:
            shutil.rmtree(aside, ignore_errors=True)
