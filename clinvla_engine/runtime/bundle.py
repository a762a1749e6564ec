"""The engine bundle on disk: a directory with ``manifest.json`` and exactly the files it lists.

Layout (which engine files are present depends on the backend)::

    ENGINE_DIR/
      manifest.json          what was built, from what, with what; a SHA-256 for every file below
      config.json            the model config (also inside the manifest)
      tokenizer/vocab.txt    the WordPiece vocabulary the text graph was built for
      tokenizer/tokenizer_config.json
      image.onnx text.onnx   cleaned ONNX graphs (onnxruntime, tensorrt)
      image.plan text.plan   serialized TensorRT engines, plus trt_timing.cache
      image.pt2  text.pt2    AOTInductor packages (+ image.constants.safetensors ... when the
                             constants are kept outside the shared object)
      weights.safetensors    the encoders' weights (compile backend: torch.compile at load time)
      image.xml  image.bin   OpenVINO IR (openvino): the graph and its weights, fp32 or NNCF int8
      text.xml   text.bin

Loading checks, in order; the first failure raises ``BundleError`` naming the file, field or
version and the fix:

1. ``manifest.json`` is JSON of the right shape (``validate_manifest``: format and version, the
   ``complete`` mark, backend / device / precision and their combination, batch sizes, text
   length, config, tokenizer, both graphs' files and I/O specs, the file list);
2. the bundle is complete: the builder marks it so only after it was renamed into place, so a
   killed or failed ``clinvla-build-engine`` never leaves something that loads;
3. every version the backend depends on matches this machine;
4. the folder holds exactly the listed files (an unlisted file, e.g. a vocabulary whose manifest
   entry was removed, or a link, is refused) and each has its recorded size and SHA-256.

The hashes protect against corruption and mix-ups (a file from another build), not against
someone who rewrites the manifest too: a bundle is not signed.
"""
from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

from ..files import TMP_MARK, atomic_write_text, sha256_file

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "clinvla-engine-bundle"
# 2: the manifest carries "complete" and lists every file of the folder (version 1 did neither).
BUNDLE_FORMAT_VERSION = 2
# The builder works in ".<name>.building-<pid>-XXXX" next to the target; nothing in there is a bundle.
STAGING_MARK = ".building-"

# Where a version mismatch makes a bundle unusable, and how strictly it must match:
# "exact" = the same release string; "minor" = the same major.minor.
VERSION_RULES = {
    "clinvla_engine": "exact",  # the preprocessing and tokenisation the parity figures were measured with
    "torch": "exact",  # AOTInductor packages link libtorch; compile bundles rebuild the model with it
    "onnxruntime": "minor",  # the graph optimisations and operator set of the ORT that was measured
    "tensorrt": "exact",  # serialized plans only deserialize in the TensorRT release that built them
    "openvino": "minor",  # the CPU plugin's kernels and precision handling that parity was measured with
}
BACKEND_DEPENDS = {
    "onnxruntime": ("clinvla_engine", "onnxruntime"),
    "aoti": ("clinvla_engine", "torch"),
    "tensorrt": ("clinvla_engine", "tensorrt"),
    "compile": ("clinvla_engine", "torch"),
    "openvino": ("clinvla_engine", "openvino"),
}
# What each backend can hold: the devices, precisions and graph file suffix it builds. A manifest
# outside these was edited by hand (or by a builder this runtime does not know).
BACKEND_RULES = {
    "onnxruntime": {"devices": ("cpu", "cuda"), "precisions": ("fp32", "fp16"), "suffix": ".onnx"},
    "aoti": {"devices": ("cpu", "cuda"), "precisions": ("fp32", "fp16", "bf16"), "suffix": ".pt2"},
    "tensorrt": {"devices": ("cuda",), "precisions": ("fp32", "fp16", "bf16", "fp8"), "suffix": ".plan"},
    "compile": {"devices": ("cpu", "cuda"), "precisions": ("fp32", "fp16", "bf16"), "suffix": ".safetensors"},
    "openvino": {"devices": ("cpu",), "precisions": ("fp32", "bf16", "int8"), "suffix": ".xml"},
}
# OpenVINO: the INFERENCE_PRECISION_HINT the runtime sets for each bundle precision. Anything else
# (e.g. an fp32 bundle run in bf16, OpenVINO's default on a bf16 CPU) is not what parity measured.
OPENVINO_INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
GRAPH_IO = {
    "image": {"inputs": {1: ["frontal"], 2: ["frontal", "lateral", "lateral_present"]},
              "outputs": ["image_emb", "regions"]},
    "text": {"inputs": {1: ["input_ids", "attention_mask"], 2: ["input_ids", "attention_mask"]},
             "outputs": ["text_emb", "words"]},
}
SPEC_DTYPE_NAMES = ("float32", "int64")
# Generous sanity limits: a manifest beyond them is damaged, not ambitious. Batch buckets above
# 65,536 images would need > 10 GB of input per call; texts above 65,536 tokens have no model.
MAX_BATCH = 65536
MAX_TEXT_LEN = 65536
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(RuntimeError):
    """An engine bundle that cannot be used; the message names the file or version and the fix."""


