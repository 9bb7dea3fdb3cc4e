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
    res = comp.compress(text, limit, tok, query)
    out, kept = res.text, res.kept
    n_out = tok.count(out)
    if n_out > limit:  # a method broke its contract: cut rather than ever return more than the budget
        out = tok.truncate(out, limit)
        n_out = tok.count(out)
        res.info["hard_truncated"] = True
    if fail_if_over and not out.strip():
        raise OverBudgetError(f"nothing fits in a budget of {limit} tokens", "raise the budget")
    return CompressionResult(out, n_in, n_out, limit, tok.name, method, list(kept), time.perf_counter() - t0, res.info)


def count(text: str, tokenizer: "str | Tokenizer | None" = None) -> int:
    return get_tokenizer(tokenizer).count(text)
