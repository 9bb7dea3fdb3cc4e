"""Budgets: `4k`, `4096`, `1.5k`, `25%` (of the input's tokens) and `x4` (compress 4x)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import BudgetError

_ABS = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)\s*([km]?)$", re.IGNORECASE)
_PCT = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)\s*%$")
_RATIO = re.compile(r"^[x×](\d+(?:\.\d+)?|\.\d+)$|^(\d+(?:\.\d+)?)x$", re.IGNORECASE)
_HINT = "use e.g. 4k, 4096, 1.5k, 25% (of the input) or x4 (compress 4x)"


@dataclass(frozen=True)
class Budget:
    """A parsed budget. `kind` is 'tokens', 'percent' or 'ratio'; `resolve(n)` gives tokens for an n-token input.

    >>> Budget.parse("1.5k").resolve(10_000), Budget.parse("25%").resolve(1000), Budget.parse("x4").resolve(1000)
    (1500, 250, 250)
    """

    kind: str
    value: float
    spec: str

    @classmethod
    def parse(cls, spec: "str | int | Budget") -> "Budget":
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            spec = str(spec)
        if not isinstance(spec, str):
            raise BudgetError(f"bad budget {spec!r}", _HINT)
        s = spec.strip().replace("_", "").replace(",", "")
        if m := _ABS.match(s):
            mult = {"": 1, "k": 1000, "m": 1_000_000}[m.group(2).lower()]
            tokens = float(m.group(1)) * mult
            if tokens < 1 or tokens != math.floor(tokens):
                raise BudgetError(f"bad budget {spec!r}: must be a whole number of tokens >= 1", _HINT)
            return cls("tokens", tokens, spec)
        if m := _PCT.match(s):
            pct = float(m.group(1))
            if not 0 < pct <= 100:
                raise BudgetError(f"bad budget {spec!r}: a percentage must be in (0, 100]", _HINT)
            return cls("percent", pct, spec)
        if m := _RATIO.match(s):
            ratio = float(m.group(1) or m.group(2))
            if ratio < 1:
                raise BudgetError(f"bad budget {spec!r}: a compression ratio must be >= 1", _HINT)
            return cls("ratio", ratio, spec)
        raise BudgetError(f"bad budget {spec!r}", _HINT)

    def resolve(self, input_tokens: int) -> int:
        """Tokens allowed for an input of `input_tokens` tokens (at least 1)."""
        if self.kind == "tokens":
            return int(self.value)
        if self.kind == "percent":
            return max(1, math.floor(input_tokens * self.value / 100))
        return max(1, math.floor(input_tokens / self.value))

    def __str__(self) -> str:
        return self.spec


def parse_budget(spec: "str | int | Budget") -> Budget:
    return Budget.parse(spec)


def parse_size(spec: str) -> int:
    """Bytes from `2G`, `500M`, `10k`, `1234` (binary multiples)."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", str(spec), re.IGNORECASE)
    if not m:
        raise BudgetError(f"bad size {spec!r}", "use e.g. 2G, 500M or 1048576")
    mult = 1024 ** "_kmgt".index(m.group(2).lower() or "_")
    return int(float(m.group(1)) * mult)
