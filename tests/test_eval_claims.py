"""Claims evaluation: laterality-aware retrieval, the pointing game, strata, seeds, on known answers
and end to end on a tiny synthetic archive."""
import json
import math

import pytest
import torch

from clinvla_engine.data import open_dataset
from clinvla_engine.data.synth import generate_archive
from clinvla_engine.eval_claims import (
    METRICS,
    ClaimsError,
    aggregate_runs,
    attention_map,
    cells_in_boxes,
    compare_claims,
    evaluate_claims,
    format_claims_table,
    laterality_precision,
    pointing_scores,
    side_choice,
    word_region_attention,
    write_claims,
)
from clinvla_engine.eval_prompts import FINDING_PHRASES, FINDING_WORDS, LATERALITY_QUERIES, SIDES, finding_phrase
from clinvla_engine.losses import local_alignment_scores_ref
from clinvla_engine.model import create_model
from clinvla_engine.stats import StatsError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the tiny model gains nothing from a second thread, and on a shared 2-core box it loses a lot
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- laterality-aware retrieval ----------------------------------------------------------------
def test_a_side_swap_is_a_miss():
    eff_l, eff_r, con_l = ("Pleural Effusion", "left"), ("Pleural Effusion", "right"), ("Consolidation", "left")
    items = [eff_r, eff_l, con_l, eff_l]
    # query 0 ("left effusion") ranks the RIGHT effusion first, then a left one; query 1 ("left
    # consolidation") ranks the consolidation first
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.2],
                        [0.3, 0.2, 0.9, 0.1]])
    p = laterality_precision(sim, [eff_l, con_l], items, (1, 2))
    assert p["P@1"].tolist() == [0.0, 1.0]  # the side swap counts as a miss
    assert p["class_P@1"].tolist() == [1.0, 1.0]  # by class alone it was a hit
    assert p["P@2"].tolist() == [0.5, 0.5]
    assert p["class_P@2"].tolist() == [1.0, 0.5]
    # a tie between the right answer and a side swap counts against the model
    tied = torch.tensor([[0.5, 0.5, 0.1, 0.0]])
    assert laterality_precision(tied, [eff_l], items, (1,))["P@1"].tolist() == [0.0]
    assert laterality_precision(tied[:, [1, 0, 2, 3]], [eff_l], [items[i] for i in (1, 0, 2, 3)], (1,))["P@1"].tolist() == [0.0]
    with pytest.raises(ValueError, match=r"\(Q, N\) = \(1, 4\)"):
        laterality_precision(sim, [eff_l], items, (1,))


def test_side_choice_needs_a_strict_win():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    own = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    other = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    assert side_choice(img, own, other).tolist() == [1.0, 0.0, 0.0]  # the tie (row 2) is wrong


def test_prompts_for_the_claims_protocols():
    model = create_model("tiny")
    for c, templates in LATERALITY_QUERIES.items():
        assert len(templates) >= 3 and all("{side}" in t for t in templates)
    for c in FINDING_WORDS:
        for side in (*SIDES, "bilateral", None):
            phrase = finding_phrase(c, side)
            ids, _ = model.tokenize([phrase])
            word, _ = model.tokenize([FINDING_WORDS[c]])
            pieces, seq = word[0, 1:-1].tolist(), ids[0].tolist()
            assert any(seq[i:i + len(pieces)] == pieces for i in range(len(seq))), (c, side, phrase)
            if side in SIDES and c in LATERALITY_QUERIES:
                assert side in phrase.split()
    assert set(FINDING_PHRASES) == set(FINDING_WORDS)
    with pytest.raises(KeyError, match="no pointing-game phrase"):
        finding_phrase("Lung Lesion", None)


# ---- pointing game, by hand --------------------------------------------------------------------
def test_word_attention_is_the_local_losses_attention():
    # rebuilding GLoRIA's score S from the attention must give the local loss's own S
    g = torch.Generator().manual_seed(0)
    regions = torch.randn(3, 7, 5, generator=g)
    words = torch.randn(3, 6, 5, generator=g)
    word_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    region_mask = torch.ones(3, 7, dtype=torch.bool)
    region_mask[1, 5:] = False
    tau1, tau2, tau3 = 4.0, 5.0, 10.0
    alpha = word_region_attention(regions, words, word_mask, region_mask, tau1)  # (B, T, M)
    assert alpha.shape == (3, 6, 7)
    assert torch.allclose(alpha.sum(-1), torch.ones(3, 6))
    assert (alpha[1, :, 5:] == 0).all()  # masked regions get nothing
    context = alpha @ regions  # (B, T, D)
    cos = torch.nn.functional.cosine_similarity(context, words, dim=-1)
    s = tau3 * torch.logsumexp((tau2 * cos).masked_fill(~word_mask, -torch.inf), dim=-1)
    ref = local_alignment_scores_ref(regions, words, word_mask, region_mask, tau1, tau2, tau3).diagonal()
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-5)


