"""Evaluation that can see ClinVLA's claims, on a synthetic archive whose truth file says what was drawn.

ClinVLA claims that (1) the lateral view helps, (2) word-to-region (local) alignment helps on top
of the global one. The classic protocols (clinvla_engine.evaluate) check only the class, on all
studies alike, with one seed; they cannot see either claim. This module scores, on one split
(``test`` by default) of a synthetic archive and its ``synth_truth.jsonl``:

``strata``  The per-study image metrics of the class protocols, restricted to strata of studies.
    The set: every study of the split exclusively positive (its report's labels) for one class with
    zero-shot prompts (eval_prompts.PROMPTS). Per study: image->text P@5/P@10 over the set's
    reports (a hit = a report of the same class) and the zero-shot answer over the set's classes.
    Strata: ``all``; ``lateral_needed`` (a study with a lateral view and a finding whose truth says
    ``lateral_needed``); ``frontal_favoured`` (no lateral-needed finding, and one that the truth
    marks ``frontal_favoured``, or, where the archive has no such field, that is visible on the
    frontal view and not on the lateral). Metric ``strata/<stratum>/<metric>``.
``laterality``  Laterality-aware retrieval: a hit needs the right class AND the right side. The
    set: studies exclusively positive for one class with side templates
    (eval_prompts.LATERALITY_QUERIES) whose truth has one finding of that class, on the left or the
    right, and whose report names that side (and not the other). Text->image: the side templates
    of every (class, side) in the set as queries; image->text: each study against the set's
    reports. P@5/P@10 by (class, side) and, for reference, by class alone (``*_class_P@k``), and
    ``side_accuracy``: the study scores the templates of its own side above the same templates
    with the other side (a prompt-ensemble two-way choice; chance 0.5).
``pointing``  The pointing game for the local alignment. For every drawn finding with a box in a
    view the model sees (``bboxes_frontal`` / ``bbox_frontal`` on the frontal, ``bbox_lateral`` on
    the lateral), the model reads the finding's phrase (eval_prompts.finding_phrase, e.g. "right
    pleural effusion"; or the study's report with ``pointing_text="report"``) and the attention of
    the class word (eval_prompts.FINDING_WORDS) over the regions of that view is computed exactly
    as the local loss does (GLoRIA: softmax over the real words of a[m, j] = r_m . e_j, times tau1,
    softmax over the regions; see word_region_attention). A hit: the peak region's patch cell
    intersects a box of the finding (several regions tied at the peak are a hit only when all of
    them do: ties count against the model). Also the attention mass inside the box cells. The
    random-peak baseline picks a region uniformly at random per finding (seeded), scored the same
    way (``random_hit_rate``), beside its expectation, the share of the view's cells that meet the
    box (``random_mass_in_box``, which is also the mass a uniform attention puts in the box).
    Metric ``pointing/<view>/<metric>``, view = frontal | lateral | all.

Every metric is a mean over items (queries, studies, findings); a result keeps the per-item values
(``items``) with a percentile bootstrap interval over them (clinvla_engine.stats), so that
``aggregate_runs`` can put several training seeds together (mean, 95% interval over seeds and items,
the per-seed values) and ``compare_claims`` can give the paired difference between two models on
the same items. ``format_claims_table`` renders either as Markdown.

Truth fields are read defensively: an archive written before a field existed makes the protocol
that needs it refuse with a ClaimsError naming the archive's synth version and the fix (regenerate),
never a number computed from a guess.
"""
from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .data.archive import SYNTH_MANIFEST
from .data.dataset import DEFAULT_MAX_BAD_FRACTION, BadStudyLog, Collate, StudyDataset, report_text
from .data.study import CHEXPERT_COLUMNS, CLASSES, DatasetError, Study
from .eval_prompts import FINDING_WORDS, LATERALITY_QUERIES, PROMPTS, SIDES, finding_phrase, laterality_queries
from .evaluate import (
    EvaluationError,
    check_finite,
    check_finite_weights,
    embed_texts,
    model_source,
    pessimistic_argmax,
    precision_at_k_per_query,
)
from .stats import DEFAULT_RESAMPLES, StatsError, bootstrap_ci, paired_bootstrap, seed_bootstrap, seed_bootstrap_difference

CLAIM_PROTOCOLS = ("strata", "laterality", "pointing")
TRUTH_FILE = "synth_truth.jsonl"  # the generator's name for it (data.synth.TRUTH); not imported: data/synth is a test bed
STRATA = ("all", "lateral_needed", "frontal_favoured")
POINTING_VIEWS = ("frontal", "lateral", "all")
_STRATA_METRICS = ("i2t_P@5", "i2t_P@10", "zeroshot_accuracy")
_LATERALITY_METRICS = ("t2i_P@5", "t2i_P@10", "t2i_class_P@5", "t2i_class_P@10",
                       "i2t_P@5", "i2t_P@10", "i2t_class_P@5", "i2t_class_P@10", "side_accuracy")
_POINTING_METRICS = ("hit_rate", "mass_in_box", "random_hit_rate", "random_mass_in_box")
# Every metric name a result can hold, in table order (the demo and benchmarks/quality.md print them).
METRICS = (tuple(f"strata/{s}/{m}" for s in STRATA for m in _STRATA_METRICS)
           + tuple(f"laterality/{m}" for m in _LATERALITY_METRICS)
           + tuple(f"pointing/{v}/{m}" for v in POINTING_VIEWS for m in _POINTING_METRICS))


