"""The command lines: ``clinvla-build-engine`` and ``clinvla engine inspect|compare``.

``build_engine_main(argv)`` is the ``clinvla-build-engine`` console script;
``add_engine_commands(subparsers)`` adds ``engine`` (with ``inspect`` and ``compare``) to the
``clinvla`` parser. Errors print one line naming the input and the fix, and exit with status 2;
a parity failure exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import sys

from .build import BACKENDS, DEFAULT_BATCH_SIZES

EPILOG = """examples:
  clinvla-build-engine runs/small -o engines/small                   # fastest backend here, fp32
  clinvla-build-engine runs/base/model.safetensors -o engines/base --device cuda --precision fp16
  clinvla-build-engine model.pt -o engines/ort --backend onnxruntime --batch-sizes 1,8,32
  clinvla-build-engine runs/small -o engines/ov-int8 --backend openvino --precision int8 --calibration my_studies/

backends: tensorrt (GPU; needs TensorRT 10/11), aoti (AOTInductor .pt2, CPU or GPU), onnxruntime
(CPU; GPU with onnxruntime-gpu), compile (torch.compile + CUDA graphs per bucket), openvino (CPU;
fp32, bf16 where the CPU has it, int8 by NNCF; pip install 'clinvla-engine[openvino]'), auto (builds
each that can build here, measures them, keeps the fastest that passes parity)."""


def _errors():
    from ..backends import BackendUnavailable
    from ..config import ConfigError
    from ..data.study import DatasetError
    from ..model.checkpoint import CheckpointError
    from ..runtime.bundle import BundleError
    from .context import BuildError

    return (BackendUnavailable, ConfigError, DatasetError, CheckpointError, BundleError, BuildError,
            FileNotFoundError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="clinvla-build-engine",
        description="Compile a ClinVLA checkpoint's image and text encoders into a verified engine bundle "
                    "(ONNX + GraphSurgeon -> TensorRT | AOTInductor | ONNX Runtime | OpenVINO), check it against PyTorch, "
                    "and write a manifest with a SHA-256 for every file.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="what `clinvla train` writes (its folder or model.safetensors), or a .pt "
                                       "file (opened with torch.load(weights_only=True))")
    ap.add_argument("-o", "--output", required=True, metavar="ENGINE_DIR", help="folder to write the bundle to")
    ap.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="default auto")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "fp8", "int8"],
                    help="compute precision (norms and softmax stay float32); int8: openvino only (NNCF); "
                         "default fp32")
    ap.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                    help="batch buckets, comma-separated (default %(default)s)")
    ap.add_argument("--max-text-len", type=int, default=128, help="longest token sequence (default 128; capped "
                                                                  "by the model's tokenizer)")
    ap.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 or later (default 18)")
    ap.add_argument("--parity-studies", type=int, default=48,
                    help="studies for the parity and retrieval check: the first N of --parity-data, else N synthetic "
                         "ones (default 48; 0 = random inputs only)")
    ap.add_argument("--parity-data", metavar="DIR",
                    help="a folder of your own studies (MIMIC-CXR-JPG, CheXpert, RSNA, DICOM tree) to check parity "
                         "on; default: a synthetic archive. The manifest records which")
    ap.add_argument("--calibration", metavar="DIR",
                    help="--precision fp8 or int8: a folder of your own studies (with reports) to calibrate on; "
                         "default: random inputs (fp8) or a synthetic archive (int8). The manifest records which")
    ap.add_argument("--max-p10-change", type=float, default=0.01,
                    help="int8: refuse the engine when its image->text P@10 on the parity studies drops by more "
                         "than this against fp32 (default %(default)s)")
    ap.add_argument("--calibration-studies", type=int, default=64,
                    help="how many of the --calibration folder's studies to use (default 64; 0 = all)")
    ap.add_argument("--no-strict", action="store_true", help="keep an engine that fails the parity check")
    ap.add_argument("--force", action="store_true", help="replace an existing bundle at ENGINE_DIR")
    ap.add_argument("--keep-candidates", metavar="DIR", help="auto: also keep every candidate's bundle in DIR")
    ap.add_argument("--aoti-constants", default="auto", choices=["auto", "so", "external"],
                    help="AOTInductor: constants inside the shared object, in a separate safetensors file, or "
                         "auto (inside, then separate if the package crashes when loaded)")
    ap.add_argument("--trt-typing", default="auto", choices=["auto", "strong", "weak"],
                    help="TensorRT: precision from the ONNX (strong, TensorRT 11's only mode) or builder flags (weak)")
    ap.add_argument("--json", metavar="FILE", help="also write the manifest's parity and build figures here")
    ap.add_argument("--quiet", action="store_true", help="no per-stage progress")
    return ap


def build_engine_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .build import BuildOptions, build_engine, parse_batch_sizes

    try:
        extra = {}
        if args.aoti_constants != "auto":
            extra["aoti_constants"] = args.aoti_constants
        if args.trt_typing != "auto":
            extra["trt_typing"] = args.trt_typing
        opts = BuildOptions(backend=args.backend, device=args.device, precision=args.precision,
                            batch_sizes=parse_batch_sizes(args.batch_sizes), max_text_len=args.max_text_len,
                            opset=args.opset, parity_studies=args.parity_studies, parity_data=args.parity_data,
                            calibration=args.calibration, calibration_studies=args.calibration_studies,
                            max_p10_change=args.max_p10_change,
                            strict=not args.no_strict,
                            force=args.force, keep_candidates=args.keep_candidates, progress=not args.quiet,
                            extra=extra)
        result = build_engine(args.checkpoint, args.output, opts)
    except _errors() as exc:
        print(f"clinvla-build-engine: error: {exc}", file=sys.stderr)
        return 2
    print(result.report)
    m = result.manifest
    me = m["build"]["measured"]
    print(f"engine {result.path}: {m['backend']} on {m['device']}, {m['precision']}, buckets {m['batch_sizes']}; "
          f"batch {me['batch']}: image {me['image_ms']} ms, text {me['text_ms']} ms")
    if args.json:
        from ..files import atomic_write_text

        atomic_write_text(args.json, json.dumps({"parity": m["parity"], "build": m["build"], "backend": m["backend"]},
                                                indent=2, default=str))
    return 0 if m["parity"]["passed"] else 1


# ---- clinvla engine inspect | compare ---------------------------------------------------------
def _cmd_inspect(args) -> int:
    from .inspection import format_inspection, inspect_bundle

    try:
        info = inspect_bundle(args.engine_dir, verify=not args.no_verify)
    except _errors() as exc:
        print(f"clinvla engine inspect: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, default=str) if args.json else format_inspection(info))
    return 0 if info["usable"] else 1


def _cmd_compare(args) -> int:
    from .inspection import compare
    from .parity import format_report

    try:
        report = compare(args.checkpoint, args.engine_dir, device=args.device, random=args.random,
                         studies=args.studies, seed=args.seed, data=args.data)
    except _errors() as exc:
        print(f"clinvla engine compare: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        e = report["engine"]
        print(format_report(report, f"{e['backend']} engine ({e['device']}, {e['precision']}) vs PyTorch eager fp32"))
        if not report["same_checkpoint"]:
            print("note: the engine was built from a checkpoint file with other bytes (same config)")
    return 0 if report["passed"] else 1


def add_engine_commands(subparsers) -> argparse.ArgumentParser:
    """Adds `engine inspect` and `engine compare` to the `clinvla` parser's subparsers."""
    p = subparsers.add_parser("engine", help="inspect an engine bundle, or compare it with its checkpoint")
    sub = p.add_subparsers(dest="engine_command", required=True, metavar="engine_command")
    q = sub.add_parser("inspect", help="what a bundle holds: backend, I/O, versions, parity, files and their hashes")
    q.add_argument("engine_dir", help="folder written by clinvla-build-engine")
    q.add_argument("--no-verify", action="store_true", help="do not hash the files")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=_cmd_inspect)
    c = sub.add_parser("compare", help="run the same inputs through PyTorch and the engine; max abs error and "
                                       "cosine per output, top-10 retrieval overlap")
    c.add_argument("checkpoint", help="the checkpoint the engine was built from")
    c.add_argument("engine_dir", help="folder written by clinvla-build-engine")
    c.add_argument("--device", choices=["cuda", "cpu"], help="default: the bundle's device")
    c.add_argument("--random", type=int, default=16, help="random studies and texts (default 16)")
    c.add_argument("--studies", type=int, default=48,
                   help="studies: the first N of --data, else N synthetic ones (default 48; 0 = none)")
    c.add_argument("--data", metavar="DIR", help="a folder of your own studies to compare on (default: synthetic)")
    c.add_argument("--seed", type=int, default=1, help="seed of the inputs (default 1)")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=_cmd_compare)
    return p


def engine_main(argv: list[str] | None = None) -> int:
    """`python -m clinvla_engine.export.commands inspect|compare ...` without the clinvla CLI."""
    ap = argparse.ArgumentParser(prog="clinvla engine")
    sub = ap.add_subparsers(dest="command", required=True)
    add_engine_commands(sub)
    args = ap.parse_args(["engine", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(engine_main())
