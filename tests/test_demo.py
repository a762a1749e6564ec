"""`clinvla demo --quick`: the whole path (synthesise, train both models, evaluate, report)."""
import json

import pytest

from clinvla_engine.demo import run_demo


@pytest.mark.timeout(600)
def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    results = run_demo(out, quick=True)
    assert set(results) == {"clinvla", "clip"}
    for name in results:
        for proto in ("5x200", "8x200", "instance"):
            assert proto in results[name]
    html = (out / "report.html").read_text()
    assert "<table>" in html and html.count("data:image/png;base64,") == 4 * 5
    assert (out / "loss_curves.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert saved["clinvla"]["train"]["steps"] == 12
    printed = capsys.readouterr().out
    assert "| metric |" in printed and "ClinVLA (2 views" in printed
    # a second run reuses the archive and both finished runs
    run_demo(out, quick=True)
    assert "reusing the finished run" in capsys.readouterr().out


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not made by the demo"):
        run_demo(tmp_path, quick=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
