"""Abstractive compression: map-reduce summarisation with the local instruct model.

The text is cut into chunks at sentence boundaries; each chunk is summarised to its share of the budget (focused on
the query when there is one); the summaries are joined and, while the result is still over the budget, summarised
again. A final hard check cuts at a sentence end so the output is always within the budget.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from ..document import split_units
from ..fit import cut_text
from ..tokenizers import Tokenizer
from .base import Compressed, Compressor

_SYSTEM = ("You are a careful editor who shortens documents. Keep names, numbers, dates and key facts exactly as "
           "written. Never add facts that are not in the text. Answer with the shortened text only.")
_PREAMBLE = re.compile(r"^\s*(?:sure[,!.]?\s*)?(?:here(?:'s| is| are)[^\n:]*:|(?:the )?summary[^\n:]{0,40}:)\s*", re.I)


class _Tokens:
    """transformers' streamer protocol for `generate`: counts the new tokens (put() gets the prompt first, then one
    tensor of new ids per step), for the progress callback."""

    def __init__(self):
        self.tokens, self._first = 0, True

    def put(self, value) -> None:
        if self._first:
            self._first = False
            return
        self.tokens += int(value.numel())

    def end(self) -> None:
        self._first = True


@dataclass
class AbstractiveCompressor(Compressor):
    """Map-reduce summarisation by the local instruct LM (chat template), within the budget.

    Map: chunks of at most `chunk_tokens` model tokens, each summarised (greedy decoding, KV cache) to its share of
    the budget, in batches. Reduce: while the joined summaries are over the budget, they are summarised again (at
    most `max_rounds` rounds). The last step cuts at a sentence end, so the output is always within the budget.
    A chunk whose summary comes out empty contributes its own opening instead. The output is not verbatim (`kept` is
    empty); `extractive+abstractive` selects sentences first and rewrites those. Quality follows the model: the
    bundled SmolLM2-135M paraphrases loosely and loses facts; pass `--model` for a bigger local instruct model.
    See "Recursively Summarizing Books with Human Feedback" (Wu et al., 2021, https://arxiv.org/abs/2109.10862).

    Parameters
    ----------
    model: local model (HF directory or .gguf); default `--model` / CTXC_MODEL / the bundled SmolLM2.
    chunk_tokens: model tokens of input per map call.
    min_share: smallest summary asked for, in budget tokens (shares below it are merged in a later round).
    max_new_tokens: cap on generated tokens per call.
    max_rounds: map/reduce rounds at most.
    batch: chunks generated together (left-padded; one KV cache per batch).
    repetition_penalty, no_repeat_ngram: keep the small model from looping.
    """

    name = "abstractive"
    model: str | None = None
    chunk_tokens: int = 768
    min_share: int = 48
    max_new_tokens: int = 320
    max_rounds: int = 3
    batch: int = 4
    repetition_penalty: float = 1.15
    no_repeat_ngram: int = 4

    def compress(self, text: str, budget: int, tokenizer: Tokenizer, query: str | None = None) -> Compressed:
        from ..lm import load_model

        t0 = time.perf_counter()
        lm = load_model(self.model, settings=self.config)
        info: dict = {"model": str(lm.source), "rounds": [], "verbatim": False}
        cur = text
        generated = 0
        for rnd in range(self.max_rounds):
            chunks = self._chunks(cur, lm.tokenizer)
            n_cur = max(1, tokenizer.count(cur))
            counts = tokenizer.count_many(chunks)
            shares = [max(min(self.min_share, budget), int(budget * c / n_cur)) for c in counts]
            summaries, g = self._summarise(lm, chunks, shares, counts, tokenizer, query, rnd)
            generated += g
            nxt = "\n".join(s for s in summaries if s)
            n_nxt = tokenizer.count(nxt)
            info["rounds"].append({"chunks": len(chunks), "input_tokens": n_cur, "output_tokens": n_nxt})
            if not nxt.strip() or n_nxt >= n_cur:  # no progress: the model cannot shorten this any further
                break
            cur = nxt
            if n_nxt <= budget:
                break
        out = cut_text(cur, budget, tokenizer)
        info.update({"generated_tokens": generated, "seconds": round(time.perf_counter() - t0, 2)})
        return Compressed(out, [], info)

    def _chunks(self, text: str, tok) -> list[str]:
        """Consecutive runs of whole sentences of at most `chunk_tokens` model tokens (longer sentences alone)."""
        units = split_units(text)
        if not units:
            return [text] if text.strip() else []
        counts = tok.count_many([u.text(text) for u in units])
        chunks, start, size = [], units[0].start, 0
        for u, c in zip(units, counts):
            if size and size + c > self.chunk_tokens:
                chunks.append(text[start : u.start].strip())
                start, size = u.start, 0
            size += c
        chunks.append(text[start:].strip())
        # A single sentence longer than a chunk would overflow the prompt: cut it to the chunk size.
        return [c if tok.count(c) <= 2 * self.chunk_tokens else tok.truncate(c, 2 * self.chunk_tokens) for c in chunks]

    def _prompt(self, chunk: str, words: int, query: str | None) -> list[dict]:
        task = f"Shorten the text above to at most {words} words."
        if query and query.strip():
            task += f" Keep what helps answer this question: {query.strip()}"
        return [{"role": "system", "content": _SYSTEM},
                {"role": "user", "content": f"Text:\n{chunk}\n\n{task}"}]

    def _summarise(self, lm, chunks, shares, counts, tokenizer, query, rnd) -> tuple[list[str], int]:
        import torch

        from ..lm import left_pad
        from ..lm.hw import lm_threads

        hf = lm.tokenizer.hf
        # Budget tokens -> model tokens: the two tokenizers differ, so measure the ratio on this text.
        sample = "\n".join(chunks)[:20000]
        ratio = max(0.5, lm.tokenizer.count(sample) / max(1, tokenizer.count(sample)))
        eos = [i for i in {hf.eos_token_id, hf.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int) and i >= 0]
        pad = hf.pad_token_id if hf.pad_token_id is not None else eos[0]
        prog = _Tokens()
        out: list[str] = [""] * len(chunks)
        generated = 0
        # Similar lengths batch together, so little of each batch is padding.
        order = sorted(range(len(chunks)), key=lambda i: counts[i])
        if self.progress:
            self.progress(0, len(chunks), f"abstractive round {rnd + 1}")
        for a in range(0, len(order), max(1, self.batch)):
            idx = order[a : a + self.batch]
            prompts = []
            for i in idx:
                words = max(5, int(shares[i] * 0.7))
                msgs = self._prompt(chunks[i], words, query)
                prompts.append(hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
            enc = [hf.encode(p, add_special_tokens=False) for p in prompts]
            ids, mask = left_pad(enc, pad)
            L = ids.shape[1]
            new = min(self.max_new_tokens, max(16, int(max(shares[i] for i in idx) * ratio * 1.3) + 8))
            with torch.inference_mode(), lm_threads(self.config.threads):
                gen = lm.model.generate(
                    input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), max_new_tokens=new,
                    do_sample=False, use_cache=True, repetition_penalty=self.repetition_penalty,
                    no_repeat_ngram_size=self.no_repeat_ngram or 0, eos_token_id=eos, pad_token_id=pad,
                    streamer=prog,
                )
            for j, i in enumerate(idx):
                toks = gen[j, L:].tolist()
                generated += sum(1 for t in toks if t not in eos)
                s = _clean(hf.decode(toks, skip_special_tokens=True))
                if not s:  # nothing usable: the chunk's opening is a better stand-in than a gap
                    s = tokenizer.truncate(chunks[i], shares[i])
                out[i] = s
            if self.progress:
                self.progress(a + len(idx), len(chunks), f"abstractive round {rnd + 1}: {prog.tokens} tokens")
        return out, generated


def _clean(s: str) -> str:
    s = _PREAMBLE.sub("", s.strip())
    # Generation that stopped at max_new_tokens ends mid-sentence: drop the fragment when a sentence end exists.
    m = list(re.finditer(r"[.!?…][\"')\]]*(?=\s|$)", s))
    if m and m[-1].end() < len(s.rstrip()) and m[-1].end() > len(s) * 0.5:
        s = s[: m[-1].end()]
    return s.strip()