class ClaimsError(ValueError):
    """A claims protocol that cannot run on this archive or model; the message names the fix."""


# ---- truth -------------------------------------------------------------------------------------
class Truth:
    """``synth_truth.jsonl`` of a synthetic archive: study_id -> record, plus the archive's synth
    version and image size (from the ``synth_manifest.json`` beside it)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            self.path = self.path / TRUTH_FILE
        if not self.path.is_file():
            raise ClaimsError(f"truth file {self.path} does not exist; the claims protocols need the "
                              f"{TRUTH_FILE} that the synthetic archive generator writes beside the archive")
        self.records: dict[str, dict] = {}
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.records[str(rec["study_id"])] = rec
                if not isinstance(rec.get("findings"), list):
                    raise KeyError("findings")
            except (ValueError, KeyError, TypeError) as exc:
                raise ClaimsError(f"{self.path} line {n} is not a truth record ({type(exc).__name__}: {exc}); "
                                  "the file is damaged: regenerate the archive") from None
        manifest = self.path.parent / SYNTH_MANIFEST
        self.manifest: dict = {}
        if manifest.is_file():
            try:
                self.manifest = json.loads(manifest.read_text())
            except ValueError:
                self.manifest = {}
        self.version = str(self.manifest.get("version", "unknown"))

    def image_size(self) -> int:
        size = self.manifest.get("size")
        if not isinstance(size, int) or size <= 0:
            raise ClaimsError(f"{self.path.parent / SYNTH_MANIFEST} gives no image size; the boxes of {self.path} "
                              "are in pixels of the written images, so the pointing game needs it: regenerate the archive")
        return size

    def require(self, fields: Iterable[str], records: Iterable[dict], protocol: str, alternative: str = "") -> None:
        """ClaimsError when a finding of `records` lacks one of `fields`."""
        for rec in records:
            for f in rec["findings"]:
                missing = [k for k in fields if k not in f]
                if missing:
                    raise ClaimsError(
                        f"{self.path} (synth archive version {self.version}) has no {', '.join(map(repr, missing))} "
                        f"in its findings (e.g. study {rec['study_id']}), which the {protocol!r} claims protocol needs; "
                        "the archive was written by an older generator: regenerate it (clinvla synth or "
                        "clinvla_engine.data.synth.generate_archive) and retrain on it, or leave "
                        f"{protocol!r} out of protocols{alternative}")


# ---- encoding ----------------------------------------------------------------------------------
def _two_views(model, views: str) -> bool:
    if views not in ("all", "frontal"):
        raise ValueError(f"views must be 'all' (every view the model takes) or 'frontal', got {views!r}")
    return model.config.vision.num_views == 2 and views == "all"


@torch.no_grad()
def _encode_studies(model, studies: Sequence[Study], device, bad: BadStudyLog, views: str, local: bool,
                    batch_size: int = 32):
    """(global (M, E), kept positions in `studies`, regions: list of {view: (P, E)} per kept study
    or None). Undecodable studies are logged in `bad`."""
    v = model.config.vision
    two = _two_views(model, views)
    ds = StudyDataset(list(studies), v.image_size, v.pixel_mean, v.pixel_std, train=False, two_views=two,
                      need_reports=False, on_bad="skip")
    bad.expect(s.study_id for s in studies)
    model.eval()
    n_patches = model.visual.num_patches
    embs, kept, regions = [], [], [] if local else None
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=Collate(None)):
        if batch.get("bad"):
            bad.record(batch["bad"])
        if "frontal" not in batch:
            continue
        lateral = batch["lateral"].to(device) if two else None
        present = batch["lateral_present"].to(device) if two else None
        out = model.encode_images(batch["frontal"].to(device), lateral, present, return_local=local)
        emb = out[0] if local else out
        embs.append(emb.float().cpu())
        kept += batch["index"].tolist()
        if local:
            reg, reg_mask = out[1].float().cpu(), out[2].cpu()
            if reg.shape[1] not in (n_patches, 2 * n_patches):
                raise ClaimsError(f"the model's regions have {reg.shape[1]} tokens per study; the pointing game maps "
                                  f"{n_patches} patch tokens per view (frontal, then lateral) onto patch cells and "
                                  "cannot place any other token: adapt eval_claims to the model's region layout")
            for b in range(reg.shape[0]):
                views_b = {"frontal": reg[b, :n_patches]}
                if reg.shape[1] == 2 * n_patches and bool(reg_mask[b, n_patches:].all()):
                    views_b["lateral"] = reg[b, n_patches:]
                regions.append(views_b)
    emb = torch.cat(embs) if embs else torch.empty(0, model.config.embed_dim)
    check_finite(emb, "image", [studies[i].study_id for i in kept], model_source(model))
    if local:
        for i, r in zip(kept, regions):
            for name, t in r.items():
                if not torch.isfinite(t).all():
                    raise EvaluationError(f"{model_source(model)} gives NaN or infinite {name} region features for "
                                          f"study {studies[i].study_id}; its weights are corrupt or training diverged")
    return emb, kept, regions


class _Run:
    """One evaluate_claims call: the model, its settings, the log of bad studies, and caches, so
    that a study or a text used by several protocols is encoded once."""

    def __init__(self, model, device, views: str, bad: BadStudyLog, batch_size: int, n_resamples: int, seed: int):
        self.model, self.device, self.views, self.bad = model, device, views, bad
        self.batch_size, self.n_resamples, self.seed = batch_size, n_resamples, seed
        self._img: dict[str, torch.Tensor | None] = {}  # study id -> (E,), None = undecodable
        self._regions: dict[str, dict[str, torch.Tensor]] = {}
        self._txt: dict[str, torch.Tensor] = {}

    def images(self, studies: Sequence[Study], local: bool = False) -> tuple[torch.Tensor, list[int]]:
        """(global (M, E), kept positions) of `studies`; with local, their regions are cached too."""
        def needed(s: Study) -> bool:
            if s.study_id in self._img and self._img[s.study_id] is None:
                return False  # undecodable: logged once, not read again
            return s.study_id not in (self._regions if local else self._img)

        todo = list({s.study_id: s for s in studies if needed(s)}.values())
        if todo:
            emb, kept, regions = _encode_studies(self.model, todo, self.device, self.bad, self.views, local,
                                                 self.batch_size)
            for s in todo:
                self._img.setdefault(s.study_id, None)
            for j, i in enumerate(kept):
                self._img[todo[i].study_id] = emb[j]
                if local:
                    self._regions[todo[i].study_id] = regions[j]
        kept = [i for i, s in enumerate(studies) if self._img.get(s.study_id) is not None]
        width = self.model.config.embed_dim
        emb = torch.stack([self._img[studies[i].study_id] for i in kept]) if kept else torch.empty(0, width)
        return emb, kept

    def regions(self, study_id: str) -> dict[str, torch.Tensor]:
        return self._regions.get(study_id, {})

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        todo = list(dict.fromkeys(t for t in texts if t not in self._txt))
        if todo:
            for t, e in zip(todo, embed_texts(self.model, todo, self.device)):
                self._txt[t] = e
        return torch.stack([self._txt[t] for t in texts])

    def class_embedding(self, prompts: Sequence[str]) -> torch.Tensor:
        """(E,) the normalised mean of the prompts' embeddings (a prompt ensemble)."""
        return F.normalize(self.texts(prompts).mean(0), dim=-1)

    def metric(self, values: Sequence[float], ids: Sequence) -> tuple[dict, dict]:
        vals = [float(v) for v in values]
        ci = bootstrap_ci(vals, n_resamples=self.n_resamples, seed=self.seed)
        return ({"mean": ci["mean"], "ci": ci["ci"], "n": ci["n"]}, {"ids": [str(i) for i in ids], "values": vals})


