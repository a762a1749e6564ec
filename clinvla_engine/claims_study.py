"""ClinVLA's three claims as ablations over several training seeds, on the synthetic test bed.

Used by ``clinvla demo`` (ClinVLA against the CLIP baseline, the seeds the time allows) and by
``make reproduce`` (``python -m benchmarks.reproduce``: every arm below over at least three seeds,
written to ``benchmarks/quality.md``).

Arms (each a config on top of the demo's training settings; same archive, steps, batch and data):

* ``clinvla``  the recipe: two views with an attention fusion (chosen by measurement at 1,000 steps over
  mean and gate: ``benchmarks/recipe_search.md``), lateral dropout (0.25), global + local loss
  on content words (ramped in over the first 100 steps), text heads trained from step 1 while the
  text tower is locked;
* ``clip``     the CLIP-style baseline: frontal view only, global loss only, no MIM decoder;
* ``views1``   claim 1's ablation: the recipe with the frontal view only (the same attention read-out,
  over the frontal's tokens, so that the arm differs from the recipe by the lateral alone);
* ``global``   claim 2's ablation: the recipe without the local loss;
* ``frozen``   claim 3: the recipe on an image tower pre-trained by ``clinvla pretrain`` (MAE on the
  archive's images, same seed) and then frozen, adapters + norms + heads trained;
* ``full``     claim 3's comparison: the same pre-trained tower fully fine-tuned, equal steps;
* ``clip_mae`` the CLIP baseline from the same pre-trained tower (its frontal view embedding), fully
  fine-tuned: ``full - clip_mae`` is ClinVLA against the baseline when both start pretrained, as in
  the paper, where every method starts from pretrained backbones.

Every arm and seed is scored by the classic protocols (``evaluate``: 5x200, instance, 8x200, on one
manifest shared by all) and the claims protocols (``eval_claims``: strata, laterality, pointing),
keeping the per-item values, so that each metric gets a mean and a 95% interval over training
seeds and evaluation items (``stats.seed_bootstrap``; one seed: over the items only) and each
comparison a paired interval of the difference. Besides the claims, ``full - clinvla`` reads what
the MAE pre-training alone changes, and ``full - clip_mae`` is the verdict's second comparison.
Each run's evaluation is kept with a key over everything it depends on (``evaluation_key``) and
reused while the key matches, so adding a comparison to a finished study re-evaluates nothing.
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .files import atomic_write_text, sha256_file


@dataclass(frozen=True)
class Arm:
    label: str
    overrides: dict
    pretrained: bool = False  # starts from this seed's `clinvla pretrain` run


# The recipe (what `clinvla` trains); the ablations change one thing each.
RECIPE = {
    # attention over the views' tokens: at 1,000 steps it was the only fusion that used the lateral
    # (the gate model scored the same with its lateral withheld; benchmarks/recipe_search.md)
    "vision": {"fusion": "attention"},
    "train": {"lateral_dropout": 0.25, "locked_text_heads": True},
    # tau3 (the scale of the local similarity) 1 instead of GLoRIA's 10: at 10 the local loss
    # starts at twice ln(batch) on the random patch features and falls to exactly ln(batch) by
    # making every study's region features alike (the local scores stop depending on the image),
    # which also flattened the global features of the two-view model (benchmarks/quality_gate_500_steps.md,
    # "Recipe search")
    "loss": {"local_words": "content", "local_ramp_steps": 100, "tau3": 1.0},
}
CLIP = {"vision": {"num_views": 1}, "loss": {"local_weight": 0.0, "mim_weight": 0.0},
        "decoder": {"enabled": False}}

ARMS = {
    "clinvla": Arm("ClinVLA (2 views, global + local)", RECIPE),
    "clip": Arm("CLIP baseline (frontal, global)", CLIP),
    "views1": Arm("ClinVLA, frontal only (claim 1)", {**RECIPE, "vision": {**RECIPE["vision"], "num_views": 1},
                                                     "train": {**RECIPE["train"], "lateral_dropout": 0.0}}),
    "global": Arm("ClinVLA, no local loss (claim 2)", {**RECIPE, "loss": {"local_weight": 0.0}}),
    "frozen": Arm("ClinVLA, MAE tower frozen + adapters (claim 3)",
                  {**RECIPE, "vision": {**RECIPE["vision"], "frozen": True}}, pretrained=True),
    "full": Arm("ClinVLA, MAE tower fully fine-tuned (claim 3)",
                {**RECIPE, "vision": {**RECIPE["vision"], "frozen": False}}, pretrained=True),
    "clip_mae": Arm("CLIP baseline, MAE tower fully fine-tuned",
                    {**CLIP, "vision": {**CLIP["vision"], "frozen": False}}, pretrained=True),
}
# (a, b, what the difference a - b tests)
COMPARISONS = (
    ("clinvla", "clip", "ClinVLA vs the CLIP baseline"),
    ("clinvla", "views1", "claim 1: the lateral view"),
    ("clinvla", "global", "claim 2: the local loss"),
    ("frozen", "full", "claim 3: frozen + adapters vs full fine-tuning"),
    # the recipe from the MAE tower against the recipe from scratch: the only difference is the
    # image tower's start (is the pre-training worth its run?)
    ("full", "clinvla", "MAE pre-training: the recipe from the MAE tower vs from scratch"),
    # both from the seed's MAE tower, both fully fine-tuned: the paper's setting (pretrained starts)
    ("full", "clip_mae", "ClinVLA vs the CLIP baseline, both from the MAE tower"),
)
# The comparisons the verdict judges against the paper's margins: (a, b, how the verdict names them)
VERDICT_COMPARISONS = (("clinvla", "clip", "from scratch"), ("full", "clip_mae", "both from the MAE tower"))
# The paper's margins (ClinVLA over the best similar method) as targets on the test bed.
TARGETS = {"8x200/t2i_P@10": 0.03, "5x200/i2t_P@10": 0.05}

# The rows the tables show, in order (every metric is kept in the JSON).
TABLE_METRICS = (
    "5x200/i2t_P@5", "5x200/i2t_P@10", "5x200/zeroshot_accuracy", "8x200/t2i_P@5", "8x200/t2i_P@10",
    "8x200/i2i_P@10", "instance/i2t_R@10",
    "strata/all/i2t_P@10", "strata/lateral_needed/i2t_P@10", "strata/lateral_needed/zeroshot_accuracy",
    "strata/frontal_favoured/i2t_P@10",
    "laterality/t2i_P@10", "laterality/i2t_P@10", "laterality/side_accuracy",
    "pointing/frontal/hit_rate", "pointing/frontal/random_hit_rate", "pointing/lateral/hit_rate",
    "pointing/lateral/random_hit_rate",
)


def _merge(base: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in extra.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def arm_config(arm: str, base: dict, pretrain_checkpoint: str | None = None) -> dict:
    """The training config of `arm`: the demo's `base` config with the arm's overrides."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    cfg = _merge(base, ARMS[arm].overrides)
    if ARMS[arm].pretrained:
        if not pretrain_checkpoint:
            raise ValueError(f"arm {arm!r} starts from a `clinvla pretrain` checkpoint: pass pretrain_checkpoint")
        cfg = _merge(cfg, {"vision": {"init_from": str(pretrain_checkpoint)}})
    return cfg


