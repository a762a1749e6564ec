"""The C++ WordPiece tokenizer (csrc/libclinvla/tokenizer.cpp, through its C API) gives exactly the
Hugging Face tokenizer's ids.

The driver tests/cpp/tokenize_main.cpp and the tokenizer's sources are compiled with g++ once per
module (a few seconds) into a temporary folder. The reference is transformers.BertTokenizer (the
`tokenizers` library), as the Python runtime's Tokenizer (model/text.py) uses it; both vocabularies
of the package are tested, lowercasing, at max_length 64 and 512, on tests/data/report_sentences.txt
(tools/make_report_sentences.py) and on every Unicode code point.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "clinvla_engine" / "assets"
VOCABS = {"minilm": ASSETS / "minilm_vocab.txt", "bundled": ASSETS / "bundled_vocab.txt"}
CORPUS = ROOT / "tests" / "data" / "report_sentences.txt"
SOURCES = ["tests/cpp/tokenize_main.cpp", "csrc/libclinvla/tokenizer.cpp",
           "csrc/libclinvla/tokenizer_c_api.cpp", "csrc/libclinvla/unicode_tables.cpp"]

# clinvla_status codes (clinvla.h)
OK, ERR_INVALID, ERR_IO, ERR_FORMAT = 0, 1, 2, 3


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (g++ or c++ on PATH, or $CXX): cannot build the tokenizer driver")
    exe = tmp_path_factory.mktemp("tokenizer_cpp") / "tokenize_main"
    cmd = [cxx, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-DCLINVLA_TOKENIZE_STANDALONE",
           f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc' / 'libclinvla'}",
           *[str(ROOT / s) for s in SOURCES], "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"building the tokenizer driver failed:\n{' '.join(cmd)}\n{proc.stderr}"
    return exe


def run_driver(exe: Path, vocab: Path, texts: list[str], max_length: int, lowercase: bool = True,
               nul: bool = False) -> list[list[int]]:
    sep = "\0" if nul else "\n"
    for t in texts:
        assert sep not in t, f"text {t!r} holds the record separator"
    data = "".join(t + sep for t in texts).encode("utf-8")
    args = [str(exe), str(vocab), str(int(lowercase)), str(max_length)] + (["--nul"] if nul else [])
    proc = subprocess.run(args, input=data, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = proc.stdout.decode().split("\n")[:-1]
    assert len(lines) == len(texts), f"{len(texts)} texts in, {len(lines)} lines out"
    errors = [(t, ln) for t, ln in zip(texts, lines) if ln.startswith("ERROR")]
    assert not errors, f"the C API refused {len(errors)} texts, e.g. {errors[:3]}"
    return [[int(x) for x in ln.split()] for ln in lines]


def hf_tokenizer(vocab: Path, lowercase: bool = True):
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert import load_vocab

    # transformers 5: BertTokenizer(vocab_file=...) ignores the file; the vocabulary goes in as a dict
    return BertTokenizer(vocab=load_vocab(str(vocab)), do_lower_case=lowercase)


def hf_ids(vocab: Path, texts: list[str], max_length: int, lowercase: bool = True) -> list[list[int]]:
    tok = hf_tokenizer(vocab, lowercase)
    return tok(texts, truncation=True, max_length=max_length)["input_ids"]


def read_corpus() -> list[str]:
    # "\n" separates lines; CR, NEL, U+2028 etc. inside a line belong to it (see the generator)
    return CORPUS.read_bytes().decode("utf-8").split("\n")[:-1]


def first_mismatches(texts, got, want, n=5):
    bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    return f"{len(bad)} of {len(texts)} texts differ, e.g. " + "; ".join(
        f"{t!r}: C++ {g} vs HF {w}" for t, g, w in bad[:n])


def test_corpus_is_large_and_hard():
    lines = read_corpus()
    assert len(lines) >= 2000
    text = "\n".join(lines)
    for needle in ("café", "naïve", "Ünïcödé", "Sjögren", "—", "“", "°", "µ", "中文", "😀", "\u200b", "\t",
                   "\x07", "3.5 cm", "T7-T8", "1/2", "[MASK]", "b" * 101, "effusion"):
        assert needle in text, f"the corpus has no {needle!r}"
    assert "" in lines and " " in lines, "the corpus needs empty and whitespace-only lines"
    assert sum(len(ln.split()) > 30 for ln in lines) > 100, "the corpus needs whole reports"


@pytest.mark.parametrize("max_length", [64, 512])
@pytest.mark.parametrize("vocab", sorted(VOCABS))
def test_corpus_equals_hugging_face(driver, vocab, max_length):
    texts = read_corpus()
    got = run_driver(driver, VOCABS[vocab], texts, max_length)
    want = hf_ids(VOCABS[vocab], texts, max_length)
    assert got == want, first_mismatches(texts, got, want)
    # the corpus reaches truncation, unknown words and special tokens, so they are compared too
    tok = hf_tokenizer(VOCABS[vocab])
    assert any(len(ids) == max_length for ids in want) or max_length == 512
    assert any(tok.unk_token_id in ids for ids in want)
    assert all(ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id for ids in got)


def test_cased_equals_hugging_face(driver):
    texts = read_corpus()
    got = run_driver(driver, VOCABS["minilm"], texts, 512, lowercase=False)
    want = hf_ids(VOCABS["minilm"], texts, 512, lowercase=False)
    assert got == want, first_mismatches(texts, got, want)


def test_python_runtime_tokenizer_agrees(driver):
    """The runtime's own Tokenizer (model/text.py), which refuses empty texts, on the rest."""
    from clinvla_engine.model.text import Tokenizer

    texts = [t for t in read_corpus() if t.strip()]
    for name in sorted(VOCABS):
        tok = Tokenizer(VOCABS[name].read_text(encoding="utf-8"), True, 64)
        ids, _ = tok(texts)
        # unpadded rows end at their last [SEP] (its mask would also hide a "[PAD]" written in a text)
        want = [row[: len(row) - row[::-1].index(tok.sep_id)] for row in ids.tolist()]
        got = run_driver(driver, VOCABS[name], texts, 64)
        assert got == want, first_mismatches(texts, got, want)


