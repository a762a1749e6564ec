"""``clinvla eval``: the retrieval and zero-shot protocols of the ClinVLA / ALTA / GLoRIA papers.

Protocols (classes from clinvla_engine.data.study):

* ``5x200``  CheXpert 5x200: 200 studies for each of Atelectasis, Cardiomegaly, Consolidation,
  Edema, Pleural Effusion, each positive for exactly that one of the five. Image-to-text
  Precision@5/10/100 over the 1000 reports (a hit = a report of the same class), and zero-shot
  classification with prompt ensembles (accuracy, macro-F1).
* ``8x200``  CheXpert 8x200 (ConVIRT): 200 studies exclusively positive for each of eight classes.
  Text-to-image Precision@5/10/50 with 10 query texts per class, image-to-image Precision@5/10/50
  with 10 held-apart query studies per class.
* ``instance``  Recall@1/5/10 of a study's own report (image-to-text) and vice versa, on the
  5x200 set.
* ``rsna``  RSNA Pneumonia zero-shot: pneumonia vs normal by prompt ensembles; AUROC, accuracy, F1.

Sets are drawn with a fixed seed and saved as a manifest (study ids and SHA-256 of every image
file), so that ``clinvla eval --manifest`` reproduces a result exactly, or refuses when a file
changed.

A study whose image cannot be decoded is left out of its set, logged, and listed in the results
(``skipped_studies``); evaluation stops only when more than ``max_bad_fraction`` of the studies
are bad. NaN or infinite embeddings are an EvaluationError naming the checkpoint, and ties in
every ranking count against the right answer (see precision_at_k, recall_at_k).

These protocols check the class only, on all studies alike. The protocols that can see ClinVLA's
claims on a synthetic archive (a lateral-needed stratum, laterality-aware retrieval, a pointing game
for the local alignment) and the confidence intervals over the evaluation set and across training
seeds are in clinvla_engine.eval_claims and clinvla_engine.stats.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data.dataset import DEFAULT_MAX_BAD_FRACTION, BadStudyLog, Collate, StudyDataset, report_text
from .data.study import CLASSES_5X200, CLASSES_8X200, DatasetError, Study
from . import files
from .eval_prompts import PROMPTS, QUERY_TEXTS
from .model.checkpoint import atomic_write_text

PROTOCOLS = ("5x200", "8x200", "instance", "rsna")
MANIFEST_VERSION = 1


# ---- embeddings -----------------------------------------------------------------------------
class EvaluationError(ValueError):
    """A model whose outputs cannot be scored (NaN or infinite embeddings); names the checkpoint."""


def model_source(model) -> str:
    """How to name `model` in an error: its checkpoint file when it was loaded from one."""
    if getattr(model, "engine_dir", None):
        return f"engine {model.engine_dir}"
    path = getattr(model, "checkpoint_path", None)
    return f"checkpoint {path}" if path else "the model (not loaded from a checkpoint file)"


def check_finite(emb: torch.Tensor, what: str, names: Sequence[str], source: str) -> None:
    """EvaluationError when a row of `emb` (N, E) is not finite: a NaN row would compare false
    with everything and, counted as a tie, rank anywhere; it means broken weights, never a score."""
    bad = ~torch.isfinite(emb).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise EvaluationError(
            f"{source} gives NaN or infinite {what} embeddings for {len(rows)} of {len(emb)} inputs "
            f"(e.g. {', '.join(str(names[i]) for i in rows[:3])}); its weights are corrupt or training diverged: "
            "evaluate an earlier checkpoint or retrain with a lower train.lr"
        )


def check_finite_weights(model, source: str | None = None) -> None:
    """EvaluationError naming the checkpoint and the first tensors with NaN or infinite values. Not
    every such weight shows in the embeddings (a NaN in one attention logit can vanish in the
    softmax), so the weights are checked too: a model holding one is broken either way."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise EvaluationError(
            f"{source or model_source(model)} has NaN or infinite values in {len(bad)} weight tensor(s) "
            f"({', '.join(bad[:3])}); its training diverged or the file was written from a broken model: "
            "evaluate an earlier checkpoint or retrain with a lower train.lr"
        )