def _init_digest(cfg: dict) -> str | None:
    path = cfg.get("vision", {}).get("init_from")
    return sha256_file(Path(path)) if path else None


def same_run(saved: dict, cfg: dict) -> bool:
    """Whether a finished run's done.json (`saved`) is a run of `cfg`. The configs must be equal
    except for the path of ``vision.init_from``, whose file must instead hold the same bytes as when
    the run started (its SHA-256 is kept): the same study reached by another path (``--out`` relative
    or absolute, a moved folder) reuses its runs, and a run whose pretrained tower has been retrained
    since is redone. A run recorded without that digest matches by the path, as it was written."""
    a, b = json.loads(json.dumps(saved.get("config"))), json.loads(json.dumps(cfg))
    path_a, path_b = a.get("vision", {}).pop("init_from", None), b.get("vision", {}).pop("init_from", None)
    if a != b or (path_a is None) != (path_b is None):
        return False
    if path_b is None:
        return True
    if "init_from_sha256" not in saved:
        return path_a == path_b
    return Path(path_b).is_file() and saved["init_from_sha256"] == _init_digest(cfg)


def train_run(name: str, cfg: dict, studies, out: Path, *, pretrain: bool = False):
    """Trains (or reuses a finished run of the same config, see `same_run`) into out/name; returns
    (model, info, history). A killed run never leaves its "done" marker; a run with other settings is
    redone."""
    from .model import load_checkpoint
    from .train import train
    from .train.pretrain import pretrain as run_pretrain

    run = out / name
    done = run / "done.json"
    if done.exists() and same_run(json.loads(done.read_text()), cfg):
        print(f"[study] reusing the finished run {run}")
        info = json.loads(done.read_text())
    else:
        if run.exists():
            shutil.rmtree(run)  # an unfinished or differently configured run of the study's own
        what = "pre-training (MAE)" if pretrain else "training"
        print(f"[study] {what} {name} for {cfg['train']['max_steps']} steps")
        start = _init_digest(cfg)  # the tower it starts from, byte for byte
        result = (run_pretrain if pretrain else train)(cfg, studies, run, preload=True)
        info = {"config": cfg, "seconds": result.seconds, "samples_per_s": result.samples_per_s, "steps": result.steps}
        if start:
            info["init_from_sha256"] = start
        atomic_write_text(done, json.dumps(info))
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return load_checkpoint(run).eval(), info, history


