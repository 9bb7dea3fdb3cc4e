"""`ctxc serve --upstream local`: the local LM (SmolLM2-135M-Instruct by default) answering chat requests, so the
server works offline and its tests talk to a real model.

Decoding is greedy (the same request gets the same answer; `temperature` and friends are ignored), with the cartridge
engine's chunked prefill and decoder. One generation runs at a time: a 135M model on a few CPU cores gains nothing
from interleaving requests, and each would slow the others' tokens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..cache_store import engine
from ..cache_store.cartridge import _Streamer
from ..errors import InputError
from ..lm.hw import lm_threads
from ..settings import Settings

MODEL_ID = "ctxc-local"


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


def chat_text(message: dict) -> str:
    """A message's content as plain text (text parts joined; other parts, such as images, are not read)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return ""


class LocalModel:
    """The local LM behind the OpenAI schema: `prompt_ids(messages)` (checked against the context), then
    `generate(ids, ...)`."""

    def __init__(self, settings: Settings, lm=None):
        self.settings = settings
        self._lm = lm
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()

    def load(self):
        with self._load_lock:
            if self._lm is None:
                from ..lm import load_model

                self._lm = load_model(settings=self.settings)
        return self._lm

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The chat template applied to `messages`, as token ids; an InputError when it leaves no room to answer."""
        lm = self.load()
        chat = [{"role": "system" if m.get("role") == "developer" else str(m.get("role")), "content": chat_text(m)}
                for m in messages]
        text = lm.tokenizer.hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = lm.tokenizer.encode(text)
        if len(ids) + 1 > lm.max_context:
            raise InputError(f"the prompt takes {len(ids):,} tokens of the local model; its context is "
                             f"{lm.max_context:,}", "send less, or lower the budget (X-Ctxc-Budget)")
        return ids

    def generate(self, ids: list[int], max_new_tokens: int, on_text: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> Generated:
        """Greedy answer after `ids`; text pieces go to `on_text` as they are decoded. Stops early when
        `cancelled()` (the client went away)."""
        lm = self.load()
        n = max(1, min(max_new_tokens, lm.max_context - len(ids)))
        with self._run_lock, lm_threads(self.settings.threads):
            cache, _, _ = engine.prefill(lm, ids[:-1])
            gen = engine.Generation(t0=time.perf_counter())
            streamer = _Streamer(lm.tokenizer, on_text)
            for tid in engine.greedy(lm, cache, ids[-1:], len(ids) - 1, n, gen):
                streamer.push(tid)
                if cancelled is not None and cancelled():
                    break
            text = streamer.text()
        return Generated(text, len(ids), len(gen.new_ids), "length" if len(gen.new_ids) >= n else "stop")