def _embed_batches(model, ds: StudyDataset, device, batch_size: int, num_workers: int, bad: BadStudyLog | None):
    """(embeddings (M, E), kept dataset indices) over `ds`, recording skipped studies in `bad`."""
    v = model.config.vision
    two = v.num_views == 2
    model.eval()
    out, kept = [], []
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=Collate(None), num_workers=num_workers):
        if bad is not None and batch.get("bad"):
            bad.record(batch["bad"])
        if "frontal" not in batch:
            continue
        emb = model.encode_images(
            batch["frontal"].to(device),
            batch["lateral"].to(device) if two else None,
            batch["lateral_present"].to(device) if two else None,
        )
        out.append(emb.float().cpu())
        kept += batch["index"].tolist()
    width = model.config.embed_dim
    return (torch.cat(out) if out else torch.empty(0, width)), kept


def _study_dataset(model, studies, on_bad: str) -> StudyDataset:
    v = model.config.vision
    return StudyDataset(studies, v.image_size, v.pixel_mean, v.pixel_std, train=False,
                        two_views=v.num_views == 2, need_reports=False, on_bad=on_bad)


@torch.no_grad()
def embed_studies(model, studies: Sequence[Study], device=None, batch_size: int = 64,
                  num_workers: int = 0) -> torch.Tensor:
    """(N, E) L2-normalised study embeddings (all present views), in the order given. An image
    that cannot be decoded raises (see embed_available_studies to skip such studies)."""
    device = torch.device(device or next(model.parameters()).device)
    emb, _ = _embed_batches(model, _study_dataset(model, studies, "raise"), device, batch_size, num_workers, None)
    check_finite(emb, "image", [s.study_id for s in studies], model_source(model))
    return emb


@torch.no_grad()
def embed_available_studies(model, studies: Sequence[Study], bad: BadStudyLog, device=None,
                            batch_size: int = 64, num_workers: int = 0,
                            source: str | None = None) -> tuple[torch.Tensor, list[int]]:
    """(M, E) embeddings of the studies whose images decode, and their positions in `studies`;
    the others are logged in `bad`, which raises once their share passes its threshold."""
    device = torch.device(device or next(model.parameters()).device)
    bad.expect(s.study_id for s in studies)
    emb, kept = _embed_batches(model, _study_dataset(model, studies, "skip"), device, batch_size, num_workers, bad)
    check_finite(emb, "image", [studies[i].study_id for i in kept], source or model_source(model))
    return emb, kept


@torch.no_grad()
def embed_texts(model, texts: Sequence[str], device=None, batch_size: int = 128,
                source: str | None = None) -> torch.Tensor:
    """(N, E) L2-normalised text embeddings."""
    device = torch.device(device or next(model.parameters()).device)
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = model.tokenize(list(texts[i:i + batch_size]), device=device)
        out.append(model.encode_text((ids, mask)).float().cpu())
    emb = torch.cat(out)
    check_finite(emb, "text", [repr(t[:40]) for t in texts], source or model_source(model))
    return emb


# ---- metrics ----------------------------------------------------------------------------------
# Ties are scored pessimistically, everywhere: an item with the same score as the right answer
# ranks ahead of it. Otherwise a collapsed model (every embedding the same) would find every
# study's own report "first" and score R@1 = 1; with this rule it scores what it knows, nothing.
def _check_scores(sim: torch.Tensor) -> None:
    if not torch.isfinite(sim).all():
        raise EvaluationError(
            "the similarity matrix has NaN or infinite entries; rank metrics are undefined for them "
            "(check_finite on the embeddings names the model that produced them)"
        )


