"""Structure-aware compression of JSON (tool results, API responses): the output still parses.

Long arrays keep their first and last items around one string that counts what was left out; long strings keep
their head and say how many characters were cut; every key and every kept value keeps its type. Only when that is
not enough (an object of thousands of keys, very deep nesting) are keys left out (a `"…"` key counts them) and, as
the last step, deep containers summarised as a string. The first level of shortening that fits the budget wins, so
as much of the document as fits is kept, and the same input always gives the same output.

With `markers=True` every cut says `ctxc:<id>`, where `<id>` is the content address (`marker_id`) of what was cut,
and `Compressed.info["cut_spans"]` lists `(id, original JSON text)`: a store that keeps those (`ctxc serve` does) can give
any cut back.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..errors import MethodError
from ..tokenizers import Tokenizer
from .base import Compressed, Compressor, run_stage

MARKER_HEX = 16  # 64 bits: a wrong expansion by collision stays negligible for billions of stored spans
_NO_LIMIT = 1 << 30


def marker_id(text: str) -> str:
    """The content address of a cut span (what `ctxc:<id>` markers carry)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:MARKER_HEX]


MAX_DEPTH = 100  # deeper documents are treated as text: the shrinker recurses, and nobody reads such nesting


def parse_json_document(text: str):
    """The parsed value when `text` is a JSON object or array nested at most MAX_DEPTH deep, else None (scalars,
    prose and pathological nesting are not structured)."""
    s = text.strip()
    if not s or s[0] not in "[{":
        return None
    try:
        value = json.loads(s)
    except (ValueError, RecursionError):
        return None
    return value if _depth_at_most(value, MAX_DEPTH) else None


