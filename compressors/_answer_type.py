"""What kind of answer a question asks for, and which text spans could be one (a cheap, lexical QA prior).

Sentence selection by similarity to the question keeps the sentences that *restate* the question (titles,
headings, the sentence that names the topic) and loses the one that answers it, which often shares few words with
it: "who is playing the halftime show?" is answered by "Justin Timberlake was the featured performer". Classic
factoid QA systems fix this with the expected answer type: a "when" question wants a date, "who" a name, "how
many" a number. `answer_type()` reads that off the question's wording (English), and `candidates()` flags the
units holding a span of that type that the question does not already contain.
"""

from __future__ import annotations

import re

_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
          r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")
_PLACES = r"(?:country|city|state|region|place|town|county|province|continent|river|island|nation|location|capital)"
_TYPES = [
    ("date", re.compile(r"\b(?:when|what (?:year|date|time|day|month|century|decade|era|period)|which (?:year|date|"
                        r"century|decade|season|episode)|how long ago|since when)\b")),
    ("number", re.compile(r"\bhow (?:many|much|large|big|long|old|far|tall|high|often|fast|deep|wide|heavy|"
                          r"small)\b|\bwhat (?:percentage|percent|number|amount|size|rate|population|age|score)\b")),
    ("place", re.compile(rf"\bwhere\b|\b(?:what|which)(?: \w+)? {_PLACES}\b")),
    ("person", re.compile(r"\b(?:who|whom|whose)\b|\b(?:what|which)(?: \w+)? (?:person|actor|actress|player|"
                          r"author|writer|singer|president|king|queen|artist|director|character|team|company|"
                          r"band)\b")),
    ("entity", re.compile(r"^\s*(?:what|which|name|list)\b")),
]
_NUMBER_WORDS = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen twenty "
                 "thirty forty fifty hundred thousand million billion trillion dozen first second third fourth fifth")
_DATE = re.compile(rf"\b{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?\b"
                   rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH}\b(?:,?\s+\d{{4}}\b)?"
                   rf"|\b{_MONTH}\.?\s+\d{{4}}\b|\b(?:1\d{{3}}|20\d{{2}})s?\b"
                   r"|\b(?:century|centuries|decade|season \w+|\d+(?:st|nd|rd|th) season)\b", re.IGNORECASE)
_NUMBER = re.compile(rf"(?<![\w.])\d[\d,.]*%?|\b(?:{'|'.join(_NUMBER_WORDS.split())})\b", re.IGNORECASE)
# Runs of capitalised words (allowing a few lower-case particles inside names: "Fulgencio Batista y Zaldívar").
_NAME = re.compile(r"\b[A-Z][\w'’.&-]*(?:\s+(?:(?:de|del|da|di|van|von|der|den|la|le|y|of|the|bin|al)\s+)*"
                   r"[A-Z][\w'’.&-]*)*")
_STOP = frozenset("""a an and are as at be but by for from has have he her his i in is it its of on or she that the
their them they this to was were what when where which who whom why will with would you your do does did how not no
there these those so such into about after before over under also been being our we us my me one if while during
""".split())


def answer_type(question: str) -> str | None:
    """`date`, `number`, `place`, `person`, `entity` (what/which/list questions) or None (not a question)."""
    q = " ".join(question.lower().split())
    for name, pat in _TYPES:
        if pat.search(q):
            return name
    return None


def _words(s: str) -> set[str]:
    return {w for w in re.findall(r"\w+", s.lower()) if w not in _STOP}


def candidates(question: str, texts: list[str]) -> list[bool]:
    """For each text: does it hold a span of the question's answer type that the question itself lacks?
    All False when the question has no recognisable type (e.g. an instruction rather than a question)."""
    kind = answer_type(question)
    if kind is None:
        return [False] * len(texts)
    qwords, ql = _words(question), question.lower()
    return [bool(_spans(kind, qwords, ql, t)) for t in texts]


def novel_words(question: str, text: str) -> int:
    """Content words of `text` the question does not contain: 0 for a title or heading that only restates it."""
    return len(_words(text) - _words(question))


def bridge_terms(question: str, texts: list[str], limit: int = 12) -> list[str]:
    """Names in `texts` (the best-matching sentences) that the question lacks: the entities a multi-hop question
    goes through ("the archivist Roosevelt appointed" -> "Archivist of the United States" -> the person)."""
    qwords = _words(question)
    out: list[str] = []
    for t in texts:
        for m in _NAME.finditer(t):
            for w in re.findall(r"\w+", m.group()):
                lw = w.lower()
                if lw not in qwords and lw not in _STOP and len(lw) > 1 and lw not in out:
                    out.append(lw)
    return out[:limit]


def answer_spans(question: str, text: str) -> list[tuple[int, int]]:
    """Char spans in `text` of the question's answer type that the question lacks (see `candidates`)."""
    kind = answer_type(question)
    return _spans(kind, _words(question), question.lower(), text) if kind else []


def _spans(kind: str, qwords: set[str], ql: str, text: str) -> list[tuple[int, int]]:
    out = []
    if kind in ("date", "entity"):
        out += [m.span() for m in _DATE.finditer(text) if m.group().lower() not in ql]
    if kind in ("number", "entity"):
        out += [m.span() for m in _NUMBER.finditer(text) if m.group().lower() not in qwords]
    if kind in ("person", "place", "entity"):
        for m in _NAME.finditer(text):
            words = _words(m.group())
            if words and len(words - qwords) * 2 >= len(words):  # mostly new words: not the question's own names
                out.append(m.span())
    return sorted(out)