def precision_at_k_per_query(sim: torch.Tensor, query_labels: torch.Tensor, item_labels: torch.Tensor,
                             ks: Sequence[int], exclude_self: bool = False) -> dict[str, torch.Tensor]:
    """Per query (Q,) float: the fraction of its top-k items whose class equals the query's class
    (what precision_at_k averages; the per-item values a bootstrap over the queries resamples).

    sim: (Q, N) scores. Among items of equal score, those of another class are ranked first
    (pessimistic), so the result never depends on the order of the items."""
    _check_scores(sim)
    if exclude_self:
        sim = sim.clone().fill_diagonal_(-float("inf"))
    kmax = min(max(ks), sim.shape[1])
    hit_all = item_labels[None, :] == query_labels[:, None]  # (Q, N) bool
    # two stable sorts: misses before hits, then by score (descending); stability keeps the misses
    # ahead of the hits that share their score
    by_hit = torch.sort(hit_all.to(torch.int8), dim=1, stable=True).indices
    by_score = torch.sort(sim.gather(1, by_hit), dim=1, descending=True, stable=True).indices
    hits = hit_all.gather(1, by_hit.gather(1, by_score))[:, :kmax].float()
    return {f"P@{k}": hits[:, :min(k, kmax)].mean(dim=1) for k in ks}


def precision_at_k(sim: torch.Tensor, query_labels: torch.Tensor, item_labels: torch.Tensor,
                   ks: Sequence[int], exclude_self: bool = False) -> dict[str, float]:
    """Mean fraction of the top-k items whose class equals the query's class (the mean over the
    queries of precision_at_k_per_query; ties pessimistic, see there)."""
    per = precision_at_k_per_query(sim, query_labels, item_labels, ks, exclude_self)
    return {k: v.mean().item() for k, v in per.items()}


