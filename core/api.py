"""The library entry points the CLI calls: `compress()` and `count()`."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .budget import Budget
from .errors import InputError, OverBudgetError
from .tokenizers import Tokenizer, get_tokenizer


@dataclass
class CompressionResult:
    text: str
    input_tokens: int
    output_tokens: int
    budget: int
    tokenizer: str
    method: str
    kept: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.input_tokens / max(1, self.output_tokens)

    def to_json(self) -> dict:
        d = asdict(self)
        d["kept"] = [{"start": s, "end": e} for s, e in self.kept]
        d["seconds"] = round(self.seconds, 4)
        return d


def compress(
    text: str,
    budget: "str | int | Budget" = "x4",
    query: str | None = None,
    method: str = "extractive",
    tokenizer: "str | Tokenizer | None" = None,
    fail_if_over: bool = False,
    **options,
) -> CompressionResult:
    """Compress `text` to at most `budget` tokens of `tokenizer` (default cl100k).

    With a query, inputs over `coarse_threshold` tokens (option; default 32768, 0 = off) are first cut down by
    in-memory hybrid retrieval (see `_coarse_stage`).

    Input that already fits comes back unchanged. The token count of the returned text is checked here, after the
    method ran, so the guarantee holds for every method, including third-party ones.

    >>> r = compress("One. Two. Three.", budget=3, method="truncate"); r.output_tokens <= 3
    True
    """
    from .compressors.registry import get_compressor

    if not isinstance(text, str):
        raise InputError("input must be text", "decode bytes first, e.g. with ctxc.textio.decode_bytes")
    t0 = time.perf_counter()
    tok = get_tokenizer(tokenizer)
    b = Budget.parse(budget)
    n_in = tok.count(text)
    limit = b.resolve(n_in)
    comp = get_compressor(method, **options)
    if n_in <= limit:
        return CompressionResult(text, n_in, n_in, limit, tok.name, method, [(0, len(text))] if text else [],
                                 time.perf_counter() - t0, {"passthrough": True})
    coarse = _coarse_stage(text, n_in, limit, tok, query, method, options)
    if coarse and coarse.info["tokens"] <= limit:  # retrieval alone already fits: nothing left to choose
        from .compressors.base import Compressed

        res = Compressed(coarse.text, [(0, len(coarse.text))], {})
    else:
        res = comp.compress(coarse.text if coarse else text, limit, tok, query)
    out, kept = res.text, res.kept
    if coarse:
        kept = _map_back(kept, coarse.kept)
        res.info["coarse"] = coarse.info
    n_out = tok.count(out)
    if n_out > limit:  # a method broke its contract: cut rather than ever return more than the budget
        out = tok.truncate(out, limit)
        n_out = tok.count(out)
        res.info["hard_truncated"] = True
    if fail_if_over and not out.strip():
        raise OverBudgetError(f"nothing fits in a budget of {limit} tokens", "raise the budget")
    return CompressionResult(out, n_in, n_out, limit, tok.name, method, list(kept), time.perf_counter() - t0, res.info)


# --- Coarse first stage ------------------------------------------------------------------------------------------
# With a query, an input above COARSE_THRESHOLD tokens first goes through in-memory hybrid retrieval (the `retrieve`
# method without citations) down to max(2B, min(4B, threshold)) tokens for a final budget B; the chosen method then
# works on that. It bounds the cost of the fine methods on huge inputs (they embed or score every sentence) while
# leaving them a choice of 2-4x what they keep. Option `coarse_threshold` (tokens; 0 turns it off), default from
# $CTXC_COARSE_THRESHOLD, else 32768.
COARSE_THRESHOLD = 32_768


def _coarse_stage(text: str, n_in: int, limit: int, tok: Tokenizer, query: str | None, method: str, options: dict):
    import os

    raw = options.get("coarse_threshold")
    if raw is None:
        raw = os.environ.get("CTXC_COARSE_THRESHOLD") or COARSE_THRESHOLD
    try:
        threshold = int(raw)
    except (TypeError, ValueError):
        from .errors import MethodError

        raise MethodError(f"bad coarse threshold {raw!r}", "give a number of tokens, or 0 to turn it off") from None
    # truncate is positional by definition, and retrieve is this stage already.
    first = method.split("+")[0].split("@")[0].strip()
    if not query or not query.strip() or threshold <= 0 or n_in <= threshold or first in ("retrieve", "truncate"):
        return None
    coarse_budget = max(2 * limit, min(4 * limit, threshold))
    if coarse_budget >= n_in:
        return None
    from .compressors.retrieve import RetrieveCompressor

    stage = RetrieveCompressor(cite=False, embedder=options.get("embedder"))
    res = stage.compress(text, coarse_budget, tok, query)
    res.info.update(method="retrieve", budget=coarse_budget, tokens=tok.count(res.text), threshold=threshold)
    return res


def _map_back(spans: list[tuple[int, int]], coarse_kept: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans into the coarse text -> spans into the input. The coarse text is its kept spans joined by a blank line."""
    from .retrievers.search import SEPARATOR

    layout, pos = [], 0
    for s, e in coarse_kept:
        layout.append((pos, pos + e - s, s))
        pos += e - s + len(SEPARATOR)
    out: list[tuple[int, int]] = []
    for s, e in spans:
        for lo, hi, orig in layout:
            a, b = max(s, lo), min(e, hi)
            if a < b:
                span = (orig + a - lo, orig + b - lo)
                if out and out[-1][1] == span[0]:
                    out[-1] = (out[-1][0], span[1])
                else:
                    out.append(span)
    return out


def count(text: str, tokenizer: "str | Tokenizer | None" = None) -> int:
    return get_tokenizer(tokenizer).count(text)
