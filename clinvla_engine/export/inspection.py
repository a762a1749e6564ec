"""``clinvla engine inspect`` and ``clinvla engine compare``: what a bundle is, and whether it still
computes what its checkpoint computes."""
from __future__ import annotations

import json
from pathlib import Path

from ..runtime.bundle import BundleError, check_versions, file_status, installed_versions, read_manifest
from ..files import sha256_file


def inspect_bundle(directory: str | Path, verify: bool = True) -> dict:
    """The manifest's essentials plus, per file of the manifest and of the folder, whether it
    still matches ("ok", "not checked", "MISSING", "CHANGED", "UNLISTED", "LINK").

    A bundle whose files or versions no longer match is reported (``usable`` False), not raised;
    a manifest that is not valid, or a bundle whose build did not finish, raises BundleError, as
    loading it would: there is nothing trustworthy to report."""
    directory, manifest = read_manifest(directory)
    listed = manifest["files"]
    files = {name: {"bytes": listed.get(name, {}).get("bytes"), "sha256": listed.get(name, {}).get("sha256"),
                    "status": status}
             for name, status in file_status(directory, manifest, hash_files=verify).items()}
    try:
        check_versions(manifest, directory)
        versions_ok = "ok"
    except BundleError as exc:
        versions_ok = str(exc)
    cfg = manifest.get("config", {})
    return {
        "bundle": str(directory),
        "backend": manifest.get("backend"),
        "device": manifest.get("device"),
        "precision": manifest.get("precision"),
        "batch_sizes": manifest.get("batch_sizes"),
        "max_text_len": manifest.get("max_text_len"),
        "created": manifest.get("created"),
        "model": {"name": cfg.get("name"), "embed_dim": cfg.get("embed_dim"),
                  "image_size": cfg.get("vision", {}).get("image_size"),
                  "views": cfg.get("vision", {}).get("num_views")},
        "checkpoint": manifest.get("checkpoint"),
        "graphs": manifest.get("graphs"),
        "versions_built": manifest.get("versions"),
        "versions_here": installed_versions(),
        "versions_status": versions_ok,
        "parity": manifest.get("parity", {}),
        "calibration": manifest.get("calibration"),
        "build": {k: v for k, v in manifest.get("build", {}).items() if k != "stages"},
        "backend_details": manifest.get("backend_details"),
        "files": files,
        "usable": versions_ok == "ok" and all(f["status"] in ("ok", "not checked") for f in files.values()),
    }


def format_inspection(info: dict) -> str:
    from .parity import format_report

    m = info["model"]
    lines = [
        f"engine bundle {info['bundle']}",
        f"  backend {info['backend']} on {info['device']}, {info['precision']}, buckets {info['batch_sizes']}, "
        f"text <= {info['max_text_len']} tokens, built {info['created']}",
        f"  model {m['name']}: {m['image_size']}px, {m['views']} view(s), {m['embed_dim']}-d embeddings; "
        f"checkpoint {(info.get('checkpoint') or {}).get('path')}",
        "  graphs:",
    ]
    for g, spec in (info.get("graphs") or {}).items():
        ins = ", ".join(f"{t['name']} {tuple(t['shape'])} {t['dtype']}" for t in spec["inputs"])
        outs = ", ".join(f"{t['name']} {tuple(t['shape'])} {t['dtype']}" for t in spec["outputs"])
        lines.append(f"    {g} ({spec['file']}): {ins} -> {outs}")
    built, here = info["versions_built"] or {}, info["versions_here"]
    lines.append("  versions (built / here): " + ", ".join(
        f"{k} {built.get(k)} / {here.get(k)}" for k in ("clinvla_engine", "torch", "onnxruntime", "openvino", "tensorrt", "cuda")
        if built.get(k) or here.get(k)))
    lines.append(f"  version check: {info['versions_status']}")
    b = info.get("build") or {}
    if b.get("measured"):
        me = b["measured"]
        lines.append(f"  measured at build (batch {me['batch']}): image {me['image_ms']} ms ({me['image_per_s']}/s), "
                     f"text {me['text_ms']} ms ({me['text_per_s']}/s)")
    for name, c in (b.get("candidates") or {}).items():
        if c.get("built"):
            lines.append(f"    candidate {name}: {c['measured']['score_ms']} ms per image+text batch, "
                         f"parity {'passed' if c['parity_passed'] else 'FAILED'}")
        else:
            lines.append(f"    candidate {name}: not built ({str(c.get('why'))[:160]})")
    source = (info.get("parity") or {}).get("data")
    if source:
        where = f" {source['path']}" if source.get("path") else ""
        lines.append(f"  parity checked on: {source['source']} studies{where}"
                     + (f" ({source['studies']})" if source.get("studies") is not None else ""))
    calibration = info.get("calibration")
    if calibration:
        if calibration["source"] == "user":
            what = f"studies {calibration.get('path')} ({calibration.get('studies')})"
        elif calibration["source"] == "synthetic":
            what = f"studies ({calibration.get('studies')})"
        else:
            what = "inputs"
        lines.append(f"  {info.get('precision')} calibrated on: {calibration['source']} {what}")
    if info.get("parity", {}).get("outputs"):
        lines.append("  " + format_report(info["parity"], "parity at build").replace("\n", "\n  "))
    lines.append("  files:")
    for name, f in info["files"].items():
        lines.append(f"    {f['status']:<8} {name:<34} {f['bytes'] or 0:>12,} B  sha256 {str(f['sha256'])[:16]}...")
    lines.append("  usable here: " + ("yes" if info["usable"] else "NO"))
    return "\n".join(lines)


def _encoder_config(cfg: dict) -> str:
    """The config sections that define the encoders (training settings may differ)."""
    keys = ("model_type", "embed_dim", "vision", "text", "adapter")
    return json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True, default=list)


def compare(checkpoint: str | Path, directory: str | Path, *, device: str | None = None, random: int = 16,
            studies: int = 48, seed: int = 1, data: str | Path | None = None) -> dict:
    """Runs the same inputs through the checkpoint's PyTorch model and the engine (see parity);
    data = a folder of the user's studies (the first `studies` of it) instead of synthetic ones."""
    from ..model import load_checkpoint
    from ..model.checkpoint import _resolve
    from ..runtime import Engine
    from .parity import check_parity
    from .studies import open_user_studies

    if data is not None and studies < 1:
        raise ValueError("--studies 0 turns the study check off, so --data would not be used; give a count")
    user = open_user_studies(data, studies, "--data") if data is not None else None
    model = load_checkpoint(checkpoint).float().eval()
    engine = Engine.load(directory, device=device)
    try:
        if _encoder_config(model.config.to_dict()) != _encoder_config(engine.manifest["config"]):
            raise BundleError(f"checkpoint {checkpoint} is another model than the one engine {directory} was built "
                              f"from (their configs differ); compare an engine with its own checkpoint")
        report = check_parity(model, engine, engine.manifest["precision"], random=random, studies=studies, seed=seed,
                              user_studies=user)
    finally:
        engine.close()
    ck = _resolve(Path(checkpoint))
    built_from = (engine.manifest.get("checkpoint") or {}).get("sha256")
    report["same_checkpoint"] = built_from == sha256_file(ck)
    report["engine"] = {"bundle": str(directory), "backend": engine.manifest["backend"],
                        "device": str(engine.device), "precision": engine.manifest["precision"]}
    return report