def evaluate_run(model, dataset, archive: Path, manifest: Path, seed: int, per_class: int,
                 protocols: Sequence[str] = ("strata", "laterality", "pointing")) -> dict:
    """Classic + claims protocols of one trained model: {"seed", "metrics", "items", "classic"}."""
    from .eval_claims import evaluate_claims
    from .evaluate import evaluate

    first = not manifest.exists()
    classic = evaluate(model, dataset, protocols=("5x200", "8x200", "instance"), split="test", seed=0,
                       per_class=per_class, manifest_in=None if first else manifest,
                       manifest_out=manifest if first else None, keep_items=True)
    claims = evaluate_claims(model, dataset, archive / "synth_truth.jsonl", seed=seed, protocols=tuple(protocols))
    items = dict(classic.pop("items"))
    items.update(claims["items"])
    metrics = {name: sum(v["values"]) / len(v["values"]) for name, v in items.items()}
    return {"seed": seed, "metrics": metrics, "items": items,
            "classic": {k: v for k, v in classic.items() if isinstance(v, dict)},
            "skipped_studies": classic.get("skipped_studies", []) + claims.get("skipped_studies", [])}


@functools.lru_cache(maxsize=1)
def _package_digest() -> str:
    """SHA-256 over every .py file of this package (paths and contents): a cached evaluation is
    reused only by the code that wrote it, since a change anywhere (model, data, protocols) may
    change the numbers. Read once per process, so it describes the code this process runs."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def evaluation_key(run: Path, archive: Path, manifest: Path, seed: int, per_class: int,
                   protocols: Sequence[str]) -> str | None:
    """What an evaluation of the trained run `run` depends on: its checkpoint, the archive's truth
    file and study list, the evaluation manifest, the settings and the package's code. None while
    the manifest does not exist yet (the first evaluation writes it)."""
    files = [run / "model.safetensors", archive / "synth_truth.jsonl", archive / "synth_files.txt", manifest]
    if not all(f.is_file() for f in files):
        return None
    h = hashlib.sha256(json.dumps({"seed": seed, "per_class": per_class, "protocols": list(protocols)},
                                  sort_keys=True).encode())
    for f in files:
        h.update(f.name.encode() + sha256_file(f).encode())
    h.update(_package_digest().encode())
    return h.hexdigest()


def evaluate_run_cached(model, dataset, archive: Path, manifest: Path, seed: int, per_class: int, run: Path,
                        cache: Path, protocols: Sequence[str] = ("strata", "laterality", "pointing")) -> dict:
    """evaluate_run, kept in `cache` (JSON, with its evaluation_key) and reused while the key still
    matches: re-running the study to add a comparison costs no re-evaluation, and a changed
    checkpoint, manifest, archive or code is evaluated again."""
    from .eval_claims import write_claims

    key = evaluation_key(run, archive, manifest, seed, per_class, protocols)
    if key is not None and cache.is_file():
        try:
            saved = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
        if saved.get("evaluation_key") == key:
            print(f"[study] reusing the evaluation {cache} (same checkpoint, sets and code)")
            saved.pop("evaluation_key")
            return saved
    result = evaluate_run(model, dataset, archive, manifest, seed, per_class, protocols)
    if key is None:  # the first evaluation has just written the manifest
        key = evaluation_key(run, archive, manifest, seed, per_class, protocols)
    write_claims(cache, {**result, "evaluation_key": key})
    return result


def summarise(runs: Sequence[dict], n_resamples: int = 2000) -> dict:
    """{metric: {"mean", "ci", "per_seed"?, "n_seeds", "n"}} over the runs (seeds) of one arm."""
    from .stats import bootstrap_ci, seed_bootstrap

    out = {}
    for name in runs[0]["items"]:
        if not all(name in r["items"] for r in runs):
            continue
        if len(runs) >= 2:
            m = seed_bootstrap([r["items"][name]["values"] for r in runs], ids=[r["items"][name]["ids"] for r in runs],
                               n_resamples=n_resamples)
        else:
            m = bootstrap_ci(runs[0]["items"][name]["values"], n_resamples=n_resamples)
            m["per_seed"] = [m["mean"]]
        m["n_seeds"] = len(runs)
        out[name] = m
    return out


def compare(runs_a: Sequence[dict], runs_b: Sequence[dict], n_resamples: int = 2000) -> dict:
    """{metric: {"diff", "ci", "mean_a", "mean_b", ...}} for the metrics both arms hold on the same
    items: paired over the items (one seed each) or over seeds and items (>= 2 seeds each)."""
    from .stats import paired_bootstrap, seed_bootstrap_difference

    out = {}
    for name in runs_a[0]["items"]:
        if not all(name in r["items"] for r in list(runs_a) + list(runs_b)):
            continue
        ids_a = [r["items"][name]["ids"] for r in runs_a]
        ids_b = [r["items"][name]["ids"] for r in runs_b]
        if ids_a[0] != ids_b[0]:
            continue  # e.g. the lateral pointing game, which a one-view model never plays
        if len(runs_a) >= 2 and len(runs_b) >= 2:
            out[name] = seed_bootstrap_difference([r["items"][name]["values"] for r in runs_a],
                                                  [r["items"][name]["values"] for r in runs_b], ids_a, ids_b,
                                                  n_resamples=n_resamples)
        else:
            out[name] = paired_bootstrap(runs_a[0]["items"][name]["values"], runs_b[0]["items"][name]["values"],
                                         ids_a[0], ids_b[0], n_resamples=n_resamples)
    return out


def _cell(m: dict | None, signed: bool = False) -> str:
    if m is None:
        return "-"
    v = m["diff"] if "diff" in m else m["mean"]
    lo, hi = m["ci"]
    f = "+.3f" if signed else ".3f"
    return f"{v:{f}} [{lo:{f}}, {hi:{f}}]"


def table(summaries: dict, comparisons: dict | None = None, metrics: Sequence[str] = TABLE_METRICS) -> str:
    """Markdown: one row per metric, a column per arm (mean [95% CI]) and per comparison (a - b)."""
    arms = list(summaries)
    comparisons = comparisons or {}
    head = ["metric"] + [f"{ARMS[a].label if a in ARMS else a} ({next(iter(summaries[a].values()))['n_seeds']} seeds)"
                         for a in arms] + [f"{a} - {b}" for a, b in comparisons]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in metrics:
        if not any(name in summaries[a] for a in arms):
            continue
        row = [name] + [_cell(summaries[a].get(name)) for a in arms]
        row += [_cell(c.get(name), signed=True) for c in comparisons.values()]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdict(comparison: dict, start: str = "") -> list[str]:
    """One line per target metric: met when the difference reaches the paper's margin AND its
    interval lies above zero. start: how both arms started (e.g. "from scratch"), named in the line."""
    lines = []
    where = f" ({start})" if start else ""
    for name, margin in TARGETS.items():
        m = comparison.get(name)
        if m is None:
            lines.append(f"{name}{where}: not measured")
            continue
        met = m["diff"] >= margin and m["ci"][0] > 0
        lines.append(f"{name}{where}: ClinVLA - CLIP = {m['diff']:+.3f} [{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}] "
                     f"(target >= +{margin:.2f} with the interval above 0): {'met' if met else 'NOT met'}")
    return lines


def verdicts(comparisons: dict) -> list[str]:
    """The verdict lines of every VERDICT_COMPARISONS pair present in comparisons ({(a, b): compare()})."""
    return [line for a, b, start in VERDICT_COMPARISONS if (a, b) in comparisons
            for line in verdict(comparisons[(a, b)], start)]


def run_study(out: Path, dataset, archive: Path, base_config: dict, arms: Sequence[str], seeds: Sequence[int],
              per_class: int, pretrain_steps: int | None = None) -> dict:
    """Trains and evaluates every arm x seed (reusing finished runs), then summarises and compares.
    Writes out/study.json (summaries, comparisons, timings; the per-run items in out/eval/)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "eval_manifest.json"
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    infos: dict[str, list[dict]] = {a: [] for a in arms}
    models: dict[str, list] = {a: [] for a in arms}
    histories: dict[str, list] = {a: [] for a in arms}
    t0 = time.perf_counter()
    for seed in seeds:
        ckpt = None
        if any(ARMS[a].pretrained for a in arms):
            pcfg = _merge(base_config, {"train": {"seed": seed, "locked_text_steps": 0,
                                                  "max_steps": pretrain_steps or base_config["train"]["max_steps"]}})
            _, _, _ = train_run(f"pretrain-seed{seed}", pcfg, dataset, out, pretrain=True)
            ckpt = str(out / f"pretrain-seed{seed}" / "model.safetensors")
        for arm in arms:
            cfg = arm_config(arm, _merge(base_config, {"train": {"seed": seed}}), ckpt)
            model, info, history = train_run(f"{arm}-seed{seed}", cfg, dataset, out)
            print(f"[study] evaluating {arm} (seed {seed})")
            result = evaluate_run_cached(model, dataset, archive, manifest, seed, per_class,
                                         run=out / f"{arm}-seed{seed}", cache=out / "eval" / f"{arm}-seed{seed}.json")
            runs[arm].append(result)
            infos[arm].append(info)
            models[arm].append(model)
            histories[arm].append(history)
    summaries = {a: summarise(runs[a]) for a in arms}
    comparisons = {(a, b): compare(runs[a], runs[b]) for a, b, _ in COMPARISONS if a in arms and b in arms}
    study = {"arms": {a: {"label": ARMS[a].label, "config": arm_config(a, base_config, "PRETRAIN") if ARMS[a].pretrained
                          else arm_config(a, base_config),
                          "train_seconds": [i["seconds"] for i in infos[a]]} for a in arms},
             "seeds": list(seeds), "summaries": summaries,
             "comparisons": {f"{a} - {b}": c for (a, b), c in comparisons.items()},
             "verdict": verdicts(comparisons),
             "seconds": time.perf_counter() - t0}
    atomic_write_text(out / "study.json", json.dumps(study, indent=1))
    return {"study": study, "runs": runs, "models": models, "infos": infos, "histories": histories,
            "summaries": summaries, "comparisons": comparisons}
