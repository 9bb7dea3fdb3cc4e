"""ctxc: compress and manage long prompts and contexts for LLMs.

Importing `ctxc` is cheap (no torch); heavy pieces load on first use.

>>> import ctxc
>>> r = ctxc.compress(open("samples/fema_fire_management_grants.txt").read(), budget="1k", query="Who approves FMAGs?")
>>> r.output_tokens <= 1000
True
"""

from __future__ import annotations

from .version import __version__  # noqa: E402

from .api import CompressionResult, ask, build_cartridge, build_index, compress, count, get_tokenizer, retrieve  # noqa: E402,E501
from .apps.pack import PackResult, pack  # noqa: E402  (an application over `api`: re-exported here, not from api)
from .budget import Budget, parse_budget  # noqa: E402
from .errors import (  # noqa: E402
    BudgetError, CacheError, CtxcError, IndexStoreError, InputError, MethodError, ModelError, OverBudgetError,
    TokenizerError,
)
from .settings import Settings  # noqa: E402
from .tokenizers import Tokenizer  # noqa: E402

__all__ = [
    "__version__", "compress", "count", "pack", "retrieve", "build_index", "build_cartridge", "ask",
    "CompressionResult", "PackResult",
    "Budget", "parse_budget", "Tokenizer", "get_tokenizer",
    "Settings", "CtxcError", "InputError", "BudgetError", "TokenizerError", "MethodError", "ModelError", "CacheError",
    "IndexStoreError", "OverBudgetError",
]
