"""Writes csrc/libclinvla/unicode_tables.cpp: the Unicode data the C++ WordPiece tokenizer needs.

The C++ tokenizer (csrc/libclinvla/tokenizer.cpp) must give the same token ids as the Hugging Face
BERT tokenizer that the Python runtime uses (``tokenizers``' BertNormalizer + BertPreTokenizer +
WordPiece, which is also what ``transformers.BertTokenizer`` is since transformers 5). Its rules
need, per code point:

* DROP: removed by the text cleaning (NUL, U+FFFD, control characters: category Cc, Cf, Co, Cs
  except \\t\\n\\r; tokenizers keeps unassigned code points, Cn, which the legacy Python
  BasicTokenizer drops);
* SPACE: becomes a space (\\t \\n \\r, category Zs, and the other White_Space characters);
* PUNCT: split off as its own token (ASCII 33-47, 58-64, 91-96, 123-126, category P*);
* MN: dropped after NFD when accents are stripped (category Mn);
* the canonical combining class (NFD's canonical ordering), the full canonical decomposition (NFD;
  Hangul syllables are decomposed algorithmically in C++) and the lowercase mapping.

The base is Python's ``unicodedata`` (its Unicode version is written into the table, every code
point 0..0x10FFFF is covered). The Rust ``tokenizers`` library does not use one Unicode version:
its categories come from an older table (a character assigned since, such as U+2E5D or a new
nonspacing mark, is neither punctuation nor a mark there), its whitespace test is Rust's
White_Space (U+2028, U+2029 count as spaces), its CJK ranges differ from the legacy Python
BasicTokenizer's in one block (0x2B920, not 0x2B820) and its lowercase mapping is Rust's (newer
than Python 3.11's). So that C++ equals what Python actually computes, this script probes the
installed ``tokenizers`` once per code point and records where it differs from ``unicodedata`` as
overrides (listed, with counts, in the generated file's header), then checks that the finished
tables reproduce ``tokenizers``' normalizer and punctuation split for every code point.

Run (about a minute): .venv/bin/python tools/gen_unicode_tables.py [--check]
--check only verifies that the committed file equals what this script would write.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import unicodedata as ud
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "csrc" / "libclinvla" / "unicode_tables.cpp"

DROP, SPACE, PUNCT, MN = 1, 2, 4, 8
HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3
MAX_CP = 0x110000


def is_surrogate(cp: int) -> bool:
    return 0xD800 <= cp <= 0xDFFF


def is_cjk(cp: int) -> bool:
    # tokenizers' BertNormalizer::is_chinese_char (the legacy Python BasicTokenizer has 0x2B820)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B920 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def base_flags(cp: int) -> int:
    c = chr(cp)
    cat = ud.category(c)
    f = 0
    # tokenizers' control test covers Cc, Cf, Co and Cs but not Cn (unassigned code points stay)
    if cp == 0 or cp == 0xFFFD or (c not in "\t\n\r" and cat.startswith("C") and cat != "Cn"):
        f |= DROP
    if c in " \t\n\r" or cat == "Zs":
        f |= SPACE
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or cat.startswith("P"):
        f |= PUNCT
    if cat == "Mn":
        f |= MN
    return f


class Tables:
    """The tables as the C++ code reads them, and a Python model of the C++ normaliser over them."""

    def __init__(self):
        self.flags = [0] * MAX_CP
        self.ccc = [0] * MAX_CP
        self.decomp: dict[int, tuple[int, ...]] = {}
        self.lower: dict[int, tuple[int, ...]] = {}

    def decompose(self, cp: int) -> tuple[int, ...]:
        if HANGUL_FIRST <= cp <= HANGUL_LAST:  # the C++ does this algorithmically, as Unicode defines it
            s = cp - HANGUL_FIRST
            lead, vowel, trail = 0x1100 + s // 588, 0x1161 + (s % 588) // 28, 0x11A7 + s % 28
            return (lead, vowel) if trail == 0x11A7 else (lead, vowel, trail)
        return self.decomp.get(cp, (cp,))

    def normalize(self, cps: list[int], lowercase: bool) -> list[int]:
        """clean text -> CJK spacing -> (NFD, drop Mn) -> lowercase, as tokenizer.cpp does."""
        out: list[int] = []
        for cp in cps:
            f = self.flags[cp]
            if f & DROP:
                continue
            if f & SPACE:
                out.append(0x20)
            elif is_cjk(cp):
                out += [0x20, cp, 0x20]
            else:
                out.append(cp)
        if not lowercase:
            return out
        nfd: list[int] = []
        for cp in out:
            nfd += self.decompose(cp)
        # canonical ordering: a stable sort by combining class of every run of non-zero classes
        i = 0
        while i < len(nfd):
            if self.ccc[nfd[i]] == 0:
                i += 1
                continue
            j = i
            while j < len(nfd) and self.ccc[nfd[j]] != 0:
                j += 1
            nfd[i:j] = sorted(nfd[i:j], key=lambda c: self.ccc[c])
            i = j
        res: list[int] = []
        for cp in nfd:
            if not self.flags[cp] & MN:
                res += self.lower.get(cp, (cp,))
        return res


def build(verbose: bool = True) -> tuple[Tables, dict]:
    from tokenizers import normalizers, pre_tokenizers

    clean = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False,
                                       lowercase=False)
    strip = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=False, strip_accents=True,
                                       lowercase=False)
    lower = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=False, strip_accents=False,
                                       lowercase=True)
    full = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                      lowercase=True)
    cased = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                       lowercase=False)
    pre = pre_tokenizers.BertPreTokenizer()

    t = Tables()
    overrides = {"drop": [], "space": [], "punct": [], "mn": [], "decomp": [], "lower": []}
    for cp in range(MAX_CP):
        if is_surrogate(cp):
            t.flags[cp] = DROP  # never reached: the C++ refuses UTF-8 that encodes a surrogate
            continue
        c = chr(cp)
        t.flags[cp] = base_flags(cp)
        t.ccc[cp] = ud.combining(c)
        if not (HANGUL_FIRST <= cp <= HANGUL_LAST):
            d = ud.normalize("NFD", c)
            if d != c:
                t.decomp[cp] = tuple(map(ord, d))
        lo = c.lower()
        if lo != c:
            t.lower[cp] = tuple(map(ord, lo))

    def set_flag(cp: int, bit: int, on: bool, name: str):
        if bool(t.flags[cp] & bit) != on:
            t.flags[cp] = (t.flags[cp] | bit) if on else (t.flags[cp] & ~bit)
            overrides[name].append(cp)

    for cp in range(MAX_CP):
        if is_surrogate(cp):
            continue
        c = chr(cp)
        # text cleaning
        got = clean.normalize_str(c)
        set_flag(cp, DROP, got == "", "drop")
        if got != "":
            set_flag(cp, SPACE, got == " ", "space")
        # punctuation (only asked of characters that survive cleaning)
        if not t.flags[cp] & (DROP | SPACE):
            parts = [p for p, _ in pre.pre_tokenize_str("a" + c + "b")]
            set_flag(cp, PUNCT, parts == ["a", c, "b"], "punct")
        # nonspacing marks and decompositions: strip_accents = NFD then drop Mn
        got = strip.normalize_str(c)
        d = t.decompose(cp)
        if len(d) == 1:
            set_flag(cp, MN, got == "", "mn")
        kept = "".join(chr(x) for x in d if not t.flags[x] & MN)
        if kept != got:
            t.decomp[cp] = tuple(map(ord, got)) if got else (cp,)
            if not got:
                set_flag(cp, MN, True, "mn")
            overrides["decomp"].append(cp)
        # lowercase
        got = lower.normalize_str(c)
        if got != "".join(chr(x) for x in t.lower.get(cp, (cp,))):
            overrides["lower"].append(cp)
            if got == c:
                t.lower.pop(cp, None)
            else:
                t.lower[cp] = tuple(map(ord, got))

    # the finished tables must reproduce tokenizers for every code point
    bad = []
    for cp in range(MAX_CP):
        if is_surrogate(cp):
            continue
        c = chr(cp)
        for norm, lc in ((full, True), (cased, False)):
            want = norm.normalize_str(c)
            have = "".join(map(chr, t.normalize([cp], lc)))
            if want != have:
                bad.append((hex(cp), lc, want, have))
        if not t.flags[cp] & (DROP | SPACE):
            split = [p for p, _ in pre.pre_tokenize_str("a" + c + "b")] == ["a", c, "b"]
            if split != bool(t.flags[cp] & PUNCT):
                bad.append((hex(cp), "punct"))
    if bad:
        raise SystemExit(f"the tables disagree with tokenizers on {len(bad)} code points, e.g. {bad[:10]}")
    if verbose:
        print("overrides of unicodedata by tokenizers:", {k: len(v) for k, v in overrides.items()})
    return t, overrides


def runs(values: list[int]) -> list[tuple[int, int]]:
    out = []
    prev = None
    for cp, v in enumerate(values):
        if v != prev:
            out.append((cp, v))
            prev = v
    return out


def ranges(cps: list[int]) -> str:
    if not cps:
        return "none"
    parts, start, prev = [], cps[0], cps[0]
    for cp in cps[1:] + [None]:
        if cp is not None and cp == prev + 1:
            prev = cp
            continue
        parts.append(f"U+{start:04X}" if start == prev else f"U+{start:04X}-{prev:04X}")
        if cp is not None:
            start = prev = cp
    return ", ".join(parts)


def render(t: Tables, overrides: dict) -> str:
    import textwrap

    import tokenizers

    def wrap(items: list[str]) -> str:
        return "\n".join(textwrap.wrap(", ".join(items), width=100, initial_indent="    ",
                                       subsequent_indent="    ", break_on_hyphens=False))

    def mapping(name: str, table: dict[int, tuple[int, ...]]) -> str:
        entries, pool = [], []
        for cp in sorted(table):
            seq = table[cp]
            entries.append(f"{{0x{cp:X},{len(pool)},{len(seq)}}}")
            pool += seq
        return (f"const CodeMapping k{name}[] = {{\n{wrap(entries)}\n}};\n"
                f"const size_t k{name}Count = {len(entries)};\n"
                f"const char32_t k{name}Pool[] = {{\n{wrap([f'0x{x:X}' for x in pool])}\n}};\n")

    flag_runs = runs(t.flags)
    ccc_runs = runs(t.ccc)
    notes = "\n".join(
        "//   " + line for k, v in overrides.items()
        for line in textwrap.wrap(f"{k} ({len(v)}): {ranges(v)}", width=96, subsequent_indent="    "))
    return f"""// GENERATED by tools/gen_unicode_tables.py: do not edit; rerun the script instead.