def _exclusive(study: Study) -> str | None:
    """The one positive CheXpert column of the study's labels (None when not exactly one)."""
    pos = [c for c in CHEXPERT_COLUMNS if study.labels.get(c) == 1.0]
    return pos[0] if len(pos) == 1 else None


# ---- strata --------------------------------------------------------------------------------------
def _finding_frontal_favoured(f: dict) -> bool:
    if "frontal_favoured" in f:
        return bool(f["frontal_favoured"])
    return bool(f.get("visible_frontal")) and not bool(f.get("visible_lateral"))


def _strata(run: _Run, studies, truth: Truth, out: dict) -> None:
    pool = [s for s in studies if s.report and s.report.strip() and _exclusive(s) in PROMPTS]
    if not pool:
        raise ClaimsError("the strata protocol found no study exclusively positive for a class with zero-shot prompts "
                          "in this split; use a larger archive or another split")
    truth.require(("lateral_needed",), (truth.records[s.study_id] for s in pool), "strata")
    img, kept = run.images(pool)
    pool = [pool[i] for i in kept]
    txt = run.texts([report_text(s.report) for s in pool])
    classes = [c for c in CLASSES if any(_exclusive(s) == c for s in pool)]
    classes += sorted({_exclusive(s) for s in pool} - set(classes))
    labels = torch.tensor([classes.index(_exclusive(s)) for s in pool])
    per = precision_at_k_per_query(img @ txt.t(), labels, labels, (5, 10))
    class_emb = torch.stack([run.class_embedding(PROMPTS[c]) for c in classes])
    correct = (pessimistic_argmax(img @ class_emb.t(), labels) == labels).float()
    values = {"i2t_P@5": per["P@5"], "i2t_P@10": per["P@10"], "zeroshot_accuracy": correct}

    def stratum(s: Study) -> set[str]:
        rec = truth.records[s.study_id]
        lat = bool(rec.get("has_lateral", s.lateral is not None)) and any(f["lateral_needed"] for f in rec["findings"])
        names = {"all"}
        if lat:
            names.add("lateral_needed")
        elif any(_finding_frontal_favoured(f) for f in rec["findings"]):
            names.add("frontal_favoured")
        return names

    member = [stratum(s) for s in pool]
    counts = {}
    for name in STRATA:
        idx = [i for i, m in enumerate(member) if name in m]
        counts[name] = len(idx)
        if not idx:
            continue  # an empty stratum has no metric (counts says so), never a 0
        for m in _STRATA_METRICS:
            out["metrics"][f"strata/{name}/{m}"], out["items"][f"strata/{name}/{m}"] = run.metric(
                values[m][idx].tolist(), [pool[i].study_id for i in idx])
    out["counts"]["strata"] = {"n": len(pool), "classes": classes, **{f"n_{k}": v for k, v in counts.items()}}


