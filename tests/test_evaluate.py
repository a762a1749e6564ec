"""Evaluation protocols: metrics by hand, reproducible manifests, the RSNA zero-shot protocol."""
import json
import math

import pytest
import torch

from clinvla_engine.data import DatasetError, open_dataset
from clinvla_engine.data.synth import generate_archive
from clinvla_engine.data.study import CLASSES, CLASSES_5X200
from clinvla_engine.evaluate import (
    EvaluationError,
    auroc,
    draw_class_set,
    evaluate,
    exclusive_class,
    f1_score,
    pessimistic_argmax,
    precision_at_k,
    recall_at_k,
)
from clinvla_engine.model import create_model


def test_precision_recall_auroc_f1_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.3], [0.2, 0.7, 0.1, 0.6]])
    q = torch.tensor([0, 1])
    items = torch.tensor([0, 1, 1, 1])
    # query 0: top-2 = items 0 (hit), 2 (miss); query 1: items 1, 3 (both hits)
    p = precision_at_k(sim, q, items, (1, 2, 4))
    assert p == {"P@1": 1.0, "P@2": 0.75, "P@4": pytest.approx((0.25 + 0.75) / 2)}
    r = recall_at_k(torch.tensor([[0.5, 0.9], [0.1, 0.3]]), (1, 2))
    assert r == {"R@1": 0.5, "R@2": 1.0}
    assert auroc(torch.tensor([0.9, 0.8, 0.3, 0.1]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.75)
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert math.isnan(auroc(torch.tensor([0.5]), torch.tensor([1])))
    assert f1_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])) == pytest.approx(0.5)


def test_ties_count_against_the_right_answer():
    # query 0: its target (0.9) ties with item 1 -> rank 1; query 1: target first -> rank 0;
    # query 2: item 1 (0.7) beats the target (0.6) -> rank 1. Counting ties as wins gave R@1 = 2/3.
    sim = torch.tensor([[0.9, 0.9, 0.1],
                        [0.2, 0.8, 0.3],
                        [0.5, 0.7, 0.6]])
    assert recall_at_k(sim, (1, 2, 3)) == {"R@1": pytest.approx(1 / 3), "R@2": 1.0, "R@3": 1.0}
    # one constant score: every target ties with all N-1 others, rank N-1
    assert recall_at_k(torch.full((4, 4), 0.3), (1, 3, 4)) == {"R@1": 0.0, "R@3": 0.0, "R@4": 1.0}
    # precision: the miss that ties with a hit ranks first, whatever the item order
    q, items = torch.tensor([0]), torch.tensor([0, 1, 0])
    tied = torch.tensor([[0.5, 0.5, 0.1]])
    assert precision_at_k(tied, q, items, (1, 2, 3)) == {"P@1": 0.0, "P@2": 0.5, "P@3": pytest.approx(2 / 3)}
    assert precision_at_k(tied[:, [1, 0, 2]], q, items[[1, 0, 2]], (1,)) == {"P@1": 0.0}
    # zero-shot: a top score shared by the true class and another is a wrong prediction
    scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 0.0, 3.0]])
    assert pessimistic_argmax(scores, torch.tensor([0, 1, 1])).tolist() == [1, 1, 0]
    with pytest.raises(EvaluationError, match="NaN or infinite"):
        recall_at_k(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), (1,))


def test_evaluation_prompts_cover_every_class_in_plain_wording():
    from clinvla_engine.data.reports import UNCERTAIN_CUES
    from clinvla_engine.eval_prompts import PROMPTS, QUERY_TEXTS

    assert set(QUERY_TEXTS) == set(PROMPTS) == set(CLASSES)
    for c in CLASSES:
        assert len(QUERY_TEXTS[c]) == 10 and len(set(QUERY_TEXTS[c])) == 10
        assert len(PROMPTS[c]) >= 3
        assert not any(cue in t for t in QUERY_TEXTS[c] + PROMPTS[c] for cue in UNCERTAIN_CUES)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    generate_archive(root / "mimic", studies=150, seed=5, fmt="mimic", size=64, split_fractions=(0.2, 0.1, 0.7),
                     progress=False)
    generate_archive(root / "rsna", studies=60, seed=6, fmt="rsna", size=64, progress=False)
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny").eval()


def test_protocol_sets_are_exclusive_and_seeded(archive):
    studies = list(open_dataset(archive / "mimic"))
    classes = ("Atelectasis", "Cardiomegaly", "Edema")
    cand, queries = draw_class_set(studies, classes, per_class=4, seed=1, queries_per_class=2)
    for s, c in cand + queries:
        assert exclusive_class(s, classes) == c
    assert not {s.study_id for s, _ in cand} & {s.study_id for s, _ in queries}
    again, _ = draw_class_set(studies, classes, per_class=4, seed=1, queries_per_class=2)
    assert [s.study_id for s, _ in again] == [s.study_id for s, _ in cand]


