"""The ``clinvla`` command line. ``clinvla <command> --help`` is the manual of each command."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .data.archive import FORMATS

# kept in step with clinvla_engine.data.dataset.DEFAULT_MAX_BAD_FRACTION (a test checks); not imported,
# so that `clinvla --help` does not import torch
DEFAULT_MAX_BAD_FRACTION = 0.01


def _positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1 (0 would train nothing or be silently ignored)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1 such as 0.01, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (0.01 = 1%), got {value}")
    return value


def _cmd_synth(args) -> int:
    from .data.synth import generate_archive

    try:
        splits = tuple(float(x) for x in args.splits.split(","))
    except ValueError:
        raise ValueError(f"--splits {args.splits!r}: expected three fractions like 0.8,0.1,0.1") from None
    summary = generate_archive(args.out, studies=args.studies, seed=args.seed, fmt=args.format, size=args.size,
                               lateral_fraction=args.lateral_fraction, split_fractions=splits,
                               progress=not args.quiet, workers=args.workers)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _cmd_train(args) -> int:
    from .backends import resolve_device
    from .config import load_config
    from .train import train

    resolve_device(args.device)  # before any work: a wrong --device is a clear error, not a traceback later
    cfg = load_config(args.config)
    if args.image_weights:
        cfg.vision.weights = args.image_weights
    if args.text_model:
        cfg.text.model = args.text_model
    if args.batch_size is not None:
        cfg.train.batch_size = args.batch_size
    result = train(cfg, args.data, args.out, max_steps=args.max_steps, epochs=args.epochs, resume=args.resume,
                   device=args.device, progress=not args.quiet, preload=args.preload,
                   max_bad_fraction=args.max_bad_fraction)
    print(f"trained {result.steps} steps in {result.seconds:.1f} s ({result.samples_per_s:.1f} samples/s), "
          f"final loss {result.final_loss:.4f}; checkpoint {result.out_dir / 'model.safetensors'}")
    if result.skipped_studies:
        print(f"skipped {len(result.skipped_studies)} studies whose images cannot be decoded "
              f"(listed in {result.out_dir / 'metrics.jsonl'} as skipped_study records)")
    return 0


def _cmd_pretrain(args) -> int:
    from .backends import resolve_device
    from .config import load_config
    from .train import pretrain

    resolve_device(args.device)
    cfg = load_config(args.config)
    if args.batch_size is not None:
        cfg.train.batch_size = args.batch_size
    result = pretrain(cfg, args.archive, args.out, max_steps=args.max_steps, resume=args.resume, device=args.device,
                      progress=not args.quiet, preload=args.preload, max_bad_fraction=args.max_bad_fraction)
    print(f"pre-trained the image tower for {result.steps} steps in {result.seconds:.1f} s, final MAE loss "
          f"{result.final_loss:.4f}; checkpoint {result.out_dir / 'model.safetensors'} (start a training run from it "
          "with vision.init_from in the config)")
    return 0


def _cmd_eval(args) -> int:
    from .backends import resolve_device
    from .evaluate import evaluate, format_table
    from .model import load_checkpoint
    from .files import atomic_write_text

    from .runtime.as_model import EngineModel, is_engine_dir

    engine = is_engine_dir(args.checkpoint)
    if engine and args.claims:
        raise SystemExit(f"error: {args.checkpoint} is an engine bundle: the claims protocols read the model's "
                         "local heads and temperatures, which engines do not carry; evaluate its checkpoint with --claims")
    if engine and "rsna" in args.protocols.split(","):
        raise SystemExit(f"error: {args.checkpoint} is an engine bundle: the rsna protocol scales its scores by the "
                         "model's learned temperature, which engines do not carry; drop rsna from --protocols or "
                         "evaluate the checkpoint")
    if engine:  # a deployed engine, scored like its checkpoint (its own device; --device must agree)
        model = EngineModel.load(args.checkpoint, device=args.device)
        device = model.engine.device
    else:
        device = resolve_device(args.device)
        model = load_checkpoint(args.checkpoint, map_location=device)
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    results = evaluate(model, args.data, protocols=protocols, split=args.split, seed=args.seed,
                       per_class=args.per_class, manifest_in=args.manifest, manifest_out=args.save_manifest,
                       rsna_data=args.rsna_data, device=device, max_bad_fraction=args.max_bad_fraction)
    print(format_table(results, f"ClinVLA evaluation of {args.checkpoint} on {args.data} ({args.split})"))
    if args.claims:
        from .eval_claims import evaluate_claims, format_claims_table

        claims = evaluate_claims(model, args.data, args.truth, seed=args.train_seed, split=args.split,
                                 views=args.views, device=device, max_bad_fraction=args.max_bad_fraction)
        print(format_claims_table({str(args.checkpoint): claims}, title="claims protocols (strata, laterality, pointing)"))
        results["claims"] = claims
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, studies=args.studies, steps=args.steps, seed=args.seed, quick=args.quick, seeds=args.seeds)
    return 0


def _cmd_info(args) -> int:
    from . import build_info

    print(json.dumps(build_info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="clinvla",
        description="ClinVLA: align chest X-ray studies (frontal + lateral) with reports, and search an archive.",
    )
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("synth", help="write a synthetic multi-view chest X-ray archive (a test bed, not clinical data)")
    p.add_argument("--out", required=True, help="output folder (must be empty or a previous synthetic archive)")
    p.add_argument("--studies", type=int, default=1000, help="number of studies (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same archive")
    p.add_argument("--format", default="mimic", choices=list(FORMATS),
                   help="on-disk layout (default mimic: MIMIC-CXR-JPG with report files)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--lateral-fraction", type=float, default=0.85, help="fraction of studies with a lateral view")
    p.add_argument("--splits", default="0.8,0.1,0.1", help="train,validate,test fractions by patient (default 0.8,0.1,0.1)")
    p.add_argument("--workers", type=int, default=None,
                   help="rendering processes (default: one per available core; the files do not depend on it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("train", help="train ClinVLA on an archive of image-report pairs")
    p.add_argument("--config", default="small", help="preset (tiny, small, base) or JSON file (default small)")
    p.add_argument("--data", required=True, help="dataset folder (MIMIC-CXR-JPG layout, DICOM tree, ...)")
    p.add_argument("--out", required=True, help="output folder for the checkpoint, metrics and config")
    p.add_argument("--max-steps", type=_positive_int, help="optimizer steps, >= 1 (overrides train.max_steps)")
    p.add_argument("--epochs", type=_positive_int, help="stop after this many epochs, >= 1 (overrides train.epochs)")
    p.add_argument("--batch-size", type=_positive_int, help="per-process batch size, >= 1 (overrides train.batch_size)")
    p.add_argument("--max-bad-fraction", type=_fraction, default=None,
                   help="stop when more than this share of the studies have images that cannot be decoded "
                        f"(default {DEFAULT_MAX_BAD_FRACTION} = 1%%); fewer are skipped and listed in metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (weights, optimizer, schedule)")
    p.add_argument("--image-weights", help="timm/MAE/MRM ViT checkpoint to start the image encoder from")
    p.add_argument("--text-model", help="local Hugging Face BERT directory (CXR-BERT, BioClinicalBERT, ...)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--preload", action="store_true", help="decode all images into memory first (small archives)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "pretrain", help="MAE pre-training of the image tower on an archive's images (both views, reports unused)",
        description="Masked-autoencoder pre-training of the image encoder (75% of each view's patches hidden, "
                    "fewer when the patch count is small: the ratio used is printed) with the model's MIM decoder. "
                    "Writes a run folder like `clinvla train` (checkpoints, --resume, metrics.jsonl); train from it "
                    "with {\"vision\": {\"init_from\": \"RUN/model.safetensors\", \"frozen\": true}} in the config "
                    "(frozen backbone + adapters) or \"frozen\": false (full fine-tuning).")
    p.add_argument("--archive", required=True, help="dataset folder (MIMIC-CXR-JPG layout, DICOM tree, ...)")
    p.add_argument("--out", required=True, help="output folder for the checkpoint, metrics and config")
    p.add_argument("--config", default="small", help="preset (tiny, small, base) or JSON file (default small); "
                                                   "its vision and decoder sections define the tower and the MAE")
    p.add_argument("--max-steps", type=_positive_int, help="optimizer steps, >= 1 (overrides train.max_steps)")
    p.add_argument("--batch-size", type=_positive_int, help="studies per step, >= 1 (overrides train.batch_size)")
    p.add_argument("--max-bad-fraction", type=_fraction, default=None,
                   help=f"stop when more than this share of the studies cannot be decoded (default {DEFAULT_MAX_BAD_FRACTION})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--preload", action="store_true", help="decode all images into memory first (small archives)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("eval", help="retrieval and zero-shot protocols (5x200, 8x200, instance, rsna)")
    p.add_argument("checkpoint", help="model.safetensors, a training output folder, or an engine bundle folder "
                                      "(clinvla-build-engine's; scored by its own backend, global protocols only)")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--protocols", default="5x200,8x200,instance", help="comma-separated (default 5x200,8x200,instance)")
    p.add_argument("--split", default="test", help="train, validate, test or all (default test)")
    p.add_argument("--per-class", type=int, default=200, help="studies per class (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the protocol sets")
    p.add_argument("--manifest", help="reuse the sets of this manifest (refused if an image changed)")
    p.add_argument("--save-manifest", help="write the drawn sets (study ids, file hashes) here")
    p.add_argument("--rsna-data", help="RSNA Pneumonia folder for the rsna protocol")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--claims", action="store_true",
                   help="also the claims protocols of a synthetic archive (strata, laterality-aware retrieval, "
                        "pointing game; needs its synth_truth.jsonl)")
    p.add_argument("--truth", help="the archive's synth_truth.jsonl (default: inside --data)")
    p.add_argument("--views", default="all", choices=("all", "frontal"),
                   help="claims: score a two-view model from both views or from its frontal view alone")
    p.add_argument("--train-seed", type=int, default=0, help="claims: the model's training seed (recorded)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--max-bad-fraction", type=_fraction, default=DEFAULT_MAX_BAD_FRACTION,
                   help="stop when more than this share of the evaluated studies have images that cannot be "
                        "decoded (default 0.01 = 1%%); fewer are left out and listed")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="synthesise, train ClinVLA and a CLIP baseline, evaluate, write an HTML report")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--studies", type=int, default=None, help="synthetic studies (default: the demo's setting)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: the demo's setting)")
    p.add_argument("--seed", type=int, default=0, help="the archive's seed (default 0)")
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds per model (default 1; --quick: 2); intervals cover seeds when >= 2")
    p.add_argument("--quick", action="store_true", help="a tiny run in about a minute (for tests)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("info", help="what is built and available here (extension, CUDA, Triton, ONNX Runtime, TensorRT)")
    p.set_defaults(func=_cmd_info)

    from .export.commands import add_engine_commands
    from .pipeline.cli import add_embed_parser
    from .search.cli import add_search_parsers
    from .serve.cli import add_serve_parser

    add_engine_commands(sub)
    add_embed_parser(sub)
    add_search_parsers(sub)
    add_serve_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .backends import BackendUnavailable
    from .config import ConfigError
    from .data.study import DatasetError
    from .model.checkpoint import CheckpointError
    from .train import TrainError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DatasetError, CheckpointError, TrainError, BackendUnavailable, ValueError,
            FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        print(f"clinvla {args.command}: error: {exc}", file=sys.stderr)
        return 2


def build_engine_main(argv: list[str] | None = None) -> int:
    """The clinvla-build-engine console script."""
    from .export.commands import build_engine_main as _build_engine_main

    return _build_engine_main(argv)


if __name__ == "__main__":
    sys.exit(main())
