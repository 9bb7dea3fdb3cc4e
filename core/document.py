"""Documents and units: character spans of the input that compressors keep or drop, and rendering them back.

Units never copy or rewrite text: a unit is `(start, end)` into the document, so whatever a compressor keeps is
verbatim and `kept` offsets in the JSON output point straight into the input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

GAP_MARK = "…"

# A sentence ends at . ! ? … (plus closing quotes/brackets) followed by whitespace and an opening character.
_SENT_END = re.compile(r"""(?<=[.!?…。！？])["'”’)\]]*\s+(?=["'“‘(\[]?[\w¿¡])""")
# Tokens that end in a period without ending a sentence.
_ABBREV = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|e\.g|i\.e|cf|al|Inc|Ltd|Co|Corp|No|Nos|Fig|Figs|Vol|pp|Sec|Art|Jan|Feb|Mar|"
    r"Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|U\.S|U\.K|P\.L|Gen|Gov|Sen|Rep|Rev|Capt|Lt|Col|Maj|approx|est|Dept|Univ|viz)"
    r"|\b[A-Z])\.[\"'”’)\]]*$"
)
# A comma between digits ("July 21, 1861", "1, 2 and 3") is not a clause break: answers are often dates.
_CLAUSE_END = re.compile(r"(?<=[;:])\s+|(?<=,)(?<!\d,)\s+|(?<=\d,)\s+(?!\d)|\s+(?=[—–-]{1,2}\s)|(?<=\))\s+")
_MIN_CLAUSE_WORDS = 3
_BLANK = re.compile(r"\n[ \t]*\n\s*")
_BULLET = re.compile(r"^\s*(?:[-*•>#|]|\d+[.)]\s|[A-Za-z][.)]\s)")


@dataclass(frozen=True)
class Unit:
    """A span `[start, end)` of the document; `para` is the paragraph index, `level` how it was split."""

    start: int
    end: int
    para: int
    level: str = "sentence"

    def text(self, doc: str) -> str:
        return doc[self.start : self.end]


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def paragraphs(text: str) -> list[tuple[int, int]]:
    """Spans of blank-line separated blocks (stripped, non-empty)."""
    out, pos = [], 0
    for m in _BLANK.finditer(text):
        s, e = _strip_span(text, pos, m.start())
        if e > s:
            out.append((s, e))
        pos = m.end()
    s, e = _strip_span(text, pos, len(text))
    if e > s:
        out.append((s, e))
    return out


def _line_breaks_are_hard(block: str) -> list[int]:
    """Offsets (within block) of newlines that end a unit: after sentence punctuation, short lines, or before bullets.

    Newlines inside hard-wrapped prose (Gutenberg-style 70-column lines) are soft and do not split.
    """
    cuts = []
    lines = block.split("\n")
    pos = 0
    for i, line in enumerate(lines[:-1]):
        pos += len(line)
        nxt = lines[i + 1]
        stripped = line.rstrip()
        hard = (
            not stripped
            or stripped[-1] in ".!?:;…\"”)]"
            or (len(stripped) < 40 and not nxt.lstrip()[:1].islower())
            or bool(_BULLET.match(nxt))
            or not nxt.strip()
        )
        if hard:
            cuts.append(pos)
        pos += 1
    return cuts