def test_multiline_reports_equal_hugging_face(driver):
    """Whole reports with their line breaks (as the DICOM and MIMIC loaders give them)."""
    import numpy as np

    from clinvla_engine.data import reports
    from clinvla_engine.data.synth.records import sample_findings

    texts = []
    for i in range(40):
        rng = np.random.default_rng([7, i])
        report = reports.write_report(sample_findings(rng), rng)
        texts.append(report.text())
        texts.append(reports.mimic_report_text(report, rng, examination="CHEST (PA AND LAT)", sex="Female"))
    assert all("\n" in t for t in texts)
    for max_length in (64, 512):
        got = run_driver(driver, VOCABS["minilm"], texts, max_length, nul=True)
        want = hf_ids(VOCABS["minilm"], texts, max_length)
        assert got == want, first_mismatches(texts, got, want)


def test_code_points_equal_hugging_face(driver):
    """Unicode scalar values between letters: all of the BMP (but NUL and newline, which a record
    cannot hold), every assigned one above it and every 64th unassigned one (the generator,
    tools/gen_unicode_tables.py, checks the tables on all of them; this checks the C++ using them)."""
    import unicodedata

    cps = [cp for cp in range(1, 0x110000) if not (0xD800 <= cp <= 0xDFFF) and cp != 0x0A
           and (cp < 0x10000 or cp % 64 == 0 or unicodedata.category(chr(cp)) != "Cn")]
    per_line = 400
    texts = [" ".join(f"a{chr(cp)}b" for cp in cps[i:i + per_line]) for i in range(0, len(cps), per_line)]
    got = run_driver(driver, VOCABS["minilm"], texts, 1 << 20)
    want = hf_ids(VOCABS["minilm"], texts, 1 << 20)
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, (f"{len(bad)} of {len(texts)} lines differ; first: code points "
                     f"U+{cps[bad[0] * per_line]:04X}..U+{cps[min(len(cps), bad[0] * per_line + per_line) - 1]:04X}")


