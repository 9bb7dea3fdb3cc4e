"""The public library API (what `import ctxc` exports and the CLI calls): `compress()`, `count()` and
`get_tokenizer()`.

Every function takes `settings` (a `ctxc.Settings`); without it, `Settings.current()` (environment and config files).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from .budget import Budget
from .errors import InputError, MethodError, OverBudgetError
from .settings import Settings
from .tokenizers import Tokenizer


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
        """The result in the JSON vocabulary of every command (README, JSON output)."""
        d = asdict(self)
        d["kept"] = [{"start": s, "end": e} for s, e in self.kept]
        d["ratio"] = round(self.ratio, 3)
        d["seconds"] = round(self.seconds, 3)
        return d


def get_tokenizer(name: "str | Tokenizer | None" = None, settings: Settings | None = None) -> Tokenizer:
    """A tokenizer by name: `cl100k`, `hf:PATH`, ... (see `ctxc.tokenizers`), or `model`, the local LM's own.
    None means the `tokenizer` setting."""
    from . import tokenizers

    if isinstance(name, Tokenizer):
        return name
    settings = settings or Settings.current()
    name = name or settings.tokenizer
    if name.strip().lower() == "model":
        from .lm import model_tokenizer

        return model_tokenizer(settings=settings)
    return tokenizers.get_tokenizer(name)


def compress(
    text: str,
    budget: "str | int | Budget" = "x4",
    query: str | None = None,
    method: str = "extractive",
    tokenizer: "str | Tokenizer | None" = None,
    fail_if_empty: bool = False,
    settings: Settings | None = None,
    progress=None,
    **options,
) -> CompressionResult:
    """Compress `text` to at most `budget` tokens of `tokenizer` (default: the `tokenizer` setting, cl100k).

    With a query, inputs over the `coarse_threshold` (option or setting; default 32768 tokens, 0 = off) are first cut
    down by in-memory hybrid retrieval: a `retrieve` stage in front of the method (see `_with_coarse_stage`).

    Input that already fits comes back unchanged. The token count of the returned text is checked here, after the
    method ran, so the guarantee holds for every method, including third-party ones. `fail_if_empty` raises
    `OverBudgetError` when nothing at all fits. `progress(done, total, what)` hears about long runs.

    >>> r = compress("One. Two. Three.", budget=3, method="truncate"); r.output_tokens <= 3
    True
    """
    from .compressors.base import run_stage
    from .compressors.registry import get_compressor

    if not isinstance(text, str):
        raise InputError("input must be text", "decode bytes first, e.g. with ctxc.textio.decode_bytes")
    t0 = time.perf_counter()
    settings = settings or Settings.current()
    tok = get_tokenizer(tokenizer, settings)
    b = Budget.parse(budget)
    n_in = tok.count(text)
    limit = b.resolve(n_in)
    threshold = _threshold(options.pop("coarse_threshold", None), settings)
    comp = get_compressor(method, settings, **options)
    if n_in <= limit:
        return CompressionResult(text, n_in, n_in, limit, tok.name, method, [(0, len(text))] if text else [],
                                 time.perf_counter() - t0, {"passthrough": True})
    comp, coarse = _with_coarse_stage(comp, method, n_in, limit, threshold, query, settings, options)
    res = run_stage(comp, text, limit, tok, query, progress)
    out, kept = res.text, res.kept
    if coarse:
        res.info["coarse"] = {**res.info["stages"][0], "threshold": threshold}
    n_out = tok.count(out)
    if n_out > limit:  # a method broke its contract: cut rather than ever return more than the budget
        out = tok.truncate(out, limit)
        n_out = tok.count(out)
        res.info["hard_truncated"] = True
    if fail_if_empty and not out.strip():
        raise OverBudgetError(f"nothing fits in a budget of {limit} tokens", "raise the budget")
    return CompressionResult(out, n_in, n_out, limit, tok.name, method, list(kept), time.perf_counter() - t0, res.info)


def _threshold(raw, settings: Settings) -> int:
    raw = settings.coarse_threshold if raw is None else raw
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise MethodError(f"bad coarse threshold {raw!r}", "give a number of tokens, or 0 to turn it off") from None


def _with_coarse_stage(comp, method: str, n_in: int, limit: int, threshold: int, query: str | None,
                       settings: Settings, options: dict) -> tuple:
    """With a query, an input above `threshold` tokens first goes through in-memory hybrid retrieval (the `retrieve`
    method without citations) down to max(2B, min(4B, threshold)) tokens for a final budget B, as the first stage of
    a pipeline; the chosen method then works on that. It bounds the cost of the fine methods on huge inputs (they
    embed or score every sentence) while leaving them a choice of 2-4x what they keep. Positional (`truncate`) and
    retrieval-first methods get no such stage. Returns (compressor, whether the stage was added)."""
    from .compressors.pipeline import PipelineCompressor
    from .compressors.registry import parse_spec
    from .compressors.retrieve import RetrieveCompressor

    first = parse_spec(method)[0][0]
    if not query or not query.strip() or threshold <= 0 or n_in <= threshold or first in ("retrieve", "truncate"):
        return comp, False
    coarse_budget = max(2 * limit, min(4 * limit, threshold))
    if coarse_budget >= n_in:
        return comp, False
    stage = RetrieveCompressor(cite=False, embedder=options.get("embedder"))
    stage.settings = settings
    stages, mults = (comp.stages, comp.multipliers) if isinstance(comp, PipelineCompressor) else ([comp], [None])
    pipe = PipelineCompressor(stages=[stage, *stages], multipliers=[Fraction(coarse_budget, limit), *mults])
    pipe.settings = settings
    return pipe, True


def count(text: str, tokenizer: "str | Tokenizer | None" = None, settings: Settings | None = None) -> int:
    return get_tokenizer(tokenizer, settings).count(text)


def retrieve(index, query: str, budget: "str | int | Budget" = "2k", mode: str = "hybrid", k: int | None = None,
             tokenizer: "str | Tokenizer | None" = None, rerank: str = "", settings: Settings | None = None):
    """The chunks of an index (a folder made by `build_index`, or an opened `ctxc.retrievers.index.Index`) that
    answer `query`, packed into `budget` tokens with citations (a `Packed`: `.text`, `.groups`, `.to_json()`).
    `rerank="attention"` re-orders the best hits by the local LM's attention to them (off by default).

    >>> # ctxc.retrieve(".ctxc-index", "how are retries configured?", budget="2k").text
    """
    from .errors import BudgetError
    from .retrievers.index import Index

    settings = settings or Settings.current()
    b = Budget.parse(budget)
    if b.kind != "tokens":
        raise BudgetError(f"bad budget {budget!r} for retrieve: there is no input size to take a share of",
                          "give a number of tokens, e.g. --budget 2k")
    if k is not None and k < 1:
        raise InputError(f"bad --k {k}", "give a positive number of chunks")
    idx = index if isinstance(index, Index) else Index.open(index, settings=settings)
    return idx.retrieve(query, b.resolve(0), tokenizer=get_tokenizer(tokenizer, settings), mode=mode, k=k,
                        rerank=rerank)


def build_index(paths, output, settings: Settings | None = None, **options):
    """Index files and folders into the folder `output` (incrementally); see `ctxc.retrievers.index.build_index` for
    the options (include, exclude, chunk_tokens, overlap, embedder, rebuild, progress, ...)."""
    from .retrievers.index import build_index as build

    settings = settings or Settings.current()
    if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
        paths = [paths]
    return build(paths, output, settings=settings, **options)


def build_cartridge(document: str, settings: Settings | None = None, **options):
    """Prefill `document` (its text) once with the local LM and store its KV cache as a cartridge; see
    `ctxc.cache_store.build` for the options (evict, quant, name, source, ...). Returns a `BuildResult`."""
    from .cache_store import build

    return build(document, settings=settings or Settings.current(), **options)


def ask(target: str, question: str, settings: Settings | None = None, **options):
    """Answer `question` about a document: `target` is a cartridge (id, unique prefix or name) or a text file
    (found by content among the cartridges, else prefilled); see `ctxc.cache_store.ask`. Returns an `AskResult`
    (`.text`, `.stats`)."""
    from .cache_store import ask as run

    return run(target, question, settings=settings or Settings.current(), **options)
