"""Writes tests/data/report_sentences.txt: the corpus on which the C++ WordPiece tokenizer must give
exactly the Hugging Face tokenizer's ids (tests/test_tokenizer_cpp.py).

The file is UTF-8, one text per line, lines separated by "\\n" only (read it as bytes and split on
b"\\n": a line may hold CR, VT, FF, NEL, U+2028 and other characters that Python's text mode or
str.splitlines() would break at). It holds, deterministically (fixed seeds, no clock):

* the synthetic report writer's sentences (clinvla_engine/data/reports.py) and whole reports as
  the training pipeline sees them (dataset.report_text: headers removed, one line), from
  `N_REPORTS` seeded studies;
* hand-written hard cases: punctuation runs, numbers, decimals and units, accents and other
  non-ASCII text, CJK, emoji, zero-width and control characters, tabs, special tokens written in
  the text, unknown and very long words (over 100 characters), empty and whitespace-only lines;
* some synthetic sentences with a hard fragment spliced in, so that hard cases meet real wording.

An empty line is a text of its own: it tokenises to [CLS] [SEP], as in Hugging Face (the
Python Tokenizer refuses empty texts before tokenising; the C API does not, see the test).
NUL cannot occur (the C API takes NUL-terminated strings).

Run: .venv/bin/python tools/make_report_sentences.py [--check]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "report_sentences.txt"
N_REPORTS = 1200
SEED = 14

HARD = [
    # punctuation runs and spacing
    "No pneumothorax!!! ... ?!?", "Effusion (small) [right] {left}; <none>.", "--- *** ___ ~~~ ```",
    "Heart:normal;lungs:clear,no effusion.", "''quoted'' and \"double\" and `back`", "a/b\\c|d^e_f=g+h",
    "#1. @ 50% & $100 -- see ref. #23", "....", "?", "((()))[[[]]]", "end with punctuation.",
    "Comma,,,separated,,,values", "It's the patient's 2nd film; it isn't changed.",
    # numbers, decimals, units, levels
    "3.5 cm nodule", "A 12 x 8 mm opacity.", "T7-T8 and L1/L2 levels", "1/2 of the hemithorax",
    "0.5mm, 10cm, 2.25 in", "1,234,567 cells/uL", "Compared to 01/02/2023 at 14:35.", "-3.0e-4",
    "pH 7.35; pCO2 45 mmHg; SpO2 92%", "IVC filter at L2-3.", "x2 views, 3rd rib, 11th rib",
    "100000000000000000000000000000", "3½ cm", "2² + 3³", "①②③", "Ⅳ stage", "½ ¼ ¾",
    # accents and non-ASCII
    "café naïve résumé", "Ünïcödé TÉST ÀÉÎÕÜ", "Sjögren syndrome", "Pneumothorax – small — stable",
    "“Curly quotes” and ‘single’ ones", "Temperature 38.5°C, 101°F", "5 µm and 5 μm", "Ångström and Å",
    "Straße GROSS ß ẞ", "İstanbul ıI", "ΟΔΟΣ οδός Σίσυφος", "Ελληνικά κείμενα", "Русский текст, ЛЁГКИЕ",
    "עברית טקסט", "العربية نص", "हिन्दी पाठ", "ไทย ข้อความ", "한국어 흉부 방사선", "日本語のレポート、カタカナ",
    "中文报告：右侧胸腔积液。", "肺炎 and pneumonia", "𠀀𠀁 ext-b ideographs", "豈 更 車 compat ideographs",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ﬁnding ﬂuid", "e\u0301 decomposed accent", "a\u0308\u0323 two marks",
    "Ω ohm Ω", "№ 5", "™ ® ©", "…ellipsis…", "«guillemets» ‹single›", "¿Qué? ¡Sí!", "§ 3 ¶ 4",
    "• bullet • list", "→ arrow ← ↑ ↓", "± 2 mm, ≤ 5, ≥ 3, ≠ 4", "× 3 ÷ 2", "€5 £3 ¥2",
    # emoji and symbols
    "Patient 😀 happy 👍🏽", "🫁 lungs 🫀 heart", "👨‍👩‍👧 family", "🇺🇸 flag", "⚠️ warning", "✓ done ✗ not",
    # zero-width, control, whitespace characters
    "zero\u200bwidth\u200cjoiner\u200dchars", "soft\u00adhyphen", "bom\ufeffinside", "rtl\u200fmark\u200e",
    "tab\tseparated\tvalues", "\tleading tab", "trailing tab\t", "bell\x07 and escape\x1b[0m",
    "del\x7f char", "form\x0cfeed", "vertical\x0btab", "carriage\rreturn", "next\x85line",
    "line\u2028separator", "para\u2029separator", "no\u00a0break\u00a0space", "thin\u2009space",
    "ideographic\u3000space", "ogham\u1680space", "replacement\ufffdchar", "private\ue000use",
    "unassigned\u0378code", "file\x1csep\x1dgroup\x1erecord\x1funit", "c1\x80\x9fcontrols",
    # special tokens written in the text
    "see [MASK] here", "[CLS] starts [SEP] ends", "x[UNK]y", "[PAD][PAD]", "[cls] lowercase is not special",
    "[MAS K] broken", "[[CLS]]", "[SEP", "[MASK]]",
    # unknown and long words
    "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "qqqqzzzzxxxx", "a" * 100, "b" * 101, "word " + "c" * 150 + " word", "ab" * 60,
    "é" * 101, "x" + "é" * 99, "pre" + "-" * 120 + "post", "1" * 101, "日" * 120,
    "hyper" * 21, "antidisestablishmentarianism " * 3,
    # case
    "MIXED Case Words", "UPPERCASE REPORT: NO ACUTE PROCESS.", "camelCaseWord", "HTTPS://EXAMPLE.COM/path?q=1",
    "email@example.com", "C:\\Users\\report.txt",
    # empty and whitespace-only
    "", " ", "   ", "\t", " \t \t ", "\u00a0", "\u3000", "\u200b",
]


def synthetic(n_reports: int) -> tuple[list[str], list[str]]:
    """(unique sentences, unique one-line reports) in the order the writer produces them."""
    from clinvla_engine.data import reports
    from clinvla_engine.data.dataset import report_text
    from clinvla_engine.data.synth.records import sample_findings

    sentences: dict[str, None] = {}
    full: dict[str, None] = {}
    for i in range(n_reports):
        rng = np.random.default_rng([SEED, i])
        lateral = bool(rng.random() < 0.7)
        findings = sample_findings(rng, None, lateral=lateral)
        report = reports.write_report(findings, rng, has_lateral=lateral)
        for m in report.mentions:
            sentences.setdefault(m.text, None)
        full.setdefault(report_text(report.text()), None)
    return list(sentences), list(full)


def corpus() -> list[str]:
    sentences, full = synthetic(N_REPORTS)
    rng = np.random.default_rng(SEED)
    spliced = []
    for k, s in enumerate(sentences[::3]):
        frag = HARD[int(rng.integers(len(HARD)))]
        words = s.split(" ")
        at = int(rng.integers(len(words) + 1))
        spliced.append(" ".join(words[:at] + [frag] + words[at:]))
    lines = sentences + HARD + spliced + full
    for line in lines:
        if "\n" in line or "\x00" in line:
            raise ValueError(f"corpus line {line!r} holds a newline or NUL, which the format cannot carry")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that the committed file is up to date")
    args = ap.parse_args()
    data = "".join(line + "\n" for line in corpus()).encode("utf-8")
    if args.check:
        if not OUT.is_file() or OUT.read_bytes() != data:
            print(f"{OUT} is out of date: run python tools/make_report_sentences.py", file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{OUT.name}.tmp-", dir=OUT.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, OUT)
    n_lines = data.count(b"\n")
    print(f"wrote {OUT}: {n_lines} lines, {len(data):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
