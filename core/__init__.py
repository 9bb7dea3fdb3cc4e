"""ctxc: compress and manage long prompts and contexts for LLMs.

Importing `ctxc` is cheap (no torch); heavy pieces load on first use.

>>> import ctxc
>>> r = ctxc.compress(open("samples/fema_fire_management_grants.txt").read(), budget="1k", query="Who approves FMAGs?")
>>> r.output_tokens <= 1000
True
"""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"

# oneDNN keeps a compiled primitive (with its scratch memory) for every matmul shape it sees, up to 1024 of them;
# scoring a long document meets a new shape at nearly every batch, and the cache alone grew the resident size by
# about 100-200 MB over a 64k-token input. oneDNN reads this once, at its first matmul, so it is set on import; a
# value the user set wins.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")

from .api import CompressionResult, compress, count
from .budget import Budget, parse_budget
from .errors import (
    BudgetError, CacheError, CtxcError, IndexStoreError, InputError, MethodError, ModelError, OverBudgetError,
    TokenizerError,
)
from .tokenizers import Tokenizer, get_tokenizer

__all__ = [
    "__version__", "compress", "count", "CompressionResult", "Budget", "parse_budget", "Tokenizer", "get_tokenizer",
    "CtxcError", "InputError", "BudgetError", "TokenizerError", "MethodError", "ModelError", "CacheError",
    "IndexStoreError", "OverBudgetError",
]
