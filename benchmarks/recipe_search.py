"""One recipe-search run: the claims study's ClinVLA arm with a config override, trained and scored
like the study's runs (benchmarks/recipe_search.md holds the runs made so far).

    python -m benchmarks.recipe_search NAME '{"loss": {"tau3": 1.0}}' [--seed 0] [--out reproduce_out]
                                       [--steps 500] [--runs DIR] [--results FILE] [--quick]

Needs the study's archive and evaluation manifest in --out (`make reproduce` or `clinvla demo --out
DIR` writes them). Trains into --runs/x-NAME-seedS (a finished run with the same config is reused),
evaluates on the study's manifest and the claims protocols, prints one JSON line of the headline
metrics and appends it to --results; the full per-item result goes next to it.
Not part of CI: one run takes about 5 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HEADLINE = ("5x200/i2t_P@10", "8x200/t2i_P@10", "5x200/zeroshot_accuracy", "strata/lateral_needed/i2t_P@10",
            "laterality/t2i_P@10", "pointing/frontal/hit_rate", "pointing/lateral/hit_rate")


def main(argv=None) -> int:
    from clinvla_engine.claims_study import RECIPE, _merge, evaluate_run, train_run
    from clinvla_engine.data import open_dataset
    from clinvla_engine.demo import FULL, QUICK, base_config
    from clinvla_engine.eval_claims import write_claims
    from clinvla_engine.files import atomic_write_text

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", help="the run's name (letters, digits, _ and -)")
    p.add_argument("override", help="JSON merged over the study's base config + RECIPE, e.g. '{\"loss\": {\"tau3\": 1}}'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reproduce_out", help="the study's folder (archive, eval_manifest.json)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default the study's {FULL['steps']}); give the same as the study run "
                        "you compare with (`reproduce --steps`)")
    p.add_argument("--runs", default=None, help="where the search runs go (default OUT/search)")
    p.add_argument("--results", default=None, help="JSON lines of the headline metrics (default RUNS/results.jsonl)")
    p.add_argument("--quick", action="store_true",
                   help="the quick demo's settings (tiny model, 12 steps; a study folder made with --quick): "
                        "checks the machinery only")
    args = p.parse_args(argv)
    if not args.name.replace("_", "").replace("-", "").isalnum():
        p.error(f"NAME must be letters, digits, _ and -: got {args.name!r}")
    try:
        override = json.loads(args.override)
    except json.JSONDecodeError as exc:
        p.error(f"OVERRIDE is not JSON ({exc}): quote it, e.g. '{{\"loss\": {{\"tau3\": 1.0}}}}'")
    if not isinstance(override, dict):
        p.error("OVERRIDE must be a JSON object of config sections")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be a positive number of training steps, got {args.steps}")
    out = Path(args.out)
    archive, manifest = out / "archive", out / "eval_manifest.json"
    if not (archive / "synth_truth.jsonl").is_file() or not manifest.is_file():
        p.error(f"{out} holds no study archive and evaluation manifest: run `make reproduce` or "
                f"`clinvla demo --out {out}` first")
    runs = Path(args.runs) if args.runs else out / "search"
    results = Path(args.results) if args.results else runs / "results.jsonl"
    runs.mkdir(parents=True, exist_ok=True)
    dataset = list(open_dataset(archive))
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings["steps"] = args.steps
    base = base_config(settings, quick=args.quick)
    cfg = _merge(_merge(_merge(base, {"train": {"seed": args.seed}}), RECIPE), override)
    t0 = time.perf_counter()
    model, info, history = train_run(f"x-{args.name}-seed{args.seed}", cfg, dataset, runs)
    result = evaluate_run(model, dataset, archive, manifest, args.seed, settings["per_class"])
    write_claims(runs / f"x-{args.name}-seed{args.seed}.json", result)
    last = [h for h in history if "loss" in h][-1]
    line = {"name": args.name, "seed": args.seed, "override": override, "train_s": round(info["seconds"]),
            "final_global": last.get("global"), "final_local": last.get("local"),
            "warnings": [h["warning"] for h in history if "warning" in h],
            **{k: round(result["metrics"][k], 4) for k in HEADLINE if k in result["metrics"]}}
    print(json.dumps(line))
    previous = results.read_text() if results.exists() else ""
    atomic_write_text(results, previous + json.dumps(line) + "\n")
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
