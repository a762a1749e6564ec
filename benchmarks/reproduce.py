"""``make reproduce``: ClinVLA's three claims on the synthetic test bed, each as an ablation over seeds.

    python -m benchmarks.reproduce [--out reproduce_out] [--seeds 3] [--arms clinvla,clip,...]
                                   [--studies 3000] [--steps 500] [--quality benchmarks/quality.md]

Trains every arm of ``clinvla_engine.claims_study.ARMS`` (ClinVLA, the CLIP baseline, one ablation
per claim: frontal only, no local loss, MAE-pretrained tower frozen + adapters vs fully fine-tuned,
and the CLIP baseline from the same MAE tower) with the demo's archive and training settings, for
each seed; evaluates each on the classic and the claims protocols; writes ``benchmarks/quality.md``
(tables with means and 95% intervals over seeds and evaluation items, the differences each claim
predicts, the verdict against the paper's margins from scratch and with both from the MAE tower, and
plots: retrieval metrics per arm, pointing-game attention maps of a few test studies). Finished runs
in ``--out`` are reused, so an interrupted study continues.
Not part of CI: at the demo's settings one arm x seed takes about 4 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _plots(study: dict, summaries: dict, dataset, out: Path, stem: str = "quality") -> list[str]:
    """Writes the figures next to the report (named after its stem: quality.md -> quality_*.png, so
    reports of several studies can share a folder); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from clinvla_engine.claims_study import ARMS
    from clinvla_engine.files import atomic_path

    names = []
    metrics = ["5x200/i2t_P@10", "8x200/t2i_P@10", "strata/lateral_needed/i2t_P@10", "laterality/t2i_P@10",
               "pointing/frontal/hit_rate"]
    arms = list(summaries)
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        ms = [summaries[arm].get(m) for m in metrics]
        x = np.arange(len(metrics)) + i * width
        y = [m["mean"] if m else np.nan for m in ms]
        err = [[(m["mean"] - m["ci"][0]) if m else 0 for m in ms], [(m["ci"][1] - m["mean"]) if m else 0 for m in ms]]
        ax.bar(x, y, width, yerr=err, capsize=2, label=ARMS[arm].label)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2)
    ax.set_xticklabels(metrics, fontsize=8)
    ax.set_ylabel("mean [95% CI]")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    with atomic_path(out / f"{stem}_retrieval.png") as tmp:
        tmp.write_bytes(buf.getvalue())
    names.append(f"{stem}_retrieval.png")
    return names


