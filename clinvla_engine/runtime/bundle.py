"""The engine bundle on disk: a directory with ``manifest.json`` and the files it lists.

Layout (which engine files are present depends on the backend)::

    ENGINE_DIR/
      manifest.json          what was built, from what, with what; a SHA-256 for every file below
      config.json            the model config (also inside the manifest)
      tokenizer/vocab.txt    the WordPiece vocabulary the text graph was built for
      image.onnx text.onnx   cleaned ONNX graphs (onnxruntime, tensorrt)
      image.plan text.plan   serialized TensorRT engines, plus trt_timing.cache
      image.pt2  text.pt2    AOTInductor packages (+ image.constants.safetensors ... when the
                             constants are kept outside the shared object)
      weights.safetensors    the encoders' weights (compile backend: torch.compile at load time)

Loading checks, in order: the manifest's format, every version the backend depends on, then the
SHA-256 of every listed file; the first failure raises ``BundleError`` naming the file or version.
The hashes protect against corruption and mix-ups (a file from another build), not against
someone who rewrites the manifest too: a bundle is not signed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "clinvla-engine-bundle"
BUNDLE_FORMAT_VERSION = 1

# Where a version mismatch makes a bundle unusable, and how strictly it must match:
# "exact" = the same release string; "minor" = the same major.minor.
VERSION_RULES = {
    "clinvla_engine": "exact",  # the preprocessing and tokenisation the parity figures were measured with
    "torch": "exact",  # AOTInductor packages link libtorch; compile bundles rebuild the model with it
    "onnxruntime": "minor",  # the graph optimisations and operator set of the ORT that was measured
    "tensorrt": "exact",  # serialized plans only deserialize in the TensorRT release that built them
}
BACKEND_DEPENDS = {
    "onnxruntime": ("clinvla_engine", "onnxruntime"),
    "aoti": ("clinvla_engine", "torch"),
    "tensorrt": ("clinvla_engine", "tensorrt"),
    "compile": ("clinvla_engine", "torch"),
}


class BundleError(RuntimeError):
    """An engine bundle that cannot be used; the message names the file or version and the fix."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


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
    for name in ("onnx", "onnxruntime", "tensorrt", "onnx_graphsurgeon"):
        out[name] = _module_version(name)
    return out


def _module_version(name: str) -> str | None:
    from .. import backends

    avail = backends.module(name, "trt" if name == "tensorrt" else "export")
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


def read_manifest(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise BundleError(f"engine bundle {directory}: no such directory")
    if not path.is_file():
        raise BundleError(f"engine bundle {directory} has no {MANIFEST}; build one with clinvla-build-engine")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"engine bundle {directory}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"engine bundle {directory}: {MANIFEST} is not a ClinVLA engine manifest")
    if int(manifest.get("format_version", 0)) > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"engine bundle {directory} has format_version {manifest['format_version']}, newer than this "
            f"clinvla-engine understands ({BUNDLE_FORMAT_VERSION}); upgrade clinvla-engine"
        )
    return directory, manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Every listed file exists, has its recorded size and SHA-256, and stays inside the bundle."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"engine bundle {directory}: {MANIFEST} lists no files")
    root = directory.resolve()
    for name, entry in sorted(files.items()):
        path = (directory / name).resolve()
        if root not in path.parents:
            raise BundleError(f"engine bundle {directory}: file entry {name!r} points outside the bundle")
        if not path.is_file():
            raise BundleError(f"engine bundle {directory}: {name} is missing")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise BundleError(
                f"engine bundle {directory}: {name} has {size} bytes, the manifest says {entry.get('bytes')}; "
                "the file was changed or truncated after the build: rebuild the engine"
            )
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            raise BundleError(
                f"engine bundle {directory}: {name} does not match its SHA-256 in {MANIFEST} "
                f"(expected {str(entry.get('sha256'))[:16]}..., got {digest[:16]}...); the file was changed "
                "after the build: rebuild the engine"
            )


def load_bundle(directory: str | os.PathLike, verify: bool = True) -> tuple[Path, dict[str, Any]]:
    """(directory, manifest) after the format, version and hash checks."""
    directory, manifest = read_manifest(directory)
    check_versions(manifest, directory)
    if verify:
        verify_files(directory, manifest)
    return directory, manifest


def file_entries(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"bytes": (directory / n).stat().st_size, "sha256": sha256_file(directory / n)} for n in sorted(names)}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Lists (and hashes) every file under `directory` except the manifest into `manifest` (updated
    in place), then writes it atomically."""
    names = sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
    )
    manifest["format"] = BUNDLE_FORMAT
    manifest["format_version"] = BUNDLE_FORMAT_VERSION
    manifest["files"] = file_entries(directory, names)
    path = directory / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path