def test_cells_in_boxes():
    # a 64 px model input of 16 px patches (4 x 4 cells); archive images of 128 px (scale 0.5)
    inside = cells_in_boxes([(40, 70, 30, 20)], archive_size=128, image_size=64, patch_size=16)
    # -> x 20..35, y 35..45: columns 1-2, row 2 only
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[2, 1:3] = True
    assert torch.equal(inside.reshape(4, 4), expected)
    # touching a cell's edge is no overlap; two boxes add up
    two = cells_in_boxes([(0, 0, 32, 32), (96, 96, 32, 32)], 128, 64, 16).reshape(4, 4)
    assert two.sum() == 2 and two[0, 0] and two[3, 3]


def test_pointing_hit_miss_and_ties():
    in_box = torch.tensor([False, True, True, False])
    assert pointing_scores(torch.tensor([0.1, 0.6, 0.2, 0.1]), in_box) == (1.0, pytest.approx(0.8))
    assert pointing_scores(torch.tensor([0.7, 0.1, 0.1, 0.1]), in_box) == (0.0, pytest.approx(0.2))
    # a peak shared by a cell in the box and one outside is a miss; shared inside the box, a hit
    assert pointing_scores(torch.tensor([0.4, 0.4, 0.1, 0.1]), in_box)[0] == 0.0
    assert pointing_scores(torch.tensor([0.1, 0.4, 0.4, 0.1]), in_box)[0] == 1.0
    assert pointing_scores(torch.full((4,), 0.25), in_box) == (0.0, 0.5)  # uniform: a tie everywhere


def test_a_word_that_matches_one_region_points_at_it():
    # hand-built features: region 6 of a 4 x 4 grid carries the word's direction, the others noise
    g = torch.Generator().manual_seed(1)
    regions = 0.1 * torch.randn(1, 16, 8, generator=g)
    words = 0.1 * torch.randn(1, 3, 8, generator=g)
    words[0, 1] = torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0])
    regions[0, 6] = torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0])
    att = word_region_attention(regions, words, torch.ones(1, 3, dtype=torch.bool), None, 4.0)[0, 1]
    assert int(att.argmax()) == 6
    box_on = cells_in_boxes([(32, 16, 16, 16)], 64, 64, 16)  # row 1, column 2 = cell 6
    box_off = cells_in_boxes([(0, 48, 16, 16)], 64, 64, 16)  # cell 12
    assert pointing_scores(att, box_on)[0] == 1.0
    assert pointing_scores(att, box_off)[0] == 0.0
    assert pointing_scores(att, box_on)[1] > 1 / 16 > pointing_scores(att, box_off)[1]


