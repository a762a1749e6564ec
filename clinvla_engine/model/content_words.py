"""Which words of a report the local (word-to-region) loss should align: its content words.

A report's words are not all about the image. The local loss (loss.local_words = "content") skips:

* punctuation, and stop-words (function words and report filler such as "is", "the", "seen");
* negation triggers and every word in their scope, NegEx-style (Chapman et al. 2001): a trigger
  before the negated term ("no", "not", "without", "negative for", "free of", "absence of", ...)
  negates until the end of its clause; one after it ("... has resolved", "... is absent") negates
  from the start of the clause. A clause ends at ".", ";", ":", "but", "however", "although",
  "except", "which", and at "," unless the clause goes on with "or"/"nor" (a negated list, "no
  focal consolidation, pleural effusion, or pneumothorax", negates all of it);
* pseudo-negations ("no change", "not only") are not triggers: their own words are skipped, the
  rest of the clause stays content.

A word is what BERT's pre-tokenizer makes a word (split at spaces and punctuation); its WordPiece
pieces are all in or all out (``Tokenizer(..., content_mask=True)`` maps these word flags onto the
pieces, and drops a word cut in two by truncation). The rules run once per text, when it is
tokenized (the training collate does it in the loader workers), never in the training step.
"""
from __future__ import annotations

from typing import Sequence

STOP_WORDS = frozenset("""
a an the this that these those there here it its it's they them their he she his her we our you your
i me my
is are was were be been being am has have had having do does did done will would shall should can
could may might must
of in on at by for from to into onto over under with within as than then so such
and or nor if when while where who whom whose what which how why also both either each any all some
very more most less much many few again further still yet now just only same other another
per via upon about above below between through during before after
seen noted identified demonstrated visualized visualised appreciated present evident appears appear
appearing seems given compared comparison prior study studies exam examination image images view views
""".split())

# pre-triggers: negate from the trigger to the end of the clause
PRE_TRIGGERS = (
    ("no",), ("not",), ("without",), ("negative", "for"), ("free", "of"), ("absence", "of"), ("absent",),
    ("resolution", "of"), ("resolved",), ("neither",), ("nor",), ("never",), ("none",), ("denies",),
    ("rule", "out"), ("ruled", "out"), ("clear", "of"), ("removal", "of"), ("cannot", "be", "seen"),
)
# post-triggers: negate from the start of the clause to the trigger ("the effusion has resolved")
POST_TRIGGERS = (
    ("has", "resolved"), ("have", "resolved"), ("had", "resolved"), ("is", "resolved"), ("are", "resolved"),
    ("has", "cleared"), ("have", "cleared"), ("is", "absent"), ("are", "absent"), ("is", "excluded"),
    ("are", "excluded"), ("was", "excluded"), ("were", "excluded"), ("is", "ruled", "out"),
    ("was", "ruled", "out"), ("no", "longer", "seen"), ("no", "longer", "visible"), ("no", "longer", "present"),
)
# pseudo-negations: look like a trigger, negate nothing
PSEUDO_TRIGGERS = (
    ("no", "change"), ("no", "interval", "change"), ("no", "significant", "change"), ("no", "increase"),
    ("not", "only"), ("not", "necessarily"), ("without", "change"), ("no", "significant", "interval", "change"),
)
CLAUSE_ENDS = frozenset({".", ";", ":", "!", "?", "but", "however", "although", "though", "except", "which",
                         "whereas", "yet"})
LIST_GOES_ON = frozenset({"or", "nor"})


def _is_punctuation(word: str) -> bool:
    return not any(ch.isalnum() for ch in word)


def _match(words: Sequence[str], i: int, phrases: Sequence[tuple[str, ...]]) -> int:
    """Length of the longest phrase of `phrases` starting at words[i] (0 when none)."""
    best = 0
    for phrase in phrases:
        n = len(phrase)
        if n > best and tuple(words[i:i + n]) == phrase:
            best = n
    return best


def _clauses(words: Sequence[str]) -> list[tuple[int, int]]:
    """[start, end) spans of the clauses: split at CLAUSE_ENDS, and at a comma unless an "or"/"nor"
    follows later in the same clause (a list)."""
    spans, start = [], 0
    hard = [i for i, w in enumerate(words) if w in CLAUSE_ENDS] + [len(words)]
    for end in hard:
        cut = start
        for i in range(start, end):
            if words[i] == "," and not any(w in LIST_GOES_ON for w in words[i + 1:end]):
                spans.append((cut, i))
                cut = i + 1
        spans.append((cut, end))
        start = end + 1
    return [(a, b) for a, b in spans if b > a]


def content_flags(words: Sequence[str]) -> list[bool]:
    """For each word (lower-case, in order, punctuation marks as words of their own), whether it is
    a content word: not punctuation, not a stop-word, not a negation trigger, not negated."""
    words = [w.lower() for w in words]
    flags = [not _is_punctuation(w) and w not in STOP_WORDS and w not in CLAUSE_ENDS for w in words]
    for start, end in _clauses(words):
        i = start
        while i < end:
            n = _match(words, i, PSEUDO_TRIGGERS)
            if n:
                for j in range(i, min(i + n, end)):
                    flags[j] = False
                i += n
                continue
            n = _match(words, i, POST_TRIGGERS)
            if n:
                for j in range(start, min(i + n, end)):
                    flags[j] = False
                i += n
                continue
            n = _match(words, i, PRE_TRIGGERS)
            if n:
                for j in range(i, end):
                    flags[j] = False
                break
            i += 1
    return flags