def _pointing_figure(model, dataset, truth_path: Path, out: Path, n: int = 4, stem: str = "quality") -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clinvla_engine.data.io import load_image
    from clinvla_engine.eval_claims import attention_map
    from clinvla_engine.eval_prompts import FINDING_WORDS, finding_phrase
    from clinvla_engine.files import atomic_path

    truth = {}
    for line in truth_path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            truth[r["study_id"]] = r
    picks = []
    for s in dataset:
        if s.split != "test" or s.study_id not in truth:
            continue
        for f in truth[s.study_id]["findings"]:
            if f.get("label") in FINDING_WORDS and f.get("bbox_frontal") and f.get("visible_frontal"):
                picks.append((s, f))
                break
        if len(picks) >= n:
            break
    if not picks:
        return None
    fig, axes = plt.subplots(1, len(picks), figsize=(3 * len(picks), 3.2))
    axes = [axes] if len(picks) == 1 else axes
    for ax, (s, f) in zip(axes, picks):
        word = FINDING_WORDS[f["label"]]
        phrase = finding_phrase(f["label"], f.get("side"))
        att = attention_map(model, s, word, phrase, view="frontal")
        img = load_image(s.frontal)
        h, w = img.shape[:2]
        ax.imshow(img, cmap="gray")
        ax.imshow(att.cpu().numpy(), cmap="jet", alpha=0.35, extent=(0, w, h, 0), interpolation="nearest")
        x, y, bw, bh = f["bbox_frontal"]
        ax.add_patch(plt.Rectangle((x, y), bw, bh, fill=False, edgecolor="lime", linewidth=1.5))
        ax.set_title(f"'{phrase}'", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    with atomic_path(out / f"{stem}_pointing.png") as tmp:
        tmp.write_bytes(buf.getvalue())
    return f"{stem}_pointing.png"


def main(argv=None) -> int:
    from clinvla_engine.claims_study import ARMS, COMPARISONS, run_study, table, verdict
    from clinvla_engine.data import open_dataset
    from clinvla_engine.demo import FULL, QUICK, _synthesise, base_config
    from clinvla_engine.files import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="reproduce_out", help="working folder (runs are reused from here)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per arm (at least 3 for the study)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--studies", type=int, default=FULL["studies"])
    p.add_argument("--steps", type=int, default=FULL["steps"])
    p.add_argument("--quality", default=str(HERE / "quality.md"), help="where to write the report")
    p.add_argument("--quick", action="store_true",
                   help="the demo's --quick settings (tiny model, 240 studies, 12 steps): checks the machinery only")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    if args.seeds < 2:
        p.error("--seeds must be >= 2: the study's intervals are over seeds (3 or more for the claims)")
    t0 = time.perf_counter()
    settings = dict(QUICK) if args.quick else dict(FULL, studies=args.studies, steps=args.steps)
    settings["seeds"] = tuple(range(args.seeds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    archive = out / "archive"
    _synthesise(archive, settings, 0)
    dataset = list(open_dataset(archive))
    base = base_config(settings, quick=args.quick)
    study = run_study(out, dataset, archive, base, arms=arms, seeds=settings["seeds"],
                      per_class=settings["per_class"])
    summaries, comparisons = study["summaries"], study["comparisons"]
    quality = Path(args.quality)
    figures = _plots(study["study"], summaries, dataset, quality.parent, quality.stem)
    if "clinvla" in arms:
        fig = _pointing_figure(study["models"]["clinvla"][0], dataset, archive / "synth_truth.jsonl", quality.parent,
                              stem=quality.stem)
        if fig:
            figures.append(fig)
    import torch

    from clinvla_engine.data.synth import SYNTH_VERSION

    lines = [
        "# ClinVLA's claims on the synthetic test bed",
        "",
        f"Generated by `make reproduce` (`python -m benchmarks.reproduce --seeds {args.seeds} --studies "
        f"{settings['studies']} --steps {settings['steps']} --arms {','.join(arms)}{' --quick' if args.quick else ''}`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, synthetic archive version "
        f"{SYNTH_VERSION}: {settings['studies']} studies at {settings['size']} px, {settings['steps']} steps of batch "
        f"{settings['batch']} per run, {args.seeds} training seeds per arm; this invocation took {time.perf_counter() - t0:.0f} s "
        f"(finished runs and evaluations in {out} are reused; each run's training time is under Training time).",
        "",
        "The archive is a synthetic test bed for mechanisms, not clinical data: nothing here says how the model "
        "would do on real radiographs. Cells: mean [95% interval from a bootstrap over training seeds and "
        "evaluation items]; differences: a - b with the interval of the difference (seeds of each arm and "
        "items resampled).",
        "",
        "How the recipe (`clinvla_engine.claims_study.RECIPE`) was chosen, and the failure it fixes: "
        "`benchmarks/recipe_search.md`.",
        "",
        "## Verdict against the paper's margins (ClinVLA - CLIP baseline)",
        "",
    ]
    lines += [f"- {v}" for v in study["study"]["verdict"]] or ["- ClinVLA and the CLIP baseline were not both run"]
    lines += ["", "## All arms", "", table(summaries, comparisons), ""]
    for a, b, what in COMPARISONS:
        if (a, b) in comparisons:
            lines += [f"## {what}: {a} - {b}", "", table({a: summaries[a], b: summaries[b]}, {(a, b): comparisons[(a, b)]}), ""]
    lines += ["## Training time", ""]
    for a in arms:
        secs = study["study"]["arms"][a]["train_seconds"]
        lines.append(f"- {ARMS[a].label}: " + ", ".join(f"{s:.0f} s" for s in secs))
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    atomic_write_text(quality, "\n".join(lines) + "\n")
    print(f"wrote {quality} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