# ---- laterality ----------------------------------------------------------------------------------
def _names_side(report: str, side: str) -> bool:
    other = SIDES[1 - SIDES.index(side)]
    text = report.lower()
    return re.search(rf"\b{side}\b", text) is not None and re.search(rf"\b{other}\b", text) is None


def laterality_precision(sim: torch.Tensor, query_keys: Sequence[tuple[str, str]], item_keys: Sequence[tuple[str, str]],
                         ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per query (Q,): "P@k", the share of its top-k items with the query's class AND side, and
    "class_P@k", with its class whatever the side. sim: (Q, N) scores; keys: (class, side) per
    query and per item. A right class on the wrong side is a miss for P@k; ties pessimistic."""
    if sim.shape != (len(query_keys), len(item_keys)):
        raise ValueError(f"sim must be (Q, N) = ({len(query_keys)}, {len(item_keys)}), got {tuple(sim.shape)}")
    key_list = sorted(set(query_keys) | set(item_keys))
    class_list = sorted({c for c, _ in key_list})
    qk = torch.tensor([key_list.index(k) for k in query_keys])
    ik = torch.tensor([key_list.index(k) for k in item_keys])
    qc = torch.tensor([class_list.index(c) for c, _ in query_keys])
    ic = torch.tensor([class_list.index(c) for c, _ in item_keys])
    out = dict(precision_at_k_per_query(sim, qk, ik, ks))
    out.update({f"class_{k}": v for k, v in precision_at_k_per_query(sim, qc, ic, ks).items()})
    return out


def side_choice(img: torch.Tensor, own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(N,) 1.0 where a study's image (N, E) scores the text of its own side (N, E) strictly above
    the same text with the other side (N, E); a tie is never right."""
    return ((img * own).sum(1) > (img * other).sum(1)).float()


def _laterality(run: _Run, studies, truth: Truth, out: dict) -> None:
    pool, keys, unnamed = [], [], 0
    for s in studies:
        c = _exclusive(s)
        if c not in LATERALITY_QUERIES or not (s.report and s.report.strip()):
            continue
        same = [f for f in truth.records[s.study_id]["findings"] if f.get("label") == c]
        if len(same) != 1 or same[0].get("side") not in SIDES:
            continue
        side = same[0]["side"]
        if not _names_side(s.report, side):
            unnamed += 1
            continue
        pool.append(s)
        keys.append((c, side))
    if len(set(keys)) < 2:
        raise ClaimsError(f"the laterality protocol needs studies of at least two (class, side) pairs in this split, "
                          f"found {len(set(keys))} ({len(pool)} studies); use a larger archive or another split")
    img, kept = run.images(pool)
    pool, keys = [pool[i] for i in kept], [keys[i] for i in kept]
    key_list = sorted(set(keys))
    class_list = sorted({c for c, _ in keys})
    ids = [s.study_id for s in pool]
    # text -> image: every side template of every (class, side) in the set
    q_texts, q_keys, q_ids = [], [], []
    for c, side in key_list:
        for j, t in enumerate(laterality_queries(c, side)):
            q_texts.append(t)
            q_keys.append((c, side))
            q_ids.append(f"{c}|{side}|{j}")
    values = {f"t2i_{k}": (v, q_ids) for k, v in
              laterality_precision(run.texts(q_texts) @ img.t(), q_keys, keys, (5, 10)).items()}
    # image -> text: each study against the set's reports (its own among them, as in 5x200)
    txt = run.texts([report_text(s.report) for s in pool])
    values.update({f"i2t_{k}": (v, ids) for k, v in laterality_precision(img @ txt.t(), keys, keys, (5, 10)).items()})
    # side: the prompt ensemble of the study's own side against the same templates with the other side
    side_emb = {}
    for c in class_list:
        for side in SIDES:
            side_emb[(c, side)] = run.class_embedding(laterality_queries(c, side))
    own = torch.stack([side_emb[k] for k in keys])
    other = torch.stack([side_emb[(c, SIDES[1 - SIDES.index(side)])] for c, side in keys])
    values["side_accuracy"] = (side_choice(img, own, other), ids)
    for m in _LATERALITY_METRICS:
        v, item_ids = values[m]
        out["metrics"][f"laterality/{m}"], out["items"][f"laterality/{m}"] = run.metric(v.tolist(), item_ids)
    out["counts"]["laterality"] = {"n": len(pool), "n_queries_text": len(q_texts), "keys": len(key_list),
                                   "n_excluded_side_not_named": unnamed}


# ---- pointing game -------------------------------------------------------------------------------
def word_region_attention(
    regions: torch.Tensor,  # (B, M, D) float
    words: torch.Tensor,  # (B, T, D) float
    word_mask: torch.Tensor,  # (B, T) bool, True = real word
    region_mask: torch.Tensor | None = None,  # (B, M) bool, True = real region
    tau1: "float | torch.Tensor" = 4.0,
) -> torch.Tensor:
    """alpha (B, T, M): each word's attention over the regions, as GLoRIA's local loss computes it
    (kernels.local_align_ref: softmax over the real words of a[m, j] = r_m . e_j, times tau1, then
    softmax over the real regions). Pair b of regions goes with pair b of words. Rows of padded
    words hold the same arithmetic and mean nothing; a study with no real region is an error."""
    if regions.dim() != 3 or words.dim() != 3 or regions.shape[0] != words.shape[0] or regions.shape[2] != words.shape[2]:
        raise ValueError(f"regions must be (B, M, D) and words (B, T, D) with the same B and D, got "
                         f"{tuple(regions.shape)} and {tuple(words.shape)}")
    if word_mask.shape != words.shape[:2]:
        raise ValueError(f"word_mask must be (B, T) = {tuple(words.shape[:2])}, got {tuple(word_mask.shape)}")
    if not word_mask.any(dim=1).all():
        raise ValueError("a text has no real word (word_mask all False): there is nothing to attend with")
    if region_mask is None:
        region_mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device)
    if not region_mask.any(dim=1).all():
        raise ValueError("a study has no real region (region_mask all False): there is nothing to point at")
    neg = torch.finfo(regions.dtype).min
    a = torch.einsum("bmd,btd->bmt", regions, words)
    p = torch.softmax(a.masked_fill(~word_mask[:, None, :], neg), dim=-1) * tau1  # over words
    p = p.masked_fill(~region_mask[:, :, None], neg)
    return torch.softmax(p, dim=1).transpose(1, 2)  # over regions -> (B, T, M)