def installed_versions() -> dict[str, str | None]:
    """The versions of everything a bundle may depend on, as installed here (None = not installed)."""
    from .. import __version__

    out: dict[str, str | None] = {"clinvla_engine": __version__, "python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
    except ImportError:  # pragma: no cover - torch is a hard dependency
        out["torch"] = None
    for name in ("onnx", "onnxruntime", "tensorrt", "onnx_graphsurgeon", "openvino"):
        out[name] = _module_version(name)
    return out


def _module_version(name: str) -> str | None:
    from .. import backends

    extra = {"tensorrt": "trt", "openvino": "openvino"}.get(name, "export")
    avail = backends.module(name, extra)
    return avail.why if avail else None


def _same(rule: str, built: str, here: str) -> bool:
    if rule == "exact":
        return built == here
    return built.split(".")[:2] == here.split(".")[:2]


def check_versions(manifest: dict[str, Any], where: Path, installed: dict[str, str | None] | None = None) -> None:
    """Refuses a bundle whose backend depends on a version that differs here (BundleError)."""
    installed = installed or installed_versions()
    built = manifest.get("versions", {})
    for name in BACKEND_DEPENDS.get(manifest.get("backend", ""), ("clinvla_engine",)):
        want, have = built.get(name), installed.get(name)
        if want is None:
            raise BundleError(f"engine bundle {where}: manifest.json does not record the {name} version it was built with")
        if have is None:
            raise BundleError(
                f"engine bundle {where} was built with {name} {want}, which is not installed here; "
                f"install {name}=={want} or rebuild the engine with clinvla-build-engine"
            )
        if not _same(VERSION_RULES[name], want, have):
            raise BundleError(
                f"engine bundle {where} was built with {name} {want} but this machine has {name} {have}; "
                f"rebuild the engine here with clinvla-build-engine (or install {name}=={want})"
            )


# ---- the manifest's shape ------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def safe_relative_name(name: Any) -> bool:
    """A file name a manifest may list: relative, '/'-separated, inside the bundle, not the manifest."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name or name.startswith("/"):
        return False
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts) and name != MANIFEST


def validate_manifest(manifest: Any, where: Path) -> dict[str, Any]:
    """Checks every field the runtime reads; raises BundleError naming the first bad field."""

    def bad(field: str, want: str, got: Any = ...) -> BundleError:
        shown = "" if got is ... else f", got {json.dumps(got, default=str)[:120]}"
        return BundleError(f"engine bundle {where}: {MANIFEST} field {field} must be {want}{shown}; the manifest was "
                           "edited or damaged after the build: rebuild the engine with clinvla-build-engine")

    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"engine bundle {where}: {MANIFEST} is not a ClinVLA engine manifest "
                          f"(no \"format\": \"{BUNDLE_FORMAT}\"); build one with clinvla-build-engine")
    version = manifest.get("format_version")
    if not _is_int(version):
        raise bad("format_version", "an integer", version)
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(f"engine bundle {where} has format_version {version}, newer than this clinvla-engine "
                          f"understands ({BUNDLE_FORMAT_VERSION}); upgrade clinvla-engine")
    if version < BUNDLE_FORMAT_VERSION:
        raise BundleError(f"engine bundle {where} has format_version {version}, written by an older "
                          "clinvla-build-engine that did not list every file; rebuild the engine with --force")
    # files first: the other checks refer to it
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("files", "a non-empty object of file name -> {bytes, sha256}", files)
    for name, entry in files.items():
        if not safe_relative_name(name):
            raise BundleError(f"engine bundle {where}: {MANIFEST} lists the file {name!r}, which is not a plain "
                              "relative path inside the bundle; the manifest was edited: rebuild the engine")
        if not isinstance(entry, dict) or not _is_int(entry.get("bytes")) or entry["bytes"] < 0 \
                or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
            raise bad(f"files[{name!r}]", "{\"bytes\": a size >= 0, \"sha256\": 64 lowercase hex digits}", entry)
    backend = manifest.get("backend")
    if backend not in BACKEND_RULES:
        raise bad("backend", f"one of {', '.join(BACKEND_RULES)}", backend)
    rules = BACKEND_RULES[backend]
    if manifest.get("device") not in rules["devices"]:
        raise bad("device", f"{' or '.join(rules['devices'])} for a {backend} bundle", manifest.get("device"))
    if manifest.get("precision") not in rules["precisions"]:
        raise bad("precision", f"one of {', '.join(rules['precisions'])} for a {backend} bundle",
                  manifest.get("precision"))
    sizes = manifest.get("batch_sizes")
    if not (isinstance(sizes, list) and sizes and all(_is_int(b) and 1 <= b <= MAX_BATCH for b in sizes)
            and sizes == sorted(set(sizes))):
        raise bad("batch_sizes", f"a non-empty increasing list of distinct integers in 1..{MAX_BATCH}", sizes)
    tokens = manifest.get("max_text_len")
    if not (_is_int(tokens) and 3 <= tokens <= MAX_TEXT_LEN):
        raise bad("max_text_len", f"an integer in 3..{MAX_TEXT_LEN}", tokens)
    cfg = manifest.get("config")
    vision = cfg.get("vision") if isinstance(cfg, dict) else None
    if not isinstance(vision, dict):
        raise bad("config.vision", "an object (the model config)", vision)
    for key in ("image_size", "patch_size"):
        if not (_is_int(vision.get(key)) and vision[key] >= 1):
            raise bad(f"config.vision.{key}", "a positive integer", vision.get(key))
    if vision.get("num_views") not in (1, 2) or isinstance(vision.get("num_views"), bool):
        raise bad("config.vision.num_views", "1 or 2", vision.get("num_views"))
    if not _is_number(vision.get("pixel_mean")):
        raise bad("config.vision.pixel_mean", "a number", vision.get("pixel_mean"))
    if not (_is_number(vision.get("pixel_std")) and vision["pixel_std"] > 0):
        raise bad("config.vision.pixel_std", "a positive number", vision.get("pixel_std"))
    if not (_is_int(cfg.get("embed_dim")) and cfg["embed_dim"] >= 1):
        raise bad("config.embed_dim", "a positive integer", cfg.get("embed_dim"))
    if "patches" in manifest and not (_is_int(manifest["patches"]) and manifest["patches"] >= 1):
        raise bad("patches", "a positive integer", manifest["patches"])
    tok = manifest.get("tokenizer")
    if not (isinstance(tok, dict) and tok.get("vocab") in files):
        raise bad("tokenizer.vocab", "the name of a listed file (the vocabulary)", (tok or {}).get("vocab")
                  if isinstance(tok, dict) else tok)
    if not isinstance(tok.get("lowercase", True), bool) or not (_is_int(tok.get("max_length", 3))
                                                                and tok.get("max_length", 3) >= 3):
        raise bad("tokenizer", "{lowercase: true/false, max_length: an integer >= 3}", tok)
    graphs = manifest.get("graphs")
    if not (isinstance(graphs, dict) and set(graphs) == set(GRAPH_IO)):
        raise bad("graphs", "an object with exactly the graphs \"image\" and \"text\"",
                  sorted(graphs) if isinstance(graphs, dict) else graphs)
    for gname, g in graphs.items():
        if not isinstance(g, dict):
            raise bad(f"graphs.{gname}", "an object", g)
        file = g.get("file")
        if file not in files or not str(file).endswith(rules["suffix"]):
            raise bad(f"graphs.{gname}.file", f"a listed {rules['suffix']} file (a {backend} bundle)", file)
        for extra in ("constants", "onnx", "weights"):
            if extra in g and g[extra] not in files:
                raise bad(f"graphs.{gname}.{extra}", "the name of a listed file", g[extra])
        if backend == "openvino" and not (g.get("weights") in files and str(g["weights"]).endswith(".bin")):
            raise bad(f"graphs.{gname}.weights", "a listed .bin file (the OpenVINO IR's weights)", g.get("weights"))
        for side in ("inputs", "outputs"):
            specs = g.get(side)
            io = GRAPH_IO[gname][side]
            want_names = io[vision["num_views"]] if side == "inputs" else io
            if not (isinstance(specs, list) and all(isinstance(t, dict) for t in specs)
                    and [t.get("name") for t in specs] == want_names):
                raise bad(f"graphs.{gname}.{side}", f"the tensors {want_names} of a "
                          f"{vision['num_views']}-view model", specs)
            for t in specs:
                shape = t.get("shape")
                if t.get("dtype") not in SPEC_DTYPE_NAMES or not (
                        isinstance(shape, list) and shape and shape[0] == "batch"
                        and all(isinstance(d, str) or (_is_int(d) and d >= 1) for d in shape)):
                    raise bad(f"graphs.{gname}.{side}[{t['name']}]", "{dtype: float32|int64, shape: [\"batch\", "
                              "sizes or dimension names ...]}", t)
        if backend == "tensorrt" and g.get("profiles") != sizes:
            raise bad(f"graphs.{gname}.profiles", f"the batch sizes {sizes} (one TensorRT profile each)",
                      g.get("profiles"))
    if backend == "openvino":
        details = manifest.get("backend_details")
        want = OPENVINO_INFERENCE_PRECISION[manifest["precision"]]
        got = details.get("inference_precision") if isinstance(details, dict) else details
        if got != want:
            raise bad("backend_details.inference_precision", f"\"{want}\" for a {manifest['precision']} openvino "
                      "bundle", got)
    return manifest


_STAGING_NAME = re.compile(r"^\..+" + re.escape(STAGING_MARK) + r"\d+-")


def staging_hint(directory: Path) -> str:
    """A sentence when `directory` is (inside) a builder's working folder, else ''."""
    if any(_STAGING_NAME.match(part) for part in directory.resolve().parts):
        return (f" {directory} is in the working folder of a clinvla-build-engine run that did not finish (killed "
                "or failed); delete it and build again")
    return ""


def read_manifest(directory: str | os.PathLike, *, allow_incomplete: bool = False) -> tuple[Path, dict[str, Any]]:
    """(directory, manifest) after checks 1 and 2 of the module docstring. allow_incomplete is for
    the builder's own check of a bundle it is still writing; never for deployment."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise BundleError(f"engine bundle {directory}: no such directory")
    if not path.is_file():
        raise BundleError(f"engine bundle {directory} has no {MANIFEST}; build one with clinvla-build-engine"
                          + staging_hint(directory))
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"engine bundle {directory}: {MANIFEST} is not valid UTF-8 JSON "
                          f"({str(exc)[:160]}); rebuild the engine with clinvla-build-engine") from None
    except OSError as exc:
        raise BundleError(f"engine bundle {directory}: cannot read {MANIFEST}: {exc}") from None
    validate_manifest(manifest, directory)
    hint = staging_hint(directory)
    if hint and not allow_incomplete:
        # Even a manifest marked complete: a finished build renames its bundle out of there.
        raise BundleError(f"engine bundle {directory} is not a finished bundle." + hint)
    if manifest.get("complete") is not True and not allow_incomplete:
        raise BundleError(f"engine bundle {directory} is incomplete: the build that wrote it did not finish "
                          "(killed, or failed after moving it into place). Rebuild it with clinvla-build-engine "
                          "--force")
    return directory, manifest


def bundle_files(directory: Path) -> tuple[list[str], list[str]]:
    """(every regular file under `directory` except the manifest, as '/'-separated relative names;
    every entry that is neither a folder nor a regular file, e.g. a symbolic link)."""
    files, odd = [], []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_symlink() or not (p.is_dir() or p.is_file()):
            odd.append(rel)
        elif p.is_file() and rel != MANIFEST:
            files.append(rel)
    return files, odd


def file_status(directory: Path, manifest: dict[str, Any], hash_files: bool = True) -> dict[str, str]:
    """name -> "ok" | "not checked" | "MISSING" | "CHANGED" | "UNLISTED" | "LINK" for every listed
    file and every file the folder holds (``inspect`` shows this; ``verify_files`` refuses on it)."""
    listed = manifest["files"]
    present, odd = bundle_files(directory)
    status = {}
    for name in sorted(set(listed) | set(present) | set(odd)):
        path = directory / name
        if name in odd:
            status[name] = "LINK"
        elif name not in listed:
            status[name] = "UNLISTED"
        elif name not in present:
            status[name] = "MISSING"
        elif path.stat().st_size != listed[name]["bytes"]:
            status[name] = "CHANGED"
        elif not hash_files:
            status[name] = "not checked"
        else:
            status[name] = "ok" if sha256_file(path) == listed[name]["sha256"] else "CHANGED"
    return status


def verify_files(directory: Path, manifest: dict[str, Any], hash_files: bool = True) -> None:
    """The folder holds exactly the listed files, each with its recorded size and (hash_files) SHA-256."""
    why = {
        "LINK": "is a link or special file; a bundle holds plain files only",
        "UNLISTED": "is not listed in manifest.json (added after the build, or its entry was removed)",
        "MISSING": "is listed in manifest.json but missing",
        "CHANGED": "does not match its size and SHA-256 in manifest.json (changed or truncated after the build)",
    }
    for name, state in file_status(directory, manifest, hash_files=hash_files).items():
        if state in why:
            hint = " (left by an interrupted write)" if TMP_MARK in name else ""
            raise BundleError(f"engine bundle {directory}: {name} {why[state]}{hint}; rebuild the engine with "
                              "clinvla-build-engine (or restore the bundle as it was built)")


def load_bundle(directory: str | os.PathLike, verify: bool = True, *,
                allow_incomplete: bool = False) -> tuple[Path, dict[str, Any]]:
    """(directory, manifest) after the shape, completeness, version and file checks.

    verify=False skips hashing (sizes and the file list are still checked)."""
    directory, manifest = read_manifest(directory, allow_incomplete=allow_incomplete)
    check_versions(manifest, directory)
    verify_files(directory, manifest, hash_files=verify)
    return directory, manifest


def write_manifest(directory: Path, manifest: dict[str, Any], *, complete: bool = False) -> Path:
    """Lists (and hashes) every file under `directory` except the manifest into `manifest` (updated
    in place), then writes it atomically. The builder passes complete=True only once the bundle
    is at its final path (see ``mark_complete``)."""
    names, odd = bundle_files(directory)
    if odd:
        raise BundleError(f"engine bundle {directory}: {odd[0]} is a link or special file; the builder writes "
                          "plain files only")
    manifest["format"] = BUNDLE_FORMAT
    manifest["format_version"] = BUNDLE_FORMAT_VERSION
    manifest["files"] = {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)}
                         for n in names}
    manifest["complete"] = bool(complete)
    path = directory / MANIFEST
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return path


def mark_complete(directory: Path, manifest: dict[str, Any]) -> None:
    """Rewrites the manifest (same file list) with "complete": true: the last step of a build."""
    manifest["complete"] = True
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str))


# ---- what the bundle holds, rebuilt ----------------------------------------------------------------
def bundle_tokenizer(directory: Path, manifest: dict):
    """The bundle's WordPiece tokenizer (its vocabulary file was verified with the rest)."""
    from ..model.text import Tokenizer

    tok = manifest["tokenizer"]
    vocab = directory / tok["vocab"]
    if not vocab.is_file():
        raise BundleError(f"engine bundle {directory}: tokenizer vocabulary {tok['vocab']} is missing")
    return Tokenizer(vocab.read_text(encoding="utf-8"), bool(tok.get("lowercase", True)),
                     int(tok.get("max_length", manifest["max_text_len"])))


def model_from_bundle(directory: Path, manifest: dict):
    """The PyTorch model rebuilt from a bundle's weights.safetensors (compile backend)."""
    from safetensors.torch import load_file

    from ..config import ClinVLAConfig
    from ..model import ClinVLA

    config = ClinVLAConfig.from_dict(manifest["config"], where=f"engine bundle {directory}")
    model = ClinVLA(config, pretrained=False, tokenizer=bundle_tokenizer(directory, manifest))
    state = load_file(str(directory / manifest["graphs"]["image"]["file"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("decoder.")] or unexpected:
        raise BundleError(f"engine bundle {directory}: weights.safetensors does not fit its config "
                          f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    return model.eval()
