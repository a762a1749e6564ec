"""The text-tower benchmark runs and reports its three variants of the same function side by side."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_text_tower_reports_padded_packed_and_grouped(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_text_tower", "--out", str(tmp_path), "--batch", "6",
                           "--batches", "2", "--repeat", "2", "--groups", "3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((tmp_path / "text_tower.json").read_text())
    (case,) = data["cases"]
    rows = {r["variant"]: r for r in case["rows"]}
    assert list(rows) == ["padded", "packed", "packed + 3 attention groups"]
    assert rows["padded"]["baseline"] and all(r["median_ms"] > 0 and r["repeats"] == 2 for r in rows.values())
    assert all(r["speedup"] > 0 for r in rows.values() if not r["baseline"])
    tokens = data["params"]["tokens"]
    assert 0 < tokens["real"] < tokens["padded"]  # synthetic reports of unequal length: padding to skip
    assert "| packed + 3 attention groups |" in (tmp_path / "text_tower.md").read_text()


def test_bench_text_tower_refuses_bad_arguments():
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_text_tower", "--groups", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "--groups must be >= 2" in done.stderr