def _word_positions(model, word: str, input_ids: torch.Tensor, word_mask: torch.Tensor) -> list[int]:
    """Word-state positions (0 = first token after [CLS]) of every occurrence of `word`'s pieces in
    one text's ids (T+1,), kept only where all pieces are real words."""
    ids, mask = model.tokenize([word])
    pieces = ids[0][mask[0].bool()][1:-1].tolist()  # without [CLS] and [SEP]
    seq = input_ids.tolist()
    found = []
    for start in range(1, len(seq) - len(pieces) + 1):
        if seq[start:start + len(pieces)] == pieces:
            pos = [start - 1 + i for i in range(len(pieces))]
            if all(bool(word_mask[p]) for p in pos):
                found += pos
    return found


def _box_list(value) -> list[tuple[float, float, float, float]]:
    """One box [x, y, w, h] or a list of them -> a list of boxes; None or [] -> []."""
    if not value:
        return []
    if isinstance(value[0], (int, float)):
        value = [value]
    out = []
    for b in value:
        if len(b) != 4 or b[2] <= 0 or b[3] <= 0:
            raise ClaimsError(f"a box {b!r} in the truth file is not [x, y, w, h] with w, h > 0; regenerate the archive")
        out.append(tuple(float(x) for x in b))
    return out


def cells_in_boxes(boxes: Sequence[Sequence[float]], archive_size: int, image_size: int, patch_size: int) -> torch.Tensor:
    """(P,) bool over the patch cells of one view (row-major, as the ViT flattens them): the cells
    whose square meets a box (positive overlap). Boxes are [x, y, w, h] in pixels of the archive's
    square images, mapped to the model's input by the preprocessing's resize (centre crop of a
    square is the identity)."""
    grid = image_size // patch_size
    scale = image_size / archive_size
    inside = torch.zeros(grid, grid, dtype=torch.bool)
    edges = torch.arange(grid + 1, dtype=torch.float64) * patch_size
    for x, y, w, h in boxes:
        x0, x1, y0, y1 = x * scale, (x + w) * scale, y * scale, (y + h) * scale
        cols = (edges[:-1] < x1) & (edges[1:] > x0)
        rows = (edges[:-1] < y1) & (edges[1:] > y0)
        inside |= rows[:, None] & cols[None, :]
    return inside.flatten()


def pointing_scores(attention: torch.Tensor, in_box: torch.Tensor) -> tuple[float, float]:
    """(hit, mass) for one attention map (M,) and its box cells (M,) bool: hit 1.0 when every region
    tied at the peak meets the box (ties count against the model), mass = attention inside the box."""
    if attention.shape != in_box.shape:
        raise ValueError(f"attention {tuple(attention.shape)} and in_box {tuple(in_box.shape)} differ in shape")
    if not torch.isfinite(attention).all():
        raise EvaluationError("the word's attention has NaN or infinite entries; the model's local features are broken")
    peak = attention == attention.max()
    hit = bool(in_box[peak].all())
    return float(hit), float(attention[in_box].sum())


