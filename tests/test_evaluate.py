"""Evaluation protocols: metrics by hand, reproducible manifests, the RSNA zero-shot protocol."""
import json
import math

import pytest
import torch

from clinvla_engine.data import DatasetError, open_dataset
from clinvla_engine.data.synth import generate_archive
from clinvla_engine.evaluate import (
    auroc,
    draw_class_set,
    evaluate,
    exclusive_class,
    f1_score,
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
    for key in ("i2t_P@5", "i2t_P@10", "i2t_P@100", "zeroshot_accuracy", "zeroshot_macro_f1"):
        assert 0.0 <= first["5x200"][key] <= 1.0
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


def test_rsna_zero_shot(archive, model):
    res = evaluate(model, archive / "mimic", protocols=("rsna",), rsna_data=archive / "rsna", split="all",
                   per_class=10)
    r = res["rsna"]
    assert r["n"] > 0 and 0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0


def test_bad_protocol_and_empty_split(archive, model):
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate(model, archive / "mimic", protocols=("7x300",))
    with pytest.raises(DatasetError, match="no studies in split 'holdout'"):
        evaluate(model, archive / "mimic", split="holdout")