def test_manifest_reproduces_and_refuses_changed_files(archive, model, tmp_path):
    man = tmp_path / "manifest.json"
    kw = dict(protocols=("5x200", "8x200", "instance"), split="test", per_class=6, seed=2)
    with pytest.warns(UserWarning, match="smaller than asked"):
        first = evaluate(model, archive / "mimic", manifest_out=man, **kw)
    assert set(first) >= {"5x200", "8x200", "instance", "manifest"}
    assert first["skipped_studies"] == []
    assert {"i2t_P@5", "i2t_P@10", "i2t_P@100", "zeroshot_accuracy", "zeroshot_macro_f1"} <= set(first["5x200"])
    assert {"t2i_P@5", "t2i_P@50", "i2i_P@5"} <= set(first["8x200"])
    assert {"i2t_R@1", "t2i_R@10"} <= set(first["instance"])
    data = json.loads(man.read_text())
    entry = data["sets"]["5x200"]["candidates"][0]
    assert len(entry["frontal_sha256"]) == 64
    # a different seed would draw other sets; the manifest pins them
    again = evaluate(model, archive / "mimic", manifest_in=man, **{**kw, "seed": 99})
    assert again["5x200"] == first["5x200"] and again["8x200"] == first["8x200"]
    # one changed image makes the result irreproducible: refused, naming the study
    victim = data["sets"]["5x200"]["candidates"][3]
    with open(victim["frontal"], "ab") as f:
        f.write(b"\0")
    with pytest.raises(DatasetError, match=f"study {victim['study_id']}.*changed since the manifest"):
        evaluate(model, archive / "mimic", manifest_in=man, **kw)


@pytest.fixture(scope="module")
def constant_model():
    """Every image and every text gets the same embedding: a collapsed model, which knows nothing."""
    torch.manual_seed(0)
    m = create_model("tiny").eval()
    with torch.no_grad():
        for head in (m.image_global_head, m.text_global_head):
            head.fc2.weight.zero_()
            head.fc2.bias.fill_(1.0)
    return m


def _precision_all_tied(labels: list[int], k: int) -> float:
    """P@k by hand when every score ties: each query sees the n - n_c items of other classes first."""
    n = len(labels)
    k = min(k, n)
    return sum(max(0, k - (n - labels.count(c))) / k for c in labels) / n


def test_a_collapsed_model_scores_what_it_knows_nothing(archive, constant_model):
    res = evaluate(constant_model, archive / "mimic", protocols=("5x200", "instance"), split="test",
                   per_class=6, seed=2)
    studies = {s.study_id: s for s in open_dataset(archive / "mimic")}
    cand, _ = draw_class_set([s for s in studies.values() if s.split == "test"], CLASSES_5X200, 6, 2)
    labels = [CLASSES_5X200.index(c) for _, c in cand]
    n = len(labels)
    assert res["instance"]["n"] == n > 10
    assert res["instance"] == {"i2t_R@1": 0.0, "i2t_R@5": 0.0, "i2t_R@10": 0.0,
                               "t2i_R@1": 0.0, "t2i_R@5": 0.0, "t2i_R@10": 0.0, "n": n}
    r5 = res["5x200"]
    for k in (5, 10, 100):
        assert r5[f"i2t_P@{k}"] == pytest.approx(_precision_all_tied(labels, k)), k
    assert r5["zeroshot_accuracy"] == 0.0 and r5["zeroshot_macro_f1"] == 0.0


def test_rsna_zero_shot(archive, constant_model):
    res = evaluate(constant_model, archive / "mimic", protocols=("rsna",), rsna_data=archive / "rsna", split="all",
                   per_class=10)
    r = res["rsna"]
    # every probability is exactly 0.5: AUROC counts the ties half, and no prediction is right
    assert r["n"] > 0 and r["auroc"] == 0.5 and r["accuracy"] == 0.0 and r["f1"] == 0.0


def test_bad_protocol_and_empty_split(archive, model):
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate(model, archive / "mimic", protocols=("7x300",))
    with pytest.raises(DatasetError, match="no studies in split 'holdout'"):
        evaluate(model, archive / "mimic", split="holdout")


def test_per_item_values_average_to_the_reported_metrics(archive, model):
    """keep_items gives, for every 5x200 / instance / 8x200 metric, the per-query values whose mean
    is the reported number (what the demo's bootstrap intervals resample)."""
    with pytest.warns(UserWarning, match="smaller than asked"):
        res = evaluate(model, archive / "mimic", protocols=("5x200", "8x200", "instance"), split="test",
                       per_class=6, seed=2, keep_items=True)
    items = res["items"]
    assert {"5x200/i2t_P@5", "5x200/zeroshot_accuracy", "instance/i2t_R@1", "instance/t2i_R@10",
            "8x200/t2i_P@10", "8x200/i2i_P@5"} <= set(items)
    for name, it in items.items():
        proto, metric = name.split("/")
        assert len(it["ids"]) == len(it["values"]) > 0
        assert sum(it["values"]) / len(it["values"]) == pytest.approx(res[proto][metric], abs=1e-6), name
    assert "items" not in evaluate.__globals__["format_table"](res)