def _loss_words(model, texts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (B, T+1), words (B, T, E), word_mask (B, T)) on the CPU: the word states and the word
    positions the local loss uses (loss.local_words = "content": the content words only)."""
    content = getattr(model.config.loss, "local_words", "all") == "content"
    with torch.no_grad():
        if content:
            ids, mask, content_mask = model.tokenizer(list(texts), content_mask=True)
            ids, mask = ids.to(device), mask.to(device)
        else:
            ids, mask = model.tokenize(list(texts), device=device)
        _, words, word_mask = model.encode_text((ids, mask), return_local=True)
    word_mask = word_mask.cpu()
    if content:
        word_mask = word_mask & content_mask[:, 1:1 + word_mask.shape[1]]
    return ids.cpu(), words.float().cpu(), word_mask


def _pointing(run: _Run, studies, truth: Truth, out: dict, text: str, views: Sequence[str]) -> None:
    if text not in ("phrase", "report"):
        raise ValueError(f"pointing_text must be 'phrase' (the finding's phrase from the truth) or 'report', got {text!r}")
    if not views or any(v not in ("frontal", "lateral") for v in views):
        raise ValueError(f"pointing_views must name 'frontal' and/or 'lateral', got {views!r}")
    model = run.model
    two = _two_views(model, run.views) and "lateral" in views
    recs = [truth.records[s.study_id] for s in studies]
    truth.require(("label", "bboxes_frontal", "bbox_frontal"), recs, "pointing")
    if two:
        truth.require(("bbox_lateral",), recs, "pointing",
                      " (or pass pointing_views=('frontal',) to play it on the frontal view alone)")
    archive_size = truth.image_size()
    vcfg = model.config.vision
    # items: (study position, finding index, finding, view, boxes)
    wanted, skipped_no_word = [], 0
    for i, (s, rec) in enumerate(zip(studies, recs)):
        for k, f in enumerate(rec["findings"]):
            if f["label"] not in FINDING_WORDS:
                skipped_no_word += 1
                continue
            if text == "report" and not (s.report and s.report.strip()):
                continue
            boxes = {}
            if "frontal" in views:
                boxes["frontal"] = _box_list(f.get("bboxes_frontal")) or _box_list(f.get("bbox_frontal"))
            if two and s.lateral is not None:
                boxes["lateral"] = _box_list(f.get("bbox_lateral"))
            for view, b in boxes.items():
                if b:
                    wanted.append((i, k, f, view, b))
    if not wanted:
        raise ClaimsError("the pointing game found no finding with a box in this split; use a larger archive")
    run.images([studies[i] for i in sorted({w[0] for w in wanted})], local=True)
    tau1 = float(model.temperatures()[1][0].detach())
    texts = [finding_phrase(f["label"], f.get("side")) if text == "phrase" else report_text(studies[i].report)
             for i, _, f, _, _ in wanted]
    per_view = {v: {m: [] for m in _POINTING_METRICS} | {"ids": []} for v in ("frontal", "lateral")}
    not_found = no_view = 0
    model.eval()
    for start in range(0, len(wanted), 64):
        chunk = wanted[start:start + 64]
        ids, words, word_mask = _loss_words(model, texts[start:start + 64], run.device)
        if not torch.isfinite(words[word_mask]).all():
            raise EvaluationError(f"{model_source(model)} gives NaN or infinite word features; its weights are corrupt")
        for r, (i, k, f, view, boxes) in enumerate(chunk):
            reg = run.regions(studies[i].study_id).get(view)
            if reg is None:  # undecodable study (logged) or a lateral the model did not get
                no_view += 1
                continue
            pos = _word_positions(model, FINDING_WORDS[f["label"]], ids[r], word_mask[r])
            if not pos:
                not_found += 1
                continue
            att = word_region_attention(reg[None], words[r:r + 1], word_mask[r:r + 1], None, tau1)[0]  # (T, M)
            att = att[pos].mean(0)
            in_box = cells_in_boxes(boxes, archive_size, vcfg.image_size, vcfg.patch_size)
            hit, mass = pointing_scores(att, in_box)
            d = per_view[view]
            d["hit_rate"].append(hit)
            d["mass_in_box"].append(mass)
            item = f"{studies[i].study_id}|{k}|{f['label']}|{view}"
            # the random peak depends on the item and the seed alone, so every model gets the same draws
            rng = np.random.default_rng([run.seed, zlib.crc32(item.encode())])
            d["random_hit_rate"].append(float(in_box[int(rng.integers(len(in_box)))]))
            d["random_mass_in_box"].append(float(in_box.float().mean()))
            d["ids"].append(item)
    all_view = {m: per_view["frontal"][m] + per_view["lateral"][m] for m in list(_POINTING_METRICS) + ["ids"]}
    for view, d in (("frontal", per_view["frontal"]), ("lateral", per_view["lateral"]), ("all", all_view)):
        if not d["ids"]:
            continue
        for m in _POINTING_METRICS:
            out["metrics"][f"pointing/{view}/{m}"], out["items"][f"pointing/{view}/{m}"] = run.metric(d[m], d["ids"])
    out["counts"]["pointing"] = {"n_frontal": len(per_view["frontal"]["ids"]), "n_lateral": len(per_view["lateral"]["ids"]),
                                 "n_word_not_in_text": not_found, "n_class_without_word": skipped_no_word,
                                 "n_view_missing": no_view, "text": text, "tau1": tau1}


@torch.no_grad()
def attention_map(model, study: Study, word: str, text: str | None = None, view: str = "frontal",
                  device=None) -> torch.Tensor:
    """(grid, grid) attention of `word` (in `text`, default the word alone) over the patch cells of
    one view of `study`, as the pointing game computes it; for plots (the cells are
    vision.patch_size pixels of the model's input image)."""
    device = torch.device(device or next(model.parameters()).device)
    bad = BadStudyLog(1.0, where=f"study {study.study_id}", verbose=False)
    _, kept, regions = _encode_studies(model, [study], device, bad, "all" if view == "lateral" else "frontal", local=True)
    if not kept:
        raise DatasetError(f"study {study.study_id}: its image cannot be decoded ({bad.entries()[0]['reason']})")
    if view not in regions[0]:
        raise ValueError(f"study {study.study_id} has no {view} view the model can read "
                         f"(the model takes {model.config.vision.num_views} view(s); view is 'frontal' or 'lateral')")
    ids, words, word_mask = _loss_words(model, [text or word], device)
    pos = _word_positions(model, word, ids[0], word_mask[0])
    if not pos:
        raise ValueError(f"the word {word!r} does not occur among the words of {text or word!r} that the local "
                         "loss reads (loss.local_words = 'content' leaves out stop-words and negated words)")
    tau1 = float(model.temperatures()[1][0])
    att = word_region_attention(regions[0][view][None], words, word_mask, None, tau1)[0][pos].mean(0)
    grid = model.visual.patch_embed.grid
    return att.reshape(grid, grid)


# ---- the runs ------------------------------------------------------------------------------------
def _load(dataset) -> list[Study]:
    if isinstance(dataset, (str, Path)):
        from .data import open_dataset

        return list(open_dataset(dataset))
    return list(dataset)


def evaluate_claims(
    model,
    dataset: "str | Path | Sequence[Study]",
    truth_path: str | Path | None = None,
    seed: int = 0,
    *,
    protocols: Sequence[str] = CLAIM_PROTOCOLS,
    split: str = "test",
    views: str = "all",
    pointing_text: str = "phrase",
    pointing_views: Sequence[str] = ("frontal", "lateral"),
    n_resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
    device=None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    batch_size: int = 32,
) -> dict:
    """Runs the claims protocols on `split` of a synthetic archive; see the module docstring.

    dataset: the archive folder or its studies; truth_path: its ``synth_truth.jsonl`` (default:
    inside `dataset` when that is a folder). seed: the training seed of `model`, recorded for
    aggregate_runs (the sets do not depend on it: every qualifying study of the split is used, so
    every model and seed is scored on the same items). views="frontal" scores a two-view model
    from its frontal view alone; pointing_views=("frontal",) plays the pointing game on the
    frontal boxes only (a one-view model, or views="frontal", never gets lateral items). bootstrap_seed seeds the intervals and the random pointing baseline.

    Returns {"seed", "views", "model", "truth", "synth_version", "split", "protocols",
    "metrics": {name: {"mean", "ci": [lo, hi], "n"}}, "items": {name: {"ids", "values"}},
    "counts": {protocol: {...}}, "skipped_studies": [...]}."""
    unknown = [p for p in protocols if p not in CLAIM_PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"unknown or no claims protocol(s) {unknown or list(protocols)}; choose from {', '.join(CLAIM_PROTOCOLS)}")
    if truth_path is None:
        if not isinstance(dataset, (str, Path)):
            raise ClaimsError("truth_path is needed when dataset is a list of studies: pass the archive's "
                              f"{TRUTH_FILE}")
        truth_path = Path(dataset) / TRUTH_FILE
    _two_views(model, views)
    check_finite_weights(model)
    device = torch.device(device or next(model.parameters()).device)
    truth = Truth(truth_path)
    studies = _load(dataset)
    pool = sorted((s for s in studies if split == "all" or (s.split or "train") == split), key=lambda s: s.study_id)
    if not pool:
        raise DatasetError(f"the dataset has no studies in split {split!r}; use split='train'|'validate'|'test'|'all'")
    missing = [s.study_id for s in pool if s.study_id not in truth.records]
    if missing:
        raise ClaimsError(f"{len(missing)} of {len(pool)} studies of split {split!r} are not in {truth.path} "
                          f"(e.g. {', '.join(missing[:3])}); pass the truth file of this archive")
    out: dict = {"seed": seed, "views": views, "model": model_source(model), "truth": str(truth.path),
                 "synth_version": truth.version, "split": split, "protocols": list(protocols),
                 "n_resamples": n_resamples, "bootstrap_seed": bootstrap_seed,
                 "metrics": {}, "items": {}, "counts": {}}
    bad = BadStudyLog(max_bad_fraction, where=f"the claims sets of {truth.path.parent}")
    run = _Run(model, device, views, bad, batch_size, n_resamples, bootstrap_seed)
    # pointing first: it encodes the regions of most studies, whose global embeddings the others reuse
    if "pointing" in protocols:
        _pointing(run, pool, truth, out, pointing_text, tuple(pointing_views))
    if "strata" in protocols:
        _strata(run, pool, truth, out)
    if "laterality" in protocols:
        _laterality(run, pool, truth, out)
    out["metrics"] = {k: out["metrics"][k] for k in METRICS if k in out["metrics"]}
    out["skipped_studies"] = bad.entries()
    return out


# ---- several seeds, two models -------------------------------------------------------------------
def _as_runs(results) -> list[dict]:
    runs = [results] if isinstance(results, dict) else list(results)
    for r in runs:
        if not isinstance(r, dict) or "items" not in r or "metrics" not in r:
            raise ClaimsError("expected evaluate_claims results (dicts with 'metrics' and 'items')")
    return runs


def aggregate_runs(results: Sequence[dict], n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Puts the evaluate_claims results of >= 2 training seeds of one model together, metric by
    metric: {"seeds", "n_seeds", "metrics": {name: {"mean", "ci", "per_seed", "seed_sd", "n", ...}}}.
    The runs must hold the same metrics on the same items (the same archive, split and views)."""
    runs = _as_runs(results)
    if len(runs) < 2:
        raise StatsError(f"aggregate_runs needs the results of at least 2 training seeds, got {len(runs)}; "
                         "a single run's intervals are in its own 'metrics'")
    seeds = [r.get("seed") for r in runs]
    if len(set(map(str, seeds))) != len(seeds):
        raise ClaimsError(f"aggregate_runs got the training seeds {seeds}: each run must be a different seed "
                          "(pass each evaluate_claims result once, with its training seed)")
    names = list(runs[0]["items"])
    for r, s in zip(runs[1:], seeds[1:]):
        if list(r["items"]) != names:
            diff = sorted(set(names) ^ set(r["items"]))
            raise ClaimsError(f"the run of seed {s} holds other metrics than the run of seed {seeds[0]} ({diff[:4]}); "
                              "evaluate every seed with the same protocols, views and archive")
    metrics = {}
    for name in names:
        metrics[name] = seed_bootstrap([r["items"][name]["values"] for r in runs],
                                       ids=[r["items"][name]["ids"] for r in runs], n_resamples=n_resamples, seed=seed)
    return {"seeds": seeds, "n_seeds": len(runs), "metrics": metrics}


def compare_claims(results_a, results_b, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """Difference a - b per metric that both hold on the same items: a paired bootstrap when each side
    is one run, a seed bootstrap of the difference when both have >= 2 seeds. {"metrics": {name:
    {"diff", "ci", "mean_a", "mean_b", "p_le_zero", ...}}, "not_compared": {name: reason}}."""
    a, b = _as_runs(results_a), _as_runs(results_b)
    if (len(a) == 1) != (len(b) == 1):
        raise StatsError(f"compare_claims got {len(a)} run(s) against {len(b)}: compare one run with one run, or "
                         ">= 2 seeds with >= 2 seeds")
    metrics, skipped = {}, {}
    for name in [n for n in METRICS if n in a[0]["items"] or n in b[0]["items"]]:
        if not all(name in r["items"] for r in a + b):
            skipped[name] = "held by only one of the two models (e.g. the lateral pointing game of a one-view model)"
            continue
        ids_a = [r["items"][name]["ids"] for r in a]
        ids_b = [r["items"][name]["ids"] for r in b]
        if ids_a[0] != ids_b[0]:
            skipped[name] = "scored on different items by the two models (e.g. pointing over the views each model sees)"
            continue
        if len(a) == 1:
            metrics[name] = paired_bootstrap(a[0]["items"][name]["values"], b[0]["items"][name]["values"],
                                             ids_a[0], ids_b[0], n_resamples=n_resamples, seed=seed)
        else:
            metrics[name] = seed_bootstrap_difference([r["items"][name]["values"] for r in a],
                                                      [r["items"][name]["values"] for r in b], ids_a, ids_b,
                                                      n_resamples=n_resamples, seed=seed)
    return {"metrics": metrics, "not_compared": skipped}


def _cell(m: dict | None) -> str:
    if m is None:
        return "-"
    value = m["diff"] if "diff" in m else m["mean"]
    lo, hi = m["ci"]
    sign = "+" if "diff" in m else ""
    return f"{value:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"


def format_claims_table(columns: dict, comparison: dict | None = None, title: str = "") -> str:
    """Markdown: one row per metric (in METRICS order), one column per entry of `columns` (label ->
    an evaluate_claims result or an aggregate_runs result), each cell "mean [95% CI]"; with
    `comparison` (a compare_claims result) a last column of the differences."""
    if not columns:
        raise ValueError("format_claims_table needs at least one column (label -> result)")
    names = [n for n in METRICS if any(n in c["metrics"] for c in columns.values())]
    head = ["metric"] + [f"{label} (n seeds = {c['n_seeds']})" if "n_seeds" in c else label
                         for label, c in columns.items()]
    if comparison is not None:
        head.append("difference [95% CI]")
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        row = [n] + [_cell(c["metrics"].get(n)) for c in columns.values()]
        if comparison is not None:
            row.append(_cell(comparison["metrics"].get(n)))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Cells: mean [95% percentile bootstrap interval]" + (" over training seeds and evaluation items"
                 if any("n_seeds" in c for c in columns.values()) else " over the evaluation items") + ".")
    if comparison is not None and comparison.get("not_compared"):
        lines.append("Not compared: " + "; ".join(f"{k} ({v})" for k, v in comparison["not_compared"].items()) + ".")
    return "\n".join(lines)


def write_claims(path: str | Path, result: dict) -> Path:
    """Writes a result (evaluate_claims, aggregate_runs or compare_claims) as JSON, atomically."""
    from .files import atomic_write_text

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            raise ClaimsError(f"refusing to write a non-finite number ({x}) to {path}")
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(clean(result), indent=1))


__all__ = ["CLAIM_PROTOCOLS", "METRICS", "STRATA", "ClaimsError", "Truth", "aggregate_runs", "attention_map",
           "cells_in_boxes", "compare_claims", "evaluate_claims", "format_claims_table", "laterality_precision",
           "pointing_scores", "side_choice", "word_region_attention", "write_claims"]
