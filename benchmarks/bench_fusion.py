"""The attention fusion's read-out (``attention_read_out``): the plain form against the folded one.

``vision.fusion = attention`` pools each study's tokens (CLS and patches of both views) with one
learned query per study. The plain form (``clinvla_engine.model.fusion.plain_read_out``, the
baseline) projects every token to keys and values and calls ``scaled_dot_product_attention``; the
folded form (``AttentionFusion.read_out``, what the model runs) folds both projections into the
query, so no token is projected. Same parameters, same function (``tests/test_recipe.py``). Timed
per call on random inputs, forward only (inference) and forward + backward (a training step), with
the two views of every study present, at the demo's shapes (128 px, 16 px patches: 2 x 65 tokens
per study) and the ``small`` and ``base`` widths.

    python -m benchmarks.bench_fusion [--out DIR] [--batch N] [--repeat N] [--presets small,base]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.harness import Bench, run_main
from clinvla_engine.config import load_config
from clinvla_engine.model.fusion import AttentionFusion, plain_read_out


def make_case(preset: str, batch: int, tokens: int, device: torch.device, backward: bool):
    cfg = load_config(preset).vision
    torch.manual_seed(0)
    fusion = AttentionFusion(cfg.width, cfg.heads).to(device)
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_(0, 0.05)
    base = torch.randn(batch, cfg.width, device=device, requires_grad=backward)
    keys = torch.randn(batch, tokens, cfg.width, device=device, requires_grad=backward)
    keep = torch.ones(batch, 1, tokens, dtype=torch.bool, device=device)

    def call(read):
        def fn():
            if backward:
                read(base, keys, keep).square().sum().backward()
            else:
                with torch.inference_mode():
                    read(base, keys, keep)
        return fn

    return cfg, call(lambda *a: plain_read_out(fusion, *a)), call(fusion.read_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    ap.add_argument("--presets", default="small,base")
    ap.add_argument("--batch", type=int, default=32, help="studies per call (the demo's training batch)")
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    if args.batch < 1 or args.repeat < 1:
        ap.error("--batch and --repeat must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = 2 * ((128 // 16) ** 2 + 1)
    bench = Bench("fusion", args.out, repeat=args.repeat,
                  params={"batch": args.batch, "tokens per study": tokens, "device": str(device)})
    for preset in args.presets.split(","):
        for backward in (False, True):
            cfg, plain, folded = make_case(preset, args.batch, tokens, device, backward)
            title = (f"attention_read_out, {preset} (width {cfg.width}, {cfg.heads} heads), batch {args.batch}, "
                     f"{tokens} tokens, {'forward + backward' if backward else 'forward'}")
            with bench.case(title, device=str(device)) as case:
                case.run_interleaved([("plain: project every token, then attention", plain, True),
                                      ("folded: projections folded into the query", folded, False)])
    bench.finish()


if __name__ == "__main__":
    run_main(main)