def sentences_in(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Sentence spans inside `text[start:end]`."""
    block = text[start:end]
    cuts = set(_line_breaks_are_hard(block))
    bounds = []
    for m in _SENT_END.finditer(block):
        if not _ABBREV.search(block[max(0, m.start() - 12) : m.start()]):
            bounds.append((m.start(), m.end()))
    for c in cuts:
        bounds.append((c, c + 1))
    bounds.sort()
    out, pos = [], 0
    for b0, b1 in bounds:
        if b0 < pos:
            continue
        s, e = _strip_span(block, pos, b0)
        if e > s:
            out.append((start + s, start + e))
        pos = b1
    s, e = _strip_span(block, pos, len(block))
    if e > s:
        out.append((start + s, start + e))
    return out


def clauses_in(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Split a span at clause punctuation (, ; : dashes). A piece of fewer than `_MIN_CLAUSE_WORDS` words joins
    the one before it: "Los Angeles, California" or "Virginia," alone is a fragment no reader can use."""
    block = text[start:end]
    out: list[tuple[int, int]] = []
    pos = 0
    cuts = [(m.start(), m.end()) for m in _CLAUSE_END.finditer(block)] + [(len(block), len(block))]
    for a, b in cuts:
        s, e = _strip_span(block, pos, a)
        pos = b
        if e <= s:
            continue
        if out and len(block[s:e].split()) < _MIN_CLAUSE_WORDS:
            out[-1] = (out[-1][0], start + e)
        else:
            out.append((start + s, start + e))
    return out


def words_in(text: str, start: int, end: int) -> list[tuple[int, int]]:
    return [(start + m.start(), start + m.end()) for m in re.finditer(r"\S+", text[start:end])]


def split_units(text: str) -> list[Unit]:
    """Paragraphs → sentences, in document order. Memoised for the last few texts: one `extractive+tokens` call
    has the method, its relevance scorer and the pipeline's next stage all asking for the same document's units."""
    return list(_split_units(text))


@lru_cache(maxsize=8)
def _split_units(text: str) -> tuple[Unit, ...]:
    units: list[Unit] = []
    for p, (ps, pe) in enumerate(paragraphs(text)):
        for s, e in sentences_in(text, ps, pe):
            units.append(Unit(s, e, p, "sentence"))
    return tuple(units)


def _longest_fit(lo: int, hi: int, start: int, too_big) -> int:
    """The largest end in (start, hi] (at least lo) with not too_big(start, end), by binary search."""
    best = lo
    while lo <= hi:
        mid = (lo + hi) // 2
        if not too_big(start, mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def refine_units(text: str, units: list[Unit], too_big) -> list[Unit]:
    """Replace every unit for which `too_big(start, end)` holds by clauses, then runs of words, and a single word
    that alone is too big (a 4,000-character token string) by pieces of characters: finer units, same order, so
    something always fits."""
    out: list[Unit] = []
    for u in units:
        if not too_big(u.start, u.end):
            out.append(u)
            continue
        for cs, ce in clauses_in(text, u.start, u.end):
            if not too_big(cs, ce):
                out.append(Unit(cs, ce, u.para, "clause"))
                continue
            # Group words greedily into the largest runs that still fit.
            words = words_in(text, cs, ce)
            i = 0
            while i < len(words):
                j = i + 1
                lo, hi = i + 1, len(words)
                while lo <= hi:  # binary search the longest run words[i:j] that fits
                    mid = (lo + hi) // 2
                    if not too_big(words[i][0], words[mid - 1][1]):
                        j, lo = mid, mid + 1
                    else:
                        hi = mid - 1
                ws, we = words[i][0], words[j - 1][1]
                if j == i + 1 and too_big(ws, we):
                    a = ws
                    while a < we:
                        b = _longest_fit(a + 1, we, a, too_big)
                        out.append(Unit(a, b, u.para, "chars"))
                        a = b
                else:
                    out.append(Unit(ws, we, u.para, "words"))
                i = j
    return out


def separator(text: str, prev: Unit, nxt: Unit, adjacent: bool, mark_gaps: bool) -> str:
    """What goes between two kept units: the original gap when they are neighbours, else a normalised break."""
    gap = text[prev.end : nxt.start]
    if adjacent:
        return gap
    if mark_gaps:
        return f"\n{GAP_MARK}\n"
    if "\n" in gap:
        return "\n\n" if re.search(r"\n[ \t]*\n", gap) else "\n"
    return " "


@dataclass
class Rendered:
    text: str
    kept: list[tuple[int, int]] = field(default_factory=list)


def render(text: str, units: list[Unit], keep: "list[int] | set[int]", mark_gaps: bool = False) -> Rendered:
    """Join the kept units (indices into `units`) in document order; `kept` holds merged char spans of the input."""
    idx = sorted(set(keep))
    if not idx:
        return Rendered("", [])
    parts: list[str] = []
    kept: list[list[int]] = []
    if mark_gaps and units[idx[0]].start > 0 and text[: units[idx[0]].start].strip():
        parts.append(GAP_MARK + "\n")
    for n, i in enumerate(idx):
        u = units[i]
        if n:
            prev_i = idx[n - 1]
            adjacent = i == prev_i + 1
            parts.append(separator(text, units[prev_i], u, adjacent, mark_gaps))
            if adjacent:
                kept[-1][1] = u.end
            else:
                kept.append([u.start, u.end])
        else:
            kept.append([u.start, u.end])
        parts.append(text[u.start : u.end])
    if mark_gaps and text[units[idx[-1]].end :].strip():
        parts.append("\n" + GAP_MARK)
    return Rendered("".join(parts), [(s, e) for s, e in kept])
