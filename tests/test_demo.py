"""`clinvla demo --quick`: the whole path (synthesise, train both models, evaluate, report)."""
import json

import pytest

from clinvla_engine.demo import run_demo


@pytest.mark.timeout(600)
def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    results = run_demo(out, quick=True)
    assert set(results["summaries"]) == {"clinvla", "clip"}
    for name, summary in results["summaries"].items():
        for metric in ("5x200/i2t_P@10", "8x200/t2i_P@10", "instance/i2t_R@10", "strata/all/i2t_P@10",
                       "pointing/frontal/hit_rate"):
            m = summary[metric]
            assert m["n_seeds"] == 2 and len(m["per_seed"]) == 2
            assert m["ci"][0] <= m["mean"] <= m["ci"][1]
    diff = results["comparisons"]["clinvla - clip"]["8x200/t2i_P@10"]
    assert diff["diff"] == pytest.approx(diff["mean_a"] - diff["mean_b"])
    assert len(results["verdict"]) == 2 and all(("met" in v) for v in results["verdict"])
    html = (out / "report.html").read_text()
    assert "<table>" in html and html.count("data:image/png;base64,") == 4 * 5
    assert (out / "loss_curves.png").stat().st_size > 1000
    study = json.loads((out / "study.json").read_text())
    assert study["seeds"] == [0, 1] and len(study["arms"]["clinvla"]["train_seconds"]) == 2
    assert {p.name for p in (out / "eval").iterdir()} == {f"{a}-seed{s}.json" for a in ("clinvla", "clip") for s in (0, 1)}
    printed = capsys.readouterr().out
    assert "| metric |" in printed and "ClinVLA (2 views" in printed and "2 training seed(s)" in printed
    # a second run reuses the archive and both finished runs
    run_demo(out, quick=True)
    assert "reusing the finished run" in capsys.readouterr().out
    # a recipe-search run on the demo's study folder: the recipe with one override, scored the same way
    from benchmarks import recipe_search

    assert recipe_search.main(["tau3_2", '{"loss": {"tau3": 2.0}}', "--out", str(out), "--quick", "--steps", "6"]) == 0
    line = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1])
    assert line["name"] == "tau3_2" and line["override"] == {"loss": {"tau3": 2.0}}
    assert 0.0 <= line["5x200/i2t_P@10"] <= 1.0 and "pointing/frontal/hit_rate" in line
    done = json.loads((out / "search" / "x-tau3_2-seed0" / "done.json").read_text())
    assert done["config"]["loss"]["tau3"] == 2.0 and done["config"]["vision"]["fusion"] == "attention"
    assert done["config"]["train"]["max_steps"] == 6
    assert json.loads((out / "search" / "results.jsonl").read_text().splitlines()[-1])["name"] == "tau3_2"
    # `make reproduce` on the same folder reuses the demo's runs and evaluations and writes its report;
    # the figures are named after the report, so two studies' reports can share a folder
    from benchmarks import reproduce

    report = tmp_path / "reports" / "study_a.md"
    report.parent.mkdir()
    # (with the two arms that start from the seed's MAE tower: ClinVLA and the baseline, both pretrained)
    assert reproduce.main(["--out", str(out), "--quick", "--seeds", "2", "--arms", "clinvla,clip,full,clip_mae",
                           "--quality", str(report)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing the evaluation") == 4, printed
    trained = sorted(line.split()[-4] for line in printed.splitlines()
                     if line.startswith(("[study] training ", "[study] pre-training ")))
    assert trained == sorted(f"{a}-seed{s}" for a in ("pretrain", "full", "clip_mae") for s in (0, 1)), printed
    text = report.read_text()
    assert "## Verdict against the paper's margins" in text and "| metric |" in text
    assert "## ClinVLA vs the CLIP baseline, both from the MAE tower: full - clip_mae" in text
    verdict = text.split("## Verdict")[1].split("##")[0]
    assert verdict.count("(from scratch): ClinVLA - CLIP") == 2, verdict
    assert verdict.count("(both from the MAE tower): ClinVLA - CLIP") == 2, verdict
    assert {p.name for p in report.parent.iterdir()} == {"study_a.md", "study_a_retrieval.png", "study_a_pointing.png"}
    assert "study_a_retrieval.png" in text and "study_a_pointing.png" in text


@pytest.mark.parametrize("args, message", [
    (["bad name", "{}"], "NAME must be"),
    (["ok", "{loss"], "OVERRIDE is not JSON"),
    (["ok", "[1]"], "must be a JSON object"),
    (["ok", "{}"], "holds no study archive"),
    (["ok", "{}", "--steps", "0"], "--steps must be"),
])
def test_recipe_search_refuses_bad_input(tmp_path, capsys, args, message):
    from benchmarks import recipe_search

    with pytest.raises(SystemExit):
        recipe_search.main(args + ["--out", str(tmp_path / "nothing")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not made by the demo"):
        run_demo(tmp_path, quick=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