def recall_at_k(sim: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Instance retrieval: the i-th query's target is item i. sim: (Q, N) with N >= Q.

    rank = the number of other items scoring at least as high as the target (0 = first), so a
    tie counts against the target."""
    _check_scores(sim)
    target = sim.diagonal()[:, None]
    rank = (sim >= target).sum(dim=1) - 1  # minus the target itself
    return {f"R@{k}": (rank < k).float().mean().item() for k in ks}


def pessimistic_argmax(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Predicted class per row of `scores` (N, C); when the true class ties for the top score with
    another class, the prediction is that other class (a tie is never a correct answer)."""
    top = scores.max(dim=1, keepdim=True).values
    wrong_tied = scores == top
    wrong_tied[torch.arange(len(labels)), labels] = False
    return torch.where(wrong_tied.any(dim=1), wrong_tied.to(torch.int8).argmax(dim=1), scores.argmax(dim=1))


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney statistic, ties counted half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().sum()
    ties = (pos[:, None] == neg[None, :]).float().sum()
    return ((greater + 0.5 * ties) / (len(pos) * len(neg))).item()


def f1_score(pred: torch.Tensor, labels: torch.Tensor, positive: int = 1) -> float:
    tp = ((pred == positive) & (labels == positive)).sum().item()
    fp = ((pred == positive) & (labels != positive)).sum().item()
    fn = ((pred != positive) & (labels == positive)).sum().item()
    return 2 * tp / max(1, 2 * tp + fp + fn)


# ---- protocol sets and manifests ---------------------------------------------------------------
def exclusive_class(study: Study, classes: Sequence[str]) -> str | None:
    """The class when exactly one of `classes` is positive (1.0) in the study's labels."""
    pos = [c for c in classes if study.labels.get(c) == 1.0]
    return pos[0] if len(pos) == 1 else None


def sha256_file(path: Path | str | None) -> str | None:
    """The file's SHA-256 (None for a missing view)."""
    return None if path is None else files.sha256_file(path)


def draw_class_set(studies: Sequence[Study], classes: Sequence[str], per_class: int, seed: int,
                   queries_per_class: int = 0, need_reports: bool = True) -> tuple[list[tuple[Study, str]], list[tuple[Study, str]]]:
    """(candidates, queries): per class `per_class` candidates and `queries_per_class` other studies."""
    rng = random.Random(seed)
    by_class: dict[str, list[Study]] = {c: [] for c in classes}
    for s in sorted(studies, key=lambda s: s.study_id):
        if need_reports and not (s.report and s.report.strip()):
            continue
        c = exclusive_class(s, classes)
        if c is not None:
            by_class[c].append(s)
    candidates, queries = [], []
    short = []
    for c in classes:
        pool = by_class[c]
        rng.shuffle(pool)
        want = per_class + queries_per_class
        if len(pool) < want:
            short.append(f"{c}: {len(pool)} of {want}")
        n_q = min(queries_per_class, len(pool) // 5)
        queries += [(s, c) for s in pool[:n_q]]
        candidates += [(s, c) for s in pool[n_q:n_q + per_class]]
    if short:
        import warnings

        warnings.warn("protocol set smaller than asked (" + "; ".join(short) + ")", stacklevel=2)
    if not candidates:
        raise DatasetError(f"no study is exclusively positive for any of {', '.join(classes)} in this split")
    return candidates, queries


def manifest_entry(study: Study, cls: str) -> dict:
    return {
        "study_id": study.study_id,
        "class": cls,
        "frontal": str(study.frontal),
        "frontal_sha256": sha256_file(study.frontal),
        "lateral": str(study.lateral) if study.lateral else None,
        "lateral_sha256": sha256_file(study.lateral),
    }


def resolve_manifest_entries(entries: list[dict], by_id: dict[str, Study], where: str) -> list[tuple[Study, str]]:
    """The studies a manifest names, after checking that every image file still has its hash."""
    out = []
    for e in entries:
        s = by_id.get(e["study_id"])
        if s is None:
            raise DatasetError(f"{where}: study {e['study_id']} is not in the dataset")
        for view, path in (("frontal", s.frontal), ("lateral", s.lateral)):
            expected = e.get(f"{view}_sha256")
            if expected and sha256_file(path) != expected:
                raise DatasetError(
                    f"{where}: the {view} image of study {e['study_id']} ({path}) changed since the manifest "
                    "was written; the result would not be reproducible"
                )
        out.append((s, e["class"]))
    return out


# ---- protocols --------------------------------------------------------------------------------
def _labels(pairs, classes) -> torch.Tensor:
    return torch.tensor([classes.index(c) for _, c in pairs], dtype=torch.long)


def _class_prompt_embeddings(model, classes, device) -> torch.Tensor:
    rows = []
    for c in classes:
        emb = embed_texts(model, PROMPTS[c], device)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def _embed_pairs(model, pairs, device, bad: BadStudyLog):
    """Embeddings of the pairs' studies that decode, and those pairs."""
    emb, kept = embed_available_studies(model, [s for s, _ in pairs], bad, device)
    if pairs and not kept:  # only reachable with max_bad_fraction = 1: nothing is left to score
        raise DatasetError(
            f"none of the {len(pairs)} studies of {bad.where} has an image that can be decoded "
            f"(first: {bad.entries()[0]['path']}: {bad.entries()[0]['reason']}); check the files"
        )
    return emb, [pairs[i] for i in kept]


def _keep(items: dict | None, prefix: str, ids: Sequence[str], per: dict[str, torch.Tensor]) -> None:
    """Stores per-item values (what a bootstrap resamples) as items[f"{prefix}/{metric}"]."""
    if items is not None:
        for k, v in per.items():
            items[f"{prefix}/{k}"] = {"ids": list(ids), "values": [float(x) for x in v.tolist()]}


def _instance_hits(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Per query: 1.0 when its own item (the diagonal) is within the top k, ties against it."""
    target = sim.diagonal()[:, None]
    rank = (sim >= target).sum(dim=1) - 1
    return (rank < k).float()


def protocol_5x200(model, pairs, device, bad: BadStudyLog | None = None, items: dict | None = None) -> dict:
    """items: None, or a dict that receives the per-study values of every metric
    ("5x200/i2t_P@5", "instance/i2t_R@1", ...: {"ids", "values"}) for confidence intervals."""
    bad = bad if bad is not None else BadStudyLog(where="the 5x200 set")
    img, pairs = _embed_pairs(model, pairs, device, bad)
    labels = _labels(pairs, CLASSES_5X200)
    studies = [s for s, _ in pairs]
    ids = [s.study_id for s in studies]
    txt = embed_texts(model, [report_text(s.report) for s in studies], device)
    sim = img @ txt.t()
    per = precision_at_k_per_query(sim, labels, labels, (5, 10, 100))
    res = {f"i2t_{k}": v.mean().item() for k, v in per.items()}
    _keep(items, "5x200", ids, {f"i2t_{k}": v for k, v in per.items()})
    res.update({f"instance_i2t_{k}": v for k, v in recall_at_k(sim, (1, 5, 10)).items()})
    res.update({f"instance_t2i_{k}": v for k, v in recall_at_k(sim.t(), (1, 5, 10)).items()})
    _keep(items, "instance", ids, {f"i2t_R@{k}": _instance_hits(sim, k) for k in (1, 5, 10)})
    _keep(items, "instance", ids, {f"t2i_R@{k}": _instance_hits(sim.t(), k) for k in (1, 5, 10)})
    class_emb = _class_prompt_embeddings(model, CLASSES_5X200, device)
    pred = pessimistic_argmax(img @ class_emb.t(), labels)
    res["zeroshot_accuracy"] = (pred == labels).float().mean().item()
    _keep(items, "5x200", ids, {"zeroshot_accuracy": (pred == labels).float()})
    res["zeroshot_macro_f1"] = sum(f1_score(pred, labels, c) for c in range(len(CLASSES_5X200))) / len(CLASSES_5X200)
    res["n"] = len(pairs)
    return res


def protocol_8x200(model, pairs, query_pairs, device, bad: BadStudyLog | None = None, items: dict | None = None) -> dict:
    """items: as protocol_5x200 (per text query and per query study)."""
    bad = bad if bad is not None else BadStudyLog(where="the 8x200 set")
    img, pairs = _embed_pairs(model, pairs, device, bad)
    labels = _labels(pairs, CLASSES_8X200)
    texts, text_labels, text_ids = [], [], []
    for i, c in enumerate(CLASSES_8X200):
        texts += QUERY_TEXTS[c][:10]
        text_labels += [i] * len(QUERY_TEXTS[c][:10])
        text_ids += [f"{c}: {t}" for t in QUERY_TEXTS[c][:10]]
    txt = embed_texts(model, texts, device)
    per = precision_at_k_per_query(txt @ img.t(), torch.tensor(text_labels), labels, (5, 10, 50))
    res = {f"t2i_{k}": v.mean().item() for k, v in per.items()}
    _keep(items, "8x200", text_ids, {f"t2i_{k}": v for k, v in per.items()})
    if query_pairs:
        q, query_pairs = _embed_pairs(model, query_pairs, device, bad)
        per = precision_at_k_per_query(q @ img.t(), _labels(query_pairs, CLASSES_8X200), labels, (5, 10, 50))
        res.update({f"i2i_{k}": v.mean().item() for k, v in per.items()})
        _keep(items, "8x200", [s.study_id for s, _ in query_pairs], {f"i2i_{k}": v for k, v in per.items()})
    res["n"] = len(pairs)
    res["n_queries_text"] = len(texts)
    res["n_queries_image"] = len(query_pairs)
    return res


def protocol_rsna(model, pairs, device, bad: BadStudyLog | None = None) -> dict:
    """pairs: (study, "Pneumonia" | "Normal")."""
    bad = bad if bad is not None else BadStudyLog(where="the RSNA set")
    img, pairs = _embed_pairs(model, pairs, device, bad)
    labels = torch.tensor([1 if c == "Pneumonia" else 0 for _, c in pairs])
    class_emb = torch.stack([F.normalize(embed_texts(model, PROMPTS[c], device).mean(0), dim=-1)
                             for c in ("No Finding", "Pneumonia")])
    logits = img @ class_emb.t() * float(model.temperatures()[0].detach())
    prob = logits.softmax(dim=1)[:, 1]
    pred = (prob > 0.5).long()
    pred = torch.where(prob == 0.5, 1 - labels, pred)  # a tie is never a correct answer
    return {"auroc": auroc(prob, labels), "accuracy": (pred == labels).float().mean().item(),
            "f1": f1_score(pred, labels), "n": len(pairs)}


def draw_rsna_set(studies: Sequence[Study], per_class: int, seed: int) -> list[tuple[Study, str]]:
    rng = random.Random(seed)
    pos = sorted((s for s in studies if s.labels.get("Pneumonia") == 1.0), key=lambda s: s.study_id)
    neg = sorted((s for s in studies if s.labels.get("Pneumonia") == 0.0 and s.meta.get("class", "Normal") == "Normal"),
                 key=lambda s: s.study_id)
    rng.shuffle(pos)
    rng.shuffle(neg)
    pairs = [(s, "Pneumonia") for s in pos[:per_class]] + [(s, "Normal") for s in neg[:per_class]]
    if not pairs:
        raise DatasetError("the RSNA protocol found no study with a Pneumonia label of 1 or 0")
    return pairs


def evaluate(
    model,
    data: "str | Path | Sequence[Study]",
    protocols: Sequence[str] = ("5x200", "8x200", "instance"),
    split: str = "test",
    seed: int = 0,
    per_class: int = 200,
    queries_per_class: int = 10,
    manifest_in: str | Path | None = None,
    manifest_out: str | Path | None = None,
    rsna_data: "str | Path | Sequence[Study] | None" = None,
    device=None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    keep_items: bool = False,
) -> dict:
    """Runs the protocols; returns {"protocol": {metric: value}, "manifest": path or None,
    "skipped_studies": [{"study_id", "path", "reason"}, ...] (the studies that could not be decoded)}.
    keep_items=True adds "items": {"protocol/metric": {"ids", "values"}}, the per-query values of
    the 5x200, instance and 8x200 metrics, for bootstrap intervals (clinvla_engine.stats)."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
    check_finite_weights(model)
    studies = _load(data)
    pool = [s for s in studies if (s.split or "train") == split] if split != "all" else studies
    if not pool:
        raise DatasetError(f"the dataset has no studies in split {split!r}; use --split train|validate|test|all")
    by_id = {s.study_id: s for s in studies}
    manifest: dict = {"version": MANIFEST_VERSION, "seed": seed, "split": split, "per_class": per_class, "sets": {}}
    if manifest_in:
        manifest = json.loads(Path(manifest_in).read_text())
        if manifest.get("version") != MANIFEST_VERSION:
            raise DatasetError(f"manifest {manifest_in}: version {manifest.get('version')} is not {MANIFEST_VERSION}")
    results: dict = {}
    items: dict | None = {} if keep_items else None
    where = str(manifest_in or "manifest")
    bad = BadStudyLog(max_bad_fraction, where=f"the evaluation sets of {data if isinstance(data, (str, Path)) else 'the dataset'}")

    def get_set(name, draw):
        if name in manifest["sets"]:
            return {k: resolve_manifest_entries(v, by_id, where) for k, v in manifest["sets"][name].items()}
        drawn = draw()
        manifest["sets"][name] = {k: [manifest_entry(s, c) for s, c in v] for k, v in drawn.items()}
        return drawn

    if "5x200" in protocols or "instance" in protocols:
        sets = get_set("5x200", lambda: {"candidates": draw_class_set(pool, CLASSES_5X200, per_class, seed)[0]})
        r = protocol_5x200(model, sets["candidates"], device, bad, items)
        if "5x200" in protocols:
            results["5x200"] = {k: v for k, v in r.items() if not k.startswith("instance")}
        if "instance" in protocols:
            results["instance"] = {k[len("instance_"):]: v for k, v in r.items() if k.startswith("instance")}
            results["instance"]["n"] = r["n"]
    if "8x200" in protocols:
        def draw8():
            cand, q = draw_class_set(pool, CLASSES_8X200, per_class, seed + 1, queries_per_class)
            return {"candidates": cand, "queries": q}

        sets = get_set("8x200", draw8)
        results["8x200"] = protocol_8x200(model, sets["candidates"], sets.get("queries", []), device, bad, items)
    if "rsna" in protocols:
        rsna_studies = _load(rsna_data) if rsna_data is not None else pool
        rsna_by_id = {s.study_id: s for s in rsna_studies}
        if "rsna" in manifest["sets"]:
            pairs = resolve_manifest_entries(manifest["sets"]["rsna"]["candidates"], rsna_by_id, where)
        else:
            pairs = draw_rsna_set(rsna_studies, per_class, seed + 2)
            manifest["sets"]["rsna"] = {"candidates": [manifest_entry(s, c) for s, c in pairs]}
        results["rsna"] = protocol_rsna(model, pairs, device, bad)
    if manifest_out:
        path = Path(manifest_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(manifest, indent=1))
        results["manifest"] = str(path)
    results["skipped_studies"] = bad.entries()
    if items is not None:
        wanted = {"5x200", "instance", "8x200"} & set(protocols)
        results["items"] = {k: v for k, v in items.items() if k.split("/")[0] in wanted}
    return results


def _load(data) -> list[Study]:
    if isinstance(data, (str, Path)):
        from .data import open_dataset

        return list(open_dataset(data))
    return list(data)


@torch.no_grad()
def quick_validation(model, studies: Sequence[Study], device=None, limit: int = 256,
                     bad: BadStudyLog | None = None, source: str | None = None) -> dict:
    """Instance retrieval R@1/R@5 both ways on up to `limit` validation studies (during training).

    `bad` logs the studies that cannot be decoded (default: the default threshold); `source`
    names the model in errors (training passes its output folder and step)."""
    subset = [s for s in sorted(studies, key=lambda s: s.study_id) if s.report][:limit]
    if len(subset) < 2:
        return {}
    bad = bad if bad is not None else BadStudyLog(where="the validation split")
    img, kept = embed_available_studies(model, subset, bad, device, source=source)
    subset = [subset[i] for i in kept]
    if len(subset) < 2:
        return {}
    txt = embed_texts(model, [report_text(s.report) for s in subset], device, source=source)
    sim = img @ txt.t()
    out = {f"i2t_{k}": v for k, v in recall_at_k(sim, (1, 5)).items()}
    out.update({f"t2i_{k}": v for k, v in recall_at_k(sim.t(), (1, 5)).items()})
    return out


def format_table(results: dict, title: str = "") -> str:
    """A readable table: one line per protocol metric, then the skipped studies."""
    lines = [title] if title else []
    for proto, metrics in results.items():
        if not isinstance(metrics, dict) or proto == "items":
            continue
        items = [f"{k} {v:.3f}" if isinstance(v, float) and not math.isnan(v) else f"{k} {v}"
                 for k, v in metrics.items()]
        lines.append(f"{proto:>9}: " + ", ".join(items))
    skipped = results.get("skipped_studies") or []
    if skipped:
        lines.append(f"  skipped: {len(skipped)} studies whose images cannot be decoded, e.g. "
                     + "; ".join(f"{e['study_id']} ({e['path']}: {e['reason']})" for e in skipped[:3]))
    return "\n".join(lines)