def test_c_api_errors(driver, tmp_path):
    missing = tmp_path / "no_such_dir" / "vocab.txt"
    proc = subprocess.run([str(driver), "--errors", str(missing), str(VOCABS["minilm"])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cases = {}
    for line in proc.stdout.splitlines()[:-1]:  # the last line shows the last error after a success
        name, rest = line.split(" ", 1)
        status, _, message = rest.partition(" ")
        cases[name] = (int(status), message)
    status, message = cases["missing_vocab"]
    assert status == ERR_IO and str(missing) in message and "No such file" in message, message
    assert cases["missing_vocab_out_is_null"][0] == OK
    for name in ("null_path", "null_out", "null_tokenizer", "null_text", "null_ids", "null_n_ids"):
        status, message = cases[name]
        assert status == ERR_INVALID and "null pointer" in message, (name, message)
    assert cases["null_path"][1] == "clinvla_tokenizer_load: vocab_path is a null pointer"
    status, message = cases["max_length_1"]
    assert status == ERR_INVALID and "max_length must be at least 2" in message and "got 1" in message
    assert cases["ok"][0] == OK
    ok_n = int(cases["ok_n"][0])
    assert ok_n == len(hf_ids(VOCABS["minilm"], ["small right pleural effusion."], 64)[0])
    status, message = cases["max_ids_too_small"]
    assert status == ERR_INVALID and "room for 3" in message and f"needs {ok_n}" in message, message
    assert int(cases["max_ids_too_small_n"][0]) == ok_n  # the size to allocate
    assert cases["max_ids_negative"][0] == ERR_INVALID
    for name in ("bad_utf8", "overlong_utf8", "surrogate_utf8"):
        status, message = cases[name]
        assert status == ERR_INVALID and "not valid UTF-8" in message and "offset" in message, (name, message)
    assert "byte 0xC3 at offset 3" in cases["bad_utf8"][1]
    assert cases["ok_again"][0] == OK
    assert proc.stdout.splitlines()[-1] == "last_error_after_ok []"


@pytest.mark.parametrize("content, fragment", [
    (b"", "holds no tokens"),
    (b"[PAD]\n[UNK]\n[CLS]\n\n[SEP]\na\n", "line 4 is blank"),
    (b"[PAD]\n[UNK]\n[CLS]\na\n", "has no [SEP] token"),
    (b"[PAD]\n[UNK]\n[CLS]\n[SEP]\na\rb\n", "line 5 holds a line-break character"),
    (b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n\xff\n", "is not UTF-8 text: byte 0xFF at offset 24 (line 5)"),
])
def test_bad_vocabulary_is_refused(driver, tmp_path, content, fragment):
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(content)
    proc = subprocess.run([str(driver), str(vocab), "1", "64"], input=b"x\n", capture_output=True)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert f"status {ERR_FORMAT}" in err and fragment in err and str(vocab) in err, err


def test_crlf_vocabulary_and_trailing_blank_lines(driver, tmp_path):
    lines = VOCABS["bundled"].read_text(encoding="utf-8").split("\n")
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
    texts = read_corpus()[:300]
    assert run_driver(driver, vocab, texts, 64) == hf_ids(VOCABS["bundled"], texts, 64)


def test_tokenizes_10k_lines_well_under_a_second(driver):
    lines = [t for t in read_corpus() if "\r" not in t]
    lines = (lines * (10_000 // len(lines) + 1))[:10_000]
    proc = subprocess.run([str(driver), "--bench", str(VOCABS["minilm"]), "512"],
                          input="\n".join(lines).encode("utf-8") + b"\n", capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    n, seconds, n_ids = proc.stdout.split()
    assert int(n) == 10_000 and int(n_ids) > 10_000 * 3
    # measured at about 0.05 s on a shared 2-core CI box; the bound leaves room for a loaded machine
    assert float(seconds) < 1.0, f"tokenising 10,000 report lines took {float(seconds):.3f} s"