def _depth_at_most(value, limit: int) -> bool:
    """Whether containers nest at most `limit` deep (iterative: the input may be as deep as the parser allows)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            if d > limit:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def dumps_compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class _Limits:
    items: int  # an array longer than 2*items+1 keeps `items` at each end
    chars: int  # a string longer than chars (+ the note's length) keeps its first `chars`
    keys: int  # an object keeps its first `keys` keys
    depth: int  # containers nested deeper become a one-line summary string


def _levels() -> list[_Limits]:
    """Ever stronger shortening, gentlest first: items and strings shrink geometrically (an array keeps at least its
    first and last item, so its element type stays visible); only after that do arrays lose every item, then
    objects their keys and nested containers their structure (that is where keys and types stop being kept). The
    top-level container always stays a container."""
    out = [_Limits(_NO_LIMIT, _NO_LIMIT, _NO_LIMIT, _NO_LIMIT)]
    f = 1.0
    while f * 2000 > 16:
        out.append(_Limits(max(1, int(32 * f)), max(16, int(2000 * f)), _NO_LIMIT, _NO_LIMIT))
        f *= 0.8
    for keys, depth in ((_NO_LIMIT, _NO_LIMIT), (32, _NO_LIMIT), (16, 16), (8, 8), (4, 4), (2, 3), (1, 2), (0, 1)):
        out.append(_Limits(0, 16, keys, depth))
    return out


LEVELS = _levels()


class _Shrinker:
    def __init__(self, limits: _Limits, markers: bool):
        self.lim, self.markers = limits, markers
        self.cuts: dict[str, str] = {}  # originals by id, with markers
        self.n_cuts = 0

    def _mark(self, original) -> str:
        self.n_cuts += 1
        if not self.markers:
            return ""
        text = original if isinstance(original, str) else dumps_compact(original)
        mid = marker_id(text)
        self.cuts.setdefault(mid, text)
        return f"ctxc:{mid}"

    def shrink(self, v, depth: int = 0):
        if isinstance(v, str):
            return self._string(v)
        if isinstance(v, list):
            if depth >= self.lim.depth:
                return self._summary(v, f"{len(v)} items")
            return self._array(v, depth)
        if isinstance(v, dict):
            if depth >= self.lim.depth:
                return self._summary(v, f"{len(v)} keys")
            return self._object(v, depth)
        return v

    def _summary(self, v, what: str) -> str:
        mark = self._mark(v)
        return f"… {what} omitted{' (' + mark + ')' if mark else ''}"

    def _string(self, s: str) -> str:
        if len(s) <= self.lim.chars + 24:  # cutting less than the note itself costs would make it longer
            return s
        cut = len(s) - self.lim.chars
        mark = self._mark(s)
        return f"{s[: self.lim.chars]}… (+{cut} chars{', ' + mark if mark else ''})"

    def _array(self, v: list, depth: int) -> list:
        k = self.lim.items
        if len(v) <= 2 * k + 1:
            return [self.shrink(x, depth + 1) for x in v]
        gone = v[k: len(v) - k]
        mark = self._mark(gone)
        note = f"… {len(gone)} items omitted{' (' + mark + ')' if mark else ''} …"
        return [self.shrink(x, depth + 1) for x in v[:k]] + [note] + [self.shrink(x, depth + 1) for x in v[len(v) - k:]]

    def _object(self, v: dict, depth: int) -> dict:
        items = list(v.items())
        kept = items[: self.lim.keys]
        out = {k: self.shrink(x, depth + 1) for k, x in kept}
        if len(kept) < len(items):
            gone = dict(items[len(kept):])
            mark = self._mark(gone)
            key = "…" if "…" not in out else "…ctxc"
            out[key] = f"{len(gone)} more keys omitted{' (' + mark + ')' if mark else ''}"
        return out


def shrink_json(value, budget: int, tokenizer: Tokenizer, markers: bool = False) -> tuple[str, dict[str, str], int]:
    """The gentlest shortening of `value` whose compact JSON fits `budget` tokens: (JSON text, cut originals by id
    (with `markers`), how many cuts). Returns ("", {}, 0) when not even an empty container fits."""
    def render(lim: _Limits) -> tuple[str, dict[str, str], int]:
        s = _Shrinker(lim, markers)
        return dumps_compact(s.shrink(value)), s.cuts, s.n_cuts

    def gentlest(candidates: list[_Limits]):
        """Binary search for the first of `candidates` (ordered gentlest first, each rendering at most as long as
        the one before, up to BPE noise that the count catches) that fits: (index, rendering) or None."""
        lo, hi, best = 0, len(candidates) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            out = render(candidates[mid])
            if tokenizer.count(out[0]) <= budget:
                best, hi = (mid, out), mid - 1
            else:
                lo = mid + 1
        return best

    found = gentlest(LEVELS)
    if found is None:
        empty = "[]" if isinstance(value, list) else "{}" if isinstance(value, dict) else '""'
        return (empty, {}, 1) if tokenizer.count(empty) <= budget else ("", {}, 1)
    level, best = found
    lim = LEVELS[level]
    if 0 < level and lim.keys == _NO_LIMIT:
        # One level is often much shorter than the budget: give each dimension back what still fits, strings first
        # (the items' content), then the number of items.
        for field in ("chars", "items"):
            steps = [_Limits(**{**lim.__dict__, field: getattr(LEVELS[j], field)}) for j in range(level + 1)]
            more = gentlest(steps)
            if more is not None:
                lim, best = steps[more[0]], more[1]
    return best


@dataclass
class JsonCompressor(Compressor):
    """JSON stays JSON: long arrays keep head and tail items plus an omitted count, long strings are shortened.

    Parameters
    ----------
    markers: every cut carries `ctxc:<id>`, the content address of what was cut (info["cuts"] holds the originals).
    fallback: the method for input that is not a JSON object or array.
    """

    name = "json"
    markers: bool = False
    fallback: str = "extractive"

    def __post_init__(self):
        from .registry import parse_spec

        if any(name == "json" for name, _ in parse_spec(self.fallback)):
            raise MethodError(f"json's fallback {self.fallback!r} would call json again", "use e.g. extractive")

    def compress(self, text: str, budget: int, tokenizer: Tokenizer, query: str | None = None) -> Compressed:
        value = parse_json_document(text)
        if value is None:
            from .registry import get_compressor

            inner = get_compressor(self.fallback, self.settings)
            res = run_stage(inner, text, budget, tokenizer, query, self.progress)
            res.info["fallback"] = self.fallback
            return res
        out, cuts, n_cuts = shrink_json(value, budget, tokenizer, self.markers)
        info: dict = {"structured": True, "cuts": n_cuts}
        if self.markers:
            info["cut_spans"] = sorted(cuts.items())
        # Re-serialised JSON is not a span of the input, so no kept offsets are claimed.
        return Compressed(out, [], info)
