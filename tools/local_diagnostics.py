#!/usr/bin/env python3
"""Does a trained checkpoint's local (word-to-region) alignment depend on the image?

    tools/local_diagnostics.py RUN_OR_CHECKPOINT [...] --archive DIR [--split train] [--batch 32] [--seed 0]

For one batch of studies with their reports (the first --batch studies of --split, in the
archive's order) prints, per checkpoint:

  region spread   the variance of the normalised region features within a study (over positions)
                  and across studies (of each study's mean region): a collapsed local head has
                  the first large and the second near 0, i.e. its regions encode where, not what;
  local scores    GLoRIA's local similarity S over the batch with the model's own tau1-3: its
                  spread over the studies for one report, matched minus unmatched pairs, and the
                  cross-entropy the local loss computes from it (both directions, and text to
                  image alone, which is exactly ln(batch) when the scores ignore the image);
  global scores   the same for the global similarity, for comparison.

The numbers of benchmarks/recipe_search.md come from this tool. Exit status 2 when a checkpoint or
the archive cannot be read.
"""
from __future__ import annotations

import argparse
import math
import sys


def diagnose(model, batch) -> dict:
    import torch
    import torch.nn.functional as F

    from clinvla_engine.losses import local_alignment_scores

    two = model.config.vision.num_views == 2
    with torch.no_grad():
        out = model(batch["frontal"], batch["input_ids"], batch["attention_mask"],
                    batch["lateral"] if two else None, batch["lateral_present"] if two else None, mask_ratio=0.0)
        _, tau = model.temperatures()
        b = out.image_emb.shape[0]
        frontal = F.normalize(out.regions, dim=-1)[:, : out.regions.shape[1] // (2 if two else 1)]
        s = local_alignment_scores(out.regions, out.words, out.word_mask, out.region_mask, *tau)
        g = out.logit_scale * out.image_emb @ out.text_emb.t()
        labels = torch.arange(b)

        def scores(m):
            off = (m.sum() - m.diag().sum()) / (b * (b - 1))
            i2t, t2i = float(F.cross_entropy(m, labels)), float(F.cross_entropy(m.t(), labels))
            return {"spread_over_studies": float(m.std(0).mean()), "matched_minus_unmatched": float(m.diag().mean() - off),
                    "cross_entropy": 0.5 * (i2t + t2i), "cross_entropy_text_to_image": t2i}

        return {"batch": b, "chance": math.log(b), "tau": [float(t) for t in tau],
                "region_variance_within_study": float(frontal.var(dim=1).sum(-1).mean()),
                "region_variance_across_studies": float(frontal.mean(1).var(0).sum()),
                "local": scores(s), "global": scores(g)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="training run folders or checkpoint files")
    ap.add_argument("--archive", required=True, help="the archive the studies come from")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    if args.batch < 2:
        ap.error("--batch must be >= 2 (the scores compare studies)")
    import torch
    from torch.utils.data import DataLoader

    from clinvla_engine.data import open_dataset
    from clinvla_engine.data.dataset import Collate, StudyDataset
    from clinvla_engine.data.study import DatasetError
    from clinvla_engine.model import load_checkpoint
    from clinvla_engine.model.checkpoint import CheckpointError

    try:
        studies = [s for s in open_dataset(args.archive) if s.split == args.split and s.report][: args.batch]
    except (OSError, DatasetError) as exc:
        print(f"error: cannot read the archive {args.archive}: {exc}", file=sys.stderr)
        return 2
    if len(studies) < 2:
        print(f"error: {args.archive} has {len(studies)} studies with a report in split {args.split!r}; "
              "need at least 2 (choose another --split)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    for path in args.checkpoints:
        try:
            model = load_checkpoint(path).eval()
        except (OSError, CheckpointError) as exc:
            print(f"error: cannot load {path}: {exc}", file=sys.stderr)
            return 2
        v = model.config.vision
        ds = StudyDataset(studies, v.image_size, v.pixel_mean, v.pixel_std, train=False,
                          two_views=v.num_views == 2, need_reports=True, on_bad="raise")
        batch = next(iter(DataLoader(ds, batch_size=len(studies), collate_fn=Collate(model.tokenizer))))
        d = diagnose(model, batch)
        print(f"{path}: batch {d['batch']}, chance ln B = {d['chance']:.3f}, tau1-3 {', '.join(f'{t:g}' for t in d['tau'])}")
        print(f"  region variance  within a study {d['region_variance_within_study']:.4f}, "
              f"across studies {d['region_variance_across_studies']:.4f}")
        for name in ("local", "global"):
            x = d[name]
            print(f"  {name:6s} scores   spread over studies {x['spread_over_studies']:.3f}, matched - unmatched "
                  f"{x['matched_minus_unmatched']:+.3f}, cross-entropy {x['cross_entropy']:.3f} "
                  f"(text to image {x['cross_entropy_text_to_image']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
