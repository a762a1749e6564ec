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
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data.dataset import Collate, StudyDataset, report_text
from .data.study import CLASSES_5X200, CLASSES_8X200, DatasetError, Study

PROTOCOLS = ("5x200", "8x200", "instance", "rsna")
MANIFEST_VERSION = 1


# ---- embeddings -----------------------------------------------------------------------------
@torch.no_grad()
def embed_studies(model, studies: Sequence[Study], device=None, batch_size: int = 64,
                  num_workers: int = 0) -> torch.Tensor:
    """(N, E) L2-normalised study embeddings (all present views), in the order given."""
    device = torch.device(device or next(model.parameters()).device)
    v = model.config.vision
    two = v.num_views == 2
    ds = StudyDataset(studies, v.image_size, v.pixel_mean, v.pixel_std, train=False,
                      two_views=two, need_reports=False)
    model.eval()
    out = []
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=Collate(None), num_workers=num_workers):
        emb = model.encode_images(
            batch["frontal"].to(device),
            batch["lateral"].to(device) if two else None,
            batch["lateral_present"].to(device) if two else None,
        )
        out.append(emb.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, texts: Sequence[str], device=None, batch_size: int = 128) -> torch.Tensor:
    """(N, E) L2-normalised text embeddings."""
    device = torch.device(device or next(model.parameters()).device)
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = model.tokenize(list(texts[i:i + batch_size]), device=device)
        out.append(model.encode_text((ids, mask)).float().cpu())
    return torch.cat(out)


# ---- metrics ----------------------------------------------------------------------------------
def precision_at_k(sim: torch.Tensor, query_labels: torch.Tensor, item_labels: torch.Tensor,
                   ks: Sequence[int], exclude_self: bool = False) -> dict[str, float]:
    """Mean fraction of the top-k items whose class equals the query's class."""
    if exclude_self:
        sim = sim.clone().fill_diagonal_(-float("inf"))
    kmax = min(max(ks), sim.shape[1])
    top = sim.topk(kmax, dim=1).indices
    hits = (item_labels[top] == query_labels[:, None]).float()
    return {f"P@{k}": hits[:, :min(k, kmax)].mean().item() for k in ks}


