"""KV cartridges: pre-computed, optionally compressed KV caches stored content-addressed on disk.

`build` prefills a document once (chunked), optionally evicts entries (KVzip's query-agnostic reconstruction scores
with head-wise budgets, SnapKV, or the votes of a known question) and quantizes them (int8/int4), and stores the
result as safetensors + a JSON manifest; `load` turns it back into a transformers `DynamicCache`; `ask` answers a
question from a cartridge (or, as the baseline, from a freshly prefilled file); `eval_cartridge` measures what each
setting costs in answer NLL on your own questions.
"""

from .cartridge import AskResult, BuildResult, CartridgeEval, LoadedCartridge, ask, build, cartridge_id, \
    check_compatible, eval_cartridge, load
from .engine import CartridgeSettings
from .format import FORMAT_TAG, FORMAT_VERSION
from .store import CartridgeStore, store_root

__all__ = ["ask", "build", "load", "eval_cartridge", "cartridge_id", "check_compatible", "AskResult", "BuildResult",
           "CartridgeEval", "LoadedCartridge", "CartridgeSettings", "CartridgeStore", "store_root", "FORMAT_TAG",
           "FORMAT_VERSION"]
