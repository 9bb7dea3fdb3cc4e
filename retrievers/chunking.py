"""Token-aware chunking that follows the structure of the text.

A document is cut into *blocks* along its structure (paragraphs for prose, heading sections for Markdown,
`def`/`class` statements for Python via `ast`, indentation/brace blocks for other code). Blocks are packed greedily
into chunks of at most `chunk_tokens` tokens; a block that alone is too big is opened up into its parts (sentences,
nested definitions, lines, finally words). Breaks that fall inside running prose carry `overlap` tokens of the
previous chunk over, so a fact on a boundary is whole in at least one chunk; breaks at headings and definitions
do not (the structure already separates them).

Every chunk is a verbatim span of the document: `text == doc[start:end]`, with 1-based inclusive line numbers.

>>> [c.text for c in chunk_text("One. Two.\\n\\nThree.", chunk_tokens=4, overlap=0)]
['One. Two.', 'Three.']
"""

from __future__ import annotations

import ast
import bisect
import re
from dataclasses import asdict, dataclass

from ..document import paragraphs, sentences_in, words_in
from ..filetypes import kind_of
from ..tokenizers import Tokenizer, get_tokenizer

_HEADING = re.compile(r"^(#{1,6})[ \t]+\S|^(#{1,6})$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SETEXT = re.compile(r"^(=+|-+)\s*$")


@dataclass(frozen=True)
class Chunk:
    """A verbatim span of one document: `[start, end)` in characters, `start_line..end_line` (1-based, inclusive)."""

    path: str
    start: int
    end: int
    start_line: int
    end_line: int
    tokens: int
    text: str

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def citation(self) -> str:
        return f"{self.path}:{self.start_line}-{self.end_line}"


@dataclass
class _Block:
    start: int
    end: int
    hard: bool  # a break before this block is structural (heading/definition): no overlap carried across it
    parts: "list[_Block] | None" = None  # finer blocks, used when this one is too big


class _Lines:
    """Char offsets of line starts, for line numbers and line-aligned spans."""

    def __init__(self, text: str):
        self.text = text
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def __len__(self) -> int:
        return len(self.starts)

    def line_of(self, pos: int) -> int:
        """1-based line number of character `pos`."""
        return bisect.bisect_right(self.starts, pos)

    def span(self, first: int, last: int) -> tuple[int, int]:
        """Char span of 0-based lines first..last inclusive, without the final newline."""
        s = self.starts[first]
        e = self.starts[last + 1] - 1 if last + 1 < len(self.starts) else len(self.text)
        return s, e


def _strip(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


# ---------------------------------------------------------------------------------------------------------------
# Blocks per kind of text


def _prose_blocks(text: str, start: int = 0, end: int | None = None, hard: bool = False) -> list[_Block]:
    end = len(text) if end is None else end
    out = []
    for i, (ps, pe) in enumerate(paragraphs(text[start:end])):
        ps, pe = ps + start, pe + start
        sents = [_Block(s, e, False) for s, e in sentences_in(text, ps, pe)]
        out.append(_Block(ps, pe, hard and i == 0, sents if len(sents) > 1 else None))
    return out


def _line_blocks(text: str, lines: _Lines, first: int, last: int) -> list[_Block]:
    out = []
    for i in range(first, last + 1):
        s, e = lines.span(i, i)
        if text[s:e].strip():
            out.append(_Block(s, e, False))
    return out


def _markdown_blocks(text: str) -> list[_Block]:
    lines = _Lines(text)
    raw = text.split("\n")
    heads: list[int] = []
    in_fence = False
    for i, line in enumerate(raw):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if _HEADING.match(line):
            heads.append(i)
        elif i > 0 and raw[i - 1].strip() and _SETEXT.match(line) and not _HEADING.match(raw[i - 1]):
            if (i - 1) not in heads and (i < 2 or not raw[i - 2].strip()):
                heads.append(i - 1)
    bounds = sorted(set([0] + heads)) + [len(raw)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        if a >= b:
            continue
        s, e = lines.span(a, b - 1)
        s, e = _strip(text, s, e)
        if e <= s:
            continue
        out.append(_Block(s, e, a in heads, _prose_blocks(text, s, e)))
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


_CLOSER = re.compile(r"^\s*([}\])]|end\b|fi\b|done\b|esac\b|</)")


def _indent_blocks(text: str, lines: _Lines, first: int, last: int) -> list[_Block]:
    """Split lines first..last at lines with the smallest indentation (a brace-closing line stays with its block);
    each block opens into the next level down when it is too big."""
    raw = [text[slice(*lines.span(i, i))] for i in range(first, last + 1)]
    content = [i for i, ln in enumerate(raw) if ln.strip()]
    if not content:
        return []
    base = min(_indent(raw[i]) for i in content)
    starts = [i for i in content if _indent(raw[i]) == base and not _CLOSER.match(raw[i])]
    if not starts or starts[0] != content[0]:
        starts = [content[0]] + starts
    starts = sorted(set(starts))
    # Comments and decorators right above a block belong to it.
    merged: list[int] = []
    for i in starts:
        if merged and i - 1 == merged[-1] and re.match(r"\s*(#|//|/\*|\*|@|--)", raw[merged[-1]]):
            continue
        merged.append(i)
    out = []
    bounds = merged + [len(raw)]
    for a, b in zip(bounds, bounds[1:]):
        s, e = lines.span(first + a, first + b - 1)
        s, e = _strip(text, s, e)
        if e <= s:
            continue
        la, lb = lines.line_of(s) - 1, lines.line_of(e - 1) - 1
        inner = None
        if lb > la:
            inner = _indent_blocks(text, lines, la + 1, lb) if la + 1 <= lb else []
            head = _Block(*lines.span(la, la), False)
            inner = [head] + inner if len(inner) > 1 else _line_blocks(text, lines, la, lb)
        out.append(_Block(s, e, True, inner))
    return out


def _python_blocks(text: str) -> list[_Block]:
    lines = _Lines(text)
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return _indent_blocks(text, lines, 0, len(lines) - 1)

    def node_span(node) -> tuple[int, int]:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        return first, node.end_lineno - 1

    def blocks_of(body: list, lo: int, hi: int) -> list[_Block]:
        """Blocks for statements `body` that cover lines lo..hi (gaps such as comments go with the next node)."""
        out: list[_Block] = []
        cursor = lo
        for k, node in enumerate(body):
            a, b = node_span(node)
            a = min(a, max(cursor, lo)) if k else lo
            b = hi if k == len(body) - 1 else b
            if a > b:
                continue
            s, e = _strip(text, *lines.span(a, b))
            if e <= s:
                cursor = b + 1
                continue
            inner = None
            sub = [n for n in getattr(node, "body", []) if isinstance(n, ast.stmt)]
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and len(sub) > 1:
                body_first = node_span(sub[0])[0]
                head = [_Block(*_strip(text, *lines.span(a, body_first - 1)), True)] if body_first > a else []
                inner = head + blocks_of(sub, body_first, b)
            elif b > a:
                inner = _line_blocks(text, lines, a, b)
            hard = isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            out.append(_Block(s, e, hard, inner))
            cursor = b + 1
        return out

    stmts = list(tree.body)
    if not stmts:
        return _prose_blocks(text)
    return blocks_of(stmts, 0, len(lines) - 1)


# ---------------------------------------------------------------------------------------------------------------
# Packing blocks into chunks


class _Packer:
    def __init__(self, text: str, path: str, tok: Tokenizer, chunk_tokens: int, overlap: int):
        self.text, self.path, self.tok = text, path, tok
        self.size, self.overlap = chunk_tokens, overlap
        self.lines = _Lines(text)
        self.spans: list[tuple[int, int]] = []
        self.cur: list[tuple[int, int, int]] = []  # (start, end, tokens) of the atoms in the open chunk
        self.cur_tokens = 0

    def count(self, s: int, e: int) -> int:
        return self.tok.count(self.text[s:e])

    def _cost(self, s: int, n: int) -> int:
        """Tokens an atom adds to the open chunk: itself plus the whitespace gap before it."""
        if not self.cur:
            return n
        gap = self.text[self.cur[-1][1] : s]
        return n + (self.tok.count(gap) if gap else 0)

    def _recount(self) -> None:
        self.cur_tokens = self.count(self.cur[0][0], self.cur[-1][1]) if self.cur else 0

    def flush(self, carry: bool) -> None:
        if not self.cur:
            return
        # Per-atom counts are estimates (BPE is not additive): the chunk is counted exactly and atoms that push it
        # over spill into the next chunk.
        spill: list[tuple[int, int, int]] = []
        while len(self.cur) > 1 and self.count(self.cur[0][0], self.cur[-1][1]) > self.size:
            spill.insert(0, self.cur.pop())
        self.spans.append((self.cur[0][0], self.cur[-1][1]))
        kept: list[tuple[int, int, int]] = []
        if carry and self.overlap > 0:
            n = 0
            for atom in reversed(self.cur[1:]):  # never carry the whole chunk over
                if n + atom[2] > self.overlap:
                    break
                kept.insert(0, atom)
                n += atom[2]
        self.cur = kept
        self._recount()
        for atom in spill:
            self._place(*atom, carry=carry)

    def _place(self, s: int, e: int, n: int, carry: bool) -> None:
        if self.cur and self.cur_tokens + self._cost(s, n) > self.size:
            self.flush(carry)
            # An overlap that no longer leaves room for the new atom is dropped.
            while self.cur and self.cur_tokens + self._cost(s, n) > self.size:
                self.cur.pop(0)
                self._recount()
        self.cur_tokens += self._cost(s, n)
        self.cur.append((s, e, n))

    def add(self, block: _Block, hard: bool) -> None:
        n = self.count(block.start, block.end)
        if n <= self.size:
            # A block that fits joins the open chunk when there is room (so a run of tiny definitions makes one
            # chunk); otherwise it starts the next one, carrying overlap only across breaks inside running text.
            self._place(block.start, block.end, n, carry=not hard)
            return
        parts = block.parts
        if not parts:
            parts = self._words(block)
            if len(parts) <= 1:  # one enormous "word": cut it by tokens
                self._cut_tokens(block, hard)
                return
        if hard and self.cur:
            self.flush(carry=False)
        for i, p in enumerate(parts):
            self.add(p, p.hard and i > 0)

    def _words(self, block: _Block) -> list[_Block]:
        words = words_in(self.text, block.start, block.end)
        # Group words into runs of about a quarter chunk, so overlap still works on huge one-line paragraphs.
        out, i, step = [], 0, max(8, self.size // 6)
        while i < len(words):
            j = min(len(words), i + step)
            out.append(_Block(words[i][0], words[j - 1][1], False))
            i = j
        if len(out) > 1 and any(self.count(b.start, b.end) > self.size for b in out):
            out = [_Block(s, e, False) for s, e in words]
        return out

    def _cut_tokens(self, block: _Block, hard: bool) -> None:
        s = block.start
        while s < block.end:
            piece = self.tok.truncate(self.text[s : block.end], self.size)
            if not piece:
                piece = self.text[s : s + 1]
            self._place(s, s + len(piece), self.count(s, s + len(piece)), carry=not hard)
            hard = False
            s += len(piece)

    def chunks(self) -> list[Chunk]:
        while self.cur:
            self.flush(carry=False)
        out = []
        for s, e in self.spans:
            s, e = _strip(self.text, s, e)
            if e <= s:
                continue
            n = self.count(s, e)
            ls = self.text.rfind("\n", 0, s) + 1
            if ls < s and not self.text[ls:s].strip(" \t") and self.count(ls, e) <= max(n, self.size):
                s = ls  # keep the first line's indentation (it matters in code) when the chunk still fits
                n = self.count(s, e)
            body = self.text[s:e]
            out.append(Chunk(self.path, s, e, self.lines.line_of(s), self.lines.line_of(e - 1), n, body))
        return out


def chunk_text(
    text: str,
    path: str = "",
    chunk_tokens: int = 200,
    overlap: int = 32,
    tokenizer: "str | Tokenizer | None" = None,
    kind: str | None = None,
) -> list[Chunk]:
    """Cut `text` into chunks of at most about `chunk_tokens` tokens, following its structure (see module doc).

    `kind` ('prose', 'markdown', 'python', 'code') defaults to what the file name of `path` suggests. Chunk sizes are
    counted per chunk with `tokenizer` (default cl100k); a chunk goes over only when a single word does.
    """
    from ..errors import InputError

    if chunk_tokens < 4:
        raise InputError(f"chunk size {chunk_tokens} is too small", "use --chunk-tokens of at least 4")
    if overlap < 0 or overlap >= chunk_tokens:
        raise InputError(f"overlap {overlap} must be >= 0 and below the chunk size {chunk_tokens}", "lower --overlap")
    tok = get_tokenizer(tokenizer)
    kind = kind or kind_of(path)
    if kind == "markdown":
        blocks = _markdown_blocks(text)
    elif kind == "python":
        blocks = _python_blocks(text)
    elif kind == "code":
        lines = _Lines(text)
        blocks = _indent_blocks(text, lines, 0, len(lines) - 1)
    else:
        blocks = _prose_blocks(text)
    packer = _Packer(text, path, tok, chunk_tokens, overlap)
    for i, b in enumerate(blocks):
        packer.add(b, b.hard and i > 0)
    return packer.chunks()