def recall_at_k(sim: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Instance retrieval: the i-th query's target is item i."""
    target = sim.diagonal()[:, None]
    rank = (sim > target).sum(dim=1)  # 0 = first
    return {f"R@{k}": (rank < k).float().mean().item() for k in ks}


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
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    return torch.tensor([classes.index(c) for _, c in pairs])


def _class_prompt_embeddings(model, classes, device) -> torch.Tensor:
    from .data.reports import PROMPTS

    rows = []
    for c in classes:
        emb = embed_texts(model, PROMPTS[c], device)
        rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def protocol_5x200(model, pairs, device) -> dict:
    labels = _labels(pairs, CLASSES_5X200)
    studies = [s for s, _ in pairs]
    img = embed_studies(model, studies, device)
    txt = embed_texts(model, [report_text(s.report) for s in studies], device)
    sim = img @ txt.t()
    res = {f"i2t_{k}": v for k, v in precision_at_k(sim, labels, labels, (5, 10, 100)).items()}
    res.update({f"instance_i2t_{k}": v for k, v in recall_at_k(sim, (1, 5, 10)).items()})
    res.update({f"instance_t2i_{k}": v for k, v in recall_at_k(sim.t(), (1, 5, 10)).items()})
    class_emb = _class_prompt_embeddings(model, CLASSES_5X200, device)
    pred = (img @ class_emb.t()).argmax(dim=1)
    res["zeroshot_accuracy"] = (pred == labels).float().mean().item()
    res["zeroshot_macro_f1"] = sum(f1_score(pred, labels, c) for c in range(len(CLASSES_5X200))) / len(CLASSES_5X200)
    res["n"] = len(pairs)
    return res


def protocol_8x200(model, pairs, query_pairs, device) -> dict:
    from .data.reports import QUERY_TEXTS

    labels = _labels(pairs, CLASSES_8X200)
    img = embed_studies(model, [s for s, _ in pairs], device)
    texts, text_labels = [], []
    for i, c in enumerate(CLASSES_8X200):
        texts += QUERY_TEXTS[c][:10]
        text_labels += [i] * len(QUERY_TEXTS[c][:10])
    txt = embed_texts(model, texts, device)
    res = {f"t2i_{k}": v for k, v in precision_at_k(txt @ img.t(), torch.tensor(text_labels), labels, (5, 10, 50)).items()}
    if query_pairs:
        q = embed_studies(model, [s for s, _ in query_pairs], device)
        res.update({f"i2i_{k}": v for k, v in
                    precision_at_k(q @ img.t(), _labels(query_pairs, CLASSES_8X200), labels, (5, 10, 50)).items()})
    res["n"] = len(pairs)
    res["n_queries_text"] = len(texts)
    res["n_queries_image"] = len(query_pairs)
    return res


def protocol_rsna(model, pairs, device) -> dict:
    """pairs: (study, "Pneumonia" | "Normal")."""
    from .data.reports import PROMPTS

    studies = [s for s, _ in pairs]
    labels = torch.tensor([1 if c == "Pneumonia" else 0 for _, c in pairs])
    img = embed_studies(model, studies, device)
    class_emb = torch.stack([F.normalize(embed_texts(model, PROMPTS[c], device).mean(0), dim=-1)
                             for c in ("No Finding", "Pneumonia")])
    logits = img @ class_emb.t() * float(model.temperatures()[0].detach())
    prob = logits.softmax(dim=1)[:, 1]
    pred = (prob >= 0.5).long()
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
) -> dict:
    """Runs the protocols; returns {"protocol": {metric: value}, "manifest": path or None}."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {', '.join(unknown)}; choose from {', '.join(PROTOCOLS)}")
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
    where = str(manifest_in or "manifest")

    def get_set(name, draw):
        if name in manifest["sets"]:
            return {k: resolve_manifest_entries(v, by_id, where) for k, v in manifest["sets"][name].items()}
        drawn = draw()
        manifest["sets"][name] = {k: [manifest_entry(s, c) for s, c in v] for k, v in drawn.items()}
        return drawn

    if "5x200" in protocols or "instance" in protocols:
        sets = get_set("5x200", lambda: {"candidates": draw_class_set(pool, CLASSES_5X200, per_class, seed)[0]})
        r = protocol_5x200(model, sets["candidates"], device)
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
        results["8x200"] = protocol_8x200(model, sets["candidates"], sets.get("queries", []), device)
    if "rsna" in protocols:
        rsna_studies = _load(rsna_data) if rsna_data is not None else pool
        rsna_by_id = {s.study_id: s for s in rsna_studies}
        if "rsna" in manifest["sets"]:
            pairs = resolve_manifest_entries(manifest["sets"]["rsna"]["candidates"], rsna_by_id, where)
        else:
            pairs = draw_rsna_set(rsna_studies, per_class, seed + 2)
            manifest["sets"]["rsna"] = {"candidates": [manifest_entry(s, c) for s, c in pairs]}
        results["rsna"] = protocol_rsna(model, pairs, device)
    if manifest_out:
        path = Path(manifest_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(path)
        results["manifest"] = str(path)
    return results


def _load(data) -> list[Study]:
    if isinstance(data, (str, Path)):
        from .data import open_dataset

        return list(open_dataset(data))
    return list(data)


@torch.no_grad()
def quick_validation(model, studies: Sequence[Study], device=None, limit: int = 256) -> dict:
    """Instance retrieval R@1/R@5 both ways on up to `limit` validation studies (during training)."""
    subset = [s for s in sorted(studies, key=lambda s: s.study_id) if s.report][:limit]
    if len(subset) < 2:
        return {}
    img = embed_studies(model, subset, device)
    txt = embed_texts(model, [report_text(s.report) for s in subset], device)
    sim = img @ txt.t()
    out = {f"i2t_{k}": v for k, v in recall_at_k(sim, (1, 5)).items()}
    out.update({f"t2i_{k}": v for k, v in recall_at_k(sim.t(), (1, 5)).items()})
    return out


def format_table(results: dict, title: str = "") -> str:
    """A readable table: one line per protocol metric."""
    lines = [title] if title else []
    for proto, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        items = [f"{k} {v:.3f}" if isinstance(v, float) and not math.isnan(v) else f"{k} {v}"
                 for k, v in metrics.items()]
        lines.append(f"{proto:>9}: " + ", ".join(items))
    return "\n".join(lines)