//
// Unicode data of the WordPiece tokenizer (tokenizer.cpp) for every code point 0..0x10FFFF:
// Python {sys.version.split()[0]} unicodedata, Unicode {ud.unidata_version}, with the overrides that make it
// equal the Hugging Face tokenizers library {tokenizers.__version__} (the Python runtime's tokenizer):
{notes}
#include "tokenizer.hpp"

namespace clinvla {{
namespace unicode_tables {{

const char kUnicodeVersion[] = "{ud.unidata_version}";
const char kTokenizersVersion[] = "{tokenizers.__version__}";

// Runs of equal flags (DROP 1, SPACE 2, PUNCT 4, MN 8): run i covers [start_i, start_(i+1)).
const PropertyRun kFlagRuns[] = {{
{wrap([f'{{0x{s:X},{v}}}' for s, v in flag_runs])}
}};
const size_t kFlagRunCount = {len(flag_runs)};

// Runs of equal canonical combining class.
const PropertyRun kCccRuns[] = {{
{wrap([f'{{0x{s:X},{v}}}' for s, v in ccc_runs])}
}};
const size_t kCccRunCount = {len(ccc_runs)};

// Full canonical decompositions (NFD) except Hangul syllables, sorted by code point.
{mapping("Decomposition", t.decomp)}
// Lowercase mappings (one code point to one or more), sorted by code point.
{mapping("Lowercase", t.lower)}
}}  // namespace unicode_tables
}}  // namespace clinvla
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that the committed file is up to date")
    args = ap.parse_args()
    t, overrides = build()
    text = render(t, overrides)
    if args.check:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python tools/gen_unicode_tables.py", file=sys.stderr)
            return 1
        print(f"{OUT} is up to date")
        return 0
    fd, tmp = tempfile.mkstemp(prefix=f".{OUT.name}.tmp-", dir=OUT.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, OUT)
    print(f"wrote {OUT} ({len(text):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