# ---- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A tiny archive, and a truth file that holds every field the protocols read: the generator's
    own where it writes them, else lateral_needed = seen on the lateral only, and a lateral box
    (the frontal one) so that the lateral pointing game has items."""
    root = tmp_path_factory.mktemp("claims")
    generate_archive(root / "a", studies=140, seed=11, fmt="mimic", size=64, split_fractions=(0.2, 0.1, 0.7),
                     progress=False)
    lines = []
    for line in (root / "a" / "synth_truth.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for f in rec["findings"]:
            f.setdefault("lateral_needed", bool(f["visible_lateral"] and not f["visible_frontal"]))
            f.setdefault("bbox_lateral", f["bbox_frontal"] if f["visible_lateral"] else None)
        lines.append(json.dumps(rec))
    truth = root / "truth" / "synth_truth.jsonl"
    truth.parent.mkdir()
    truth.write_text("\n".join(lines) + "\n")
    (truth.parent / "synth_manifest.json").write_text((root / "a" / "synth_manifest.json").read_text())
    return root / "a", truth


def _model(seed: int, **overrides):
    torch.manual_seed(seed)
    return create_model("tiny", **overrides).eval()


@pytest.fixture(scope="module")
def runs(archive):
    data, truth = archive
    return [evaluate_claims(_model(s), data, truth, seed=s, n_resamples=1000) for s in (0, 1)]


def test_end_to_end_on_a_tiny_archive(archive, runs):
    r = runs[0]
    assert set(r["metrics"]) <= set(METRICS)
    assert r["skipped_studies"] == [] and r["synth_version"] and r["seed"] == 0
    for prefix in ("strata/all/", "strata/lateral_needed/", "laterality/", "pointing/frontal/", "pointing/lateral/",
                   "pointing/all/"):
        assert any(k.startswith(prefix) for k in r["metrics"]), prefix
    for name, m in r["metrics"].items():
        vals = r["items"][name]["values"]
        assert len(vals) == len(r["items"][name]["ids"]) == m["n"] > 0, name
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in vals), name
        assert m["mean"] == pytest.approx(sum(vals) / len(vals))
        assert m["ci"][0] <= m["mean"] + 1e-12 and m["mean"] <= m["ci"][1] + 1e-12, name
    c = r["counts"]
    assert c["strata"]["n_all"] == r["metrics"]["strata/all/i2t_P@5"]["n"] > 20
    assert c["strata"]["n_lateral_needed"] + c["strata"]["n_frontal_favoured"] <= c["strata"]["n_all"]
    assert c["laterality"]["keys"] >= 2 and c["laterality"]["n_queries_text"] == 3 * c["laterality"]["keys"]
    assert c["pointing"]["n_word_not_in_text"] == 0  # every phrase holds its class word
    n_point = c["pointing"]["n_frontal"] + c["pointing"]["n_lateral"]
    assert r["metrics"]["pointing/all/hit_rate"]["n"] == n_point > 50
    # the random-peak baseline lands near its expectation (the share of box cells), within ~3 SE
    m = r["metrics"]
    expected = m["pointing/all/random_mass_in_box"]["mean"]
    se = math.sqrt(expected * (1 - expected) / n_point)
    assert abs(m["pointing/all/random_hit_rate"]["mean"] - expected) < 3.5 * se + 1e-9
    # the random baseline does not depend on the model: the same items and draws for every seed
    assert runs[1]["items"]["pointing/all/random_hit_rate"] == r["items"]["pointing/all/random_hit_rate"]
    assert runs[1]["items"]["laterality/t2i_P@5"]["ids"] == r["items"]["laterality/t2i_P@5"]["ids"]


def test_seeds_and_comparisons(archive, runs, tmp_path):
    agg = aggregate_runs(runs, n_resamples=1000)
    assert agg["n_seeds"] == 2 and agg["seeds"] == [0, 1]
    for name, m in agg["metrics"].items():
        assert m["per_seed"] == pytest.approx([runs[0]["metrics"][name]["mean"], runs[1]["metrics"][name]["mean"]])
        assert m["mean"] == pytest.approx(sum(m["per_seed"]) / 2)
    same = compare_claims(runs[0], runs[0], n_resamples=1000)
    assert all(d["diff"] == 0.0 and d["ci"] == [0.0, 0.0] for d in same["metrics"].values())
    diff = compare_claims(runs, runs[::-1], n_resamples=1000)
    assert set(diff["metrics"]) == set(agg["metrics"])
    table = format_claims_table({"seed 0": runs[0], "two seeds": agg}, comparison=compare_claims(runs[0], runs[1]))
    assert "| laterality/side_accuracy |" in table and "n seeds = 2" in table and "difference" in table
    with pytest.raises(StatsError, match="at least 2 training seeds"):
        aggregate_runs(runs[:1])
    with pytest.raises(ClaimsError, match="different seed"):
        aggregate_runs([runs[0], runs[0]])
    path = write_claims(tmp_path / "claims.json", agg)
    assert json.loads(path.read_text())["n_seeds"] == 2


def test_a_one_view_model_against_a_two_view_model(archive, runs):
    data, truth = archive
    clip = evaluate_claims(_model(0, vision={"num_views": 1}), data, truth, seed=0, n_resamples=1000,
                           protocols=("pointing", "strata"))
    assert "pointing/lateral/hit_rate" not in clip["metrics"] and "pointing/frontal/hit_rate" in clip["metrics"]
    # the random-peak baseline draws per item: the frontal items get the same draws with or without lateral items
    assert clip["items"]["pointing/frontal/random_hit_rate"] == runs[0]["items"]["pointing/frontal/random_hit_rate"]
    cmp = compare_claims(runs[0], clip, n_resamples=1000)
    assert "strata/lateral_needed/i2t_P@5" in cmp["metrics"] and "pointing/frontal/hit_rate" in cmp["metrics"]
    assert "pointing/lateral/hit_rate" in cmp["not_compared"] and "pointing/all/hit_rate" in cmp["not_compared"]
    assert "laterality/i2t_P@5" in cmp["not_compared"]
    # the same two-view model read from its frontal view alone: same items, other numbers
    front = evaluate_claims(_model(0), data, truth, seed=0, n_resamples=1000, views="frontal", protocols=("strata",))
    assert front["items"]["strata/all/i2t_P@5"]["ids"] == runs[0]["items"]["strata/all/i2t_P@5"]["ids"]


def test_a_model_with_constant_regions_points_nowhere(archive):
    # every region the same vector: the attention is uniform, every peak a tie, so a hit needs a
    # box that covers the whole view; the mass in the box is the box's share of the cells
    data, truth = archive
    model = _model(0)
    with torch.no_grad():
        model.image_local_head.fc2.weight.zero_()
    r = evaluate_claims(model, data, truth, protocols=("pointing",), n_resamples=1000)
    items = r["items"]
    assert items["pointing/all/mass_in_box"]["values"] == pytest.approx(items["pointing/all/random_mass_in_box"]["values"])
    assert items["pointing/all/hit_rate"]["values"] == [float(v == 1.0) for v in items["pointing/all/random_mass_in_box"]["values"]]
    study = next(s for s in open_dataset(data) if s.split == "test")
    grid = attention_map(model, study, "effusion", "right pleural effusion")
    assert grid.shape == (4, 4) and torch.allclose(grid, torch.full((4, 4), 1 / 16))


def test_an_old_archive_is_refused_naming_the_fix(archive, tmp_path):
    data, truth = archive
    old = tmp_path / "synth_truth.jsonl"
    lines = []
    for line in truth.read_text().splitlines():
        rec = json.loads(line)
        for f in rec["findings"]:
            f.pop("lateral_needed")
            f.pop("bbox_lateral")
        lines.append(json.dumps(rec))
    old.write_text("\n".join(lines) + "\n")
    (tmp_path / "synth_manifest.json").write_text((truth.parent / "synth_manifest.json").read_text())
    model = _model(0)
    with pytest.raises(ClaimsError, match=r"\(synth archive version [\w.]+\) has no 'lateral_needed'.*regenerate it"):
        evaluate_claims(model, data, old, protocols=("strata",), n_resamples=1000)
    with pytest.raises(ClaimsError, match=r"no 'bbox_lateral'.*pointing_views=\('frontal',\)"):
        evaluate_claims(model, data, old, protocols=("pointing",), n_resamples=1000)
    r = evaluate_claims(model, data, old, protocols=("pointing", "laterality"), pointing_views=("frontal",),
                        n_resamples=1000)
    assert "pointing/frontal/hit_rate" in r["metrics"] and "pointing/lateral/hit_rate" not in r["metrics"]
    # a truth file of another archive (here: most studies missing) is refused, naming the file
    other = tmp_path / "other" / "synth_truth.jsonl"
    other.parent.mkdir()
    other.write_text("\n".join(lines[:5]) + "\n")
    with pytest.raises(ClaimsError, match=r"studies of split 'test' are not in .*pass the truth file of this archive"):
        evaluate_claims(model, data, other, n_resamples=1000)
    with pytest.raises(ClaimsError, match="does not exist"):
        evaluate_claims(model, data, tmp_path / "missing.jsonl", n_resamples=1000)


def test_the_pointing_game_reads_the_words_the_local_loss_reads(archive):
    # loss.local_words = "content": the words-softmax runs over the content words only, as in the
    # loss. The finding phrases hold content words only ("right pleural effusion"), so there the
    # attention is the all-words one; a report's stop-words and negated words drop out and change it
    data, truth = archive
    kw = dict(protocols=("pointing",), pointing_views=("frontal",), n_resamples=1000)
    content, plain = _model(0, loss={"local_words": "content"}), _model(0)
    phrase = [evaluate_claims(m, data, truth, **kw) for m in (content, plain)]
    assert phrase[0]["counts"]["pointing"]["n_word_not_in_text"] == 0
    assert phrase[0]["items"] == phrase[1]["items"]
    report = [evaluate_claims(m, data, truth, pointing_text="report", **kw) for m in (content, plain)]
    a, b = (r["items"]["pointing/frontal/mass_in_box"] for r in report)
    assert len(a["ids"]) > 20
    shared = set(a["ids"]) & set(b["ids"])
    va, vb = dict(zip(a["ids"], a["values"])), dict(zip(b["ids"], b["values"]))
    assert len(shared) > 20 and sum(abs(va[i] - vb[i]) > 1e-6 for i in shared) > len(shared) // 2


def test_clinvla_eval_claims_on_the_command_line(archive, tmp_path, capsys):
    """`clinvla eval --claims` prints the claims table and writes it with the classic results."""
    from clinvla_engine.cli import main
    from clinvla_engine.model.checkpoint import save_checkpoint

    data, truth = archive
    save_checkpoint(_model(0), tmp_path / "run")
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "run"), "--data", str(data), "--per-class", "5", "--claims",
                 "--truth", str(truth), "--train-seed", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "claims protocols" in printed and "| pointing/frontal/hit_rate |" in printed
    saved = json.loads(out.read_text())
    assert saved["claims"]["seed"] == 3 and "strata/all/i2t_P@10" in saved["claims"]["metrics"]
    assert "5x200" in saved
