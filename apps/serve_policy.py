"""What `ctxc serve` does to a chat request: the compression policy, apart from HTTP.

- The last user message is the query. It is never changed, and it steers the compression of everything else.
- Every other text block (a message's content, or each text part of a multi-part content) of at least `min_tokens`
  tokens may be compressed, except what the assistant said: system prompts with documents, long user turns, tool
  results. JSON blocks (a tool's output, mostly) go through the structure-aware `json` method; the rest through the
  server's method. Short blocks are sent as they are.
- **Prefix-stable.** Each long block is decided once, by content: the first request that holds it stores what it
  was sent as (compressed, or unchanged when it fitted) in the memo (`SpanStore`), and every later request sends
  exactly those bytes. New blocks share what the budget has left after the blocks already decided. In a growing
  conversation, each request's messages are therefore the previous request's messages, byte for byte, plus the new
  turn, and the upstream's prompt cache keeps matching.
- **Headroom.** New blocks that do not fit are compressed into the room left minus `headroom` (a share of the
  budget, 25% by default; at least half the room), so that the turns after them still fit without touching them.
  A one-shot request thus ends up at about (1 - headroom) of the budget; `headroom=0` fills it.
- **Compaction**, the one exception: when the decided blocks leave no room for the new ones, every long block is
  compressed again from its original (the client always sends originals) into the room minus the headroom (at least
  5% of the budget, even with `headroom=0`), and the memo is updated. The prefix changes at that request only, and
  the headroom absorbs the next turns, so a long conversation pays one prompt-cache miss per compaction, not one per
  turn.
- **Reversible.** A compressed text block ends with a marker `ctxc:<id>`, the content address of its original,
  which the store keeps; JSON cuts carry one marker per cut span.

Token counts: each block in the `tokenizer`, plus `PER_MESSAGE` per message and `REPLY_PRIMING` per request (the
chat format's wrapping, as OpenAI counts it), so the budget covers the whole request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..budget import Budget
from ..compressors.structured import parse_json_document
from ..settings import Settings
from ..tokenizers import Tokenizer
from .serve_store import SpanStore

PER_MESSAGE = 4
REPLY_PRIMING = 3
MIN_SHARE = 48  # the least a compressed block is given: its marker and a sentence
COMPACT_SLACK = 0.05  # the least share of the budget a compaction leaves free (see _target)
MEMO_VERSION = 1  # bump when the policy's output for the same input changes
MAX_HASHED = 512  # messages whose digests fit a response header (17 bytes each)


@dataclass(frozen=True)
class Policy:
    budget: Budget
    method: str
    tokenizer: Tokenizer
    settings: Settings
    store: SpanStore
    min_tokens: int = 128
    headroom: float = 0.25
    # The threads that compress, shared by all requests (None: the caller's thread). Each compression already keeps
    # the cores busy, so more at a time only adds memory; and a few long-lived threads keep one malloc arena and
    # warm caches, where the server's many request threads would each grow their own.
    workers: ThreadPoolExecutor | None = field(default=None, compare=False)

    def replace(self, **changes) -> "Policy":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class Block:
    msg: int
    part: int | None  # index in a multi-part content, None for a plain string content
    role: str
    text: str
    tokens: int
    structured: bool = False
    key: str = ""


@dataclass
class Prepared:
    """A request's messages as they go upstream, with the figures reported in headers and metrics."""

    messages: list[dict]
    input_tokens: int
    output_tokens: int
    budget: int
    compressed: int = 0  # blocks compressed by this request
    reused: int = 0  # blocks sent as the memo holds them
    compacted: bool = False
    seconds: float = 0.0
    markers: list[str] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        return {"X-Ctxc-Input-Tokens": str(self.input_tokens), "X-Ctxc-Output-Tokens": str(self.output_tokens),
                "X-Ctxc-Budget": str(self.budget), "X-Ctxc-Compressed": str(self.compressed),
                "X-Ctxc-Reused": str(self.reused), "X-Ctxc-Compacted": "1" if self.compacted else "0",
                "X-Ctxc-Seconds": f"{self.seconds:.3f}",
                **({"X-Ctxc-Message-Hashes": ",".join(message_hash(m) for m in self.messages)}
                   if len(self.messages) <= MAX_HASHED else {})}


def message_hash(message: dict) -> str:
    """A short digest of one message as sent (role, content and every other field): equal digests, equal bytes."""
    raw = json.dumps(message, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()[:16]


def blocks_of(messages: list[dict]) -> list[tuple[int, int | None, str, str]]:
    """(message index, part index, role, text) of every text block."""
    out = []
    for i, m in enumerate(messages):
        content, role = m.get("content"), str(m.get("role", ""))
        if isinstance(content, str):
            out.append((i, None, role, content))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    out.append((i, j, role, part["text"]))
    return out


def count_request(messages: list[dict], tokenizer: Tokenizer) -> int:
    """The request's size as the budget counts it."""
    texts = [t for *_, t in blocks_of(messages)]
    return sum(tokenizer.count_many(texts)) + PER_MESSAGE * len(messages) + REPLY_PRIMING


def prepare(messages: list[dict], policy: Policy) -> Prepared:
    """The messages to send upstream under `policy` (see the module docstring); `messages` is left as it is."""
    t0 = time.perf_counter()
    tok = policy.tokenizer
    raw = blocks_of(messages)
    counts = tok.count_many([t for *_, t in raw])
    blocks = [Block(i, j, role, text, n) for (i, j, role, text), n in zip(raw, counts)]
    overhead = PER_MESSAGE * len(messages) + REPLY_PRIMING
    n_in = sum(counts) + overhead
    limit = policy.budget.resolve(n_in)
    q = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    query = "\n".join(b.text for b in blocks if b.msg == q) or None
    long = [b for b in blocks if b.tokens >= policy.min_tokens and b.role != "assistant"]
    if not long:  # nothing to decide: the common small request costs one count and no store access
        return Prepared(messages, n_in, n_in, limit, seconds=time.perf_counter() - t0)
    for b in long:
        b.structured = parse_json_document(b.text) is not None
        b.key = _memo_key(b, policy)
    store = policy.store
    hits = store.get_memos([b.key for b in long])
    candidates = [b for b in long if b.msg != q]
    chosen = {id(b) for b in candidates}
    sent: dict[int, tuple[str, int]] = {id(b): hits[b.key] for b in candidates if b.key in hits}
    rest = overhead + sum(b.tokens for b in blocks if id(b) not in chosen)  # what is never compressed
    fixed = rest + sum(n for _, n in sent.values())  # ... and what earlier requests decided
    pending = [b for b in candidates if id(b) not in sent]
    reused, compressed, compacted = len(sent), 0, False
    room = limit - fixed
    need = sum(b.tokens for b in pending)
    floor = MIN_SHARE * len(pending)
    # Compaction only where it can bring the request within the budget; where the query and the short messages
    # alone fill it, compacting would recompress everything at every turn and still not fit.
    can_compact = limit - rest >= MIN_SHARE * len(candidates)
    if need <= room or room >= floor or not can_compact:
        shares = [b.tokens for b in pending] if need <= room else \
            _shares(pending, max(_target(room, limit, policy), floor))
        for b, share in zip(pending, shares):
            compute = (lambda b=b: (b.text, b.tokens)) if share >= b.tokens else \
                (lambda b=b, share=share: _compress_block(b, share, query, policy))
            sent[id(b)], hit = store.memo_once(b.key, compute)
            reused += hit
            compressed += not hit and sent[id(b)][0] != b.text
    undecided = any(id(b) not in sent for b in pending)
    if can_compact and candidates and (undecided or fixed + sum(sent[id(b)][1] for b in pending) > limit):
        keys = sorted({b.key for b in candidates})
        with store.gate("compact:" + hashlib.sha256("".join(keys).encode()).hexdigest()):
            # Concurrent requests that overflow on the same blocks compact once: those that waited find what the
            # first stored, and send it when it fits.
            now = store.get_memos(keys)
            if len(now) == len(keys) and rest + sum(now[b.key][1] for b in candidates) <= limit:
                sent = {id(b): now[b.key] for b in candidates}
                reused = len(candidates) - compressed
            else:
                sent, compressed = _compact(rest, candidates, limit, query, policy)
                compacted, reused = True, 0
    # The query goes out unchanged, and is remembered so: when it is history in the next request, it is sent the
    # same way again instead of being squeezed into whatever room that request has left.
    for b in long:
        if b.msg == q and b.key not in hits:
            store.put_memo(b.key, b.text, b.tokens)
    out = _assemble(messages, candidates, sent)
    # Blocks are counted apart (as the upstream's chat format tokenizes each message apart), so the sum is exact.
    n_out = n_in - sum(b.tokens - sent[id(b)][1] for b in candidates)
    return Prepared(out, n_in, n_out, limit, compressed, reused, compacted, time.perf_counter() - t0,
                    sorted({m for text, _ in sent.values() for m in _markers(text)}))


def _memo_key(b: Block, policy: Policy) -> str:
    spec = {"v": MEMO_VERSION, "method": "json" if b.structured else policy.method, "budget": policy.budget.spec,
            "tokenizer": policy.tokenizer.name, "min_tokens": policy.min_tokens,
            "headroom": policy.headroom, "settings": policy.settings.key(),
            "text": b.text}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _target(room: int, limit: int, policy: Policy, compacting: bool = False) -> int:
    """How much of `room` new compressed blocks may take: all but the headroom, and at least half of it. A compaction
    always leaves COMPACT_SLACK of the budget free, even with `headroom=0`: otherwise a request that fills the budget
    exactly makes the next one, a token longer (another question about the same document), compact again, and so
    on, each time with a new prefix."""
    keep = policy.headroom * limit
    if compacting:
        keep = max(keep, COMPACT_SLACK * limit)
    return max(room - int(keep), room // 2)


def _shares(blocks: list[Block], room: int) -> list[int]:
    """`room` split in proportion to the blocks' sizes, at least MIN_SHARE each."""
    total = sum(b.tokens for b in blocks) or 1
    return [min(b.tokens, max(MIN_SHARE, room * b.tokens // total)) for b in blocks]


def _compact(rest: int, candidates: list[Block], limit: int, query: str | None, policy: Policy) -> tuple[dict, int]:
    """Every candidate compressed again from its original into the room the rest leaves, minus the headroom, the
    memo overwritten (see the module docstring). Returns (what each block is sent as, how many were compressed)."""
    sent, done = {}, {}
    for b, share in zip(candidates, _shares(candidates, _target(max(0, limit - rest), limit, policy, True))):
        if b.key not in done:  # the same text twice in one request is compressed once
            row = (b.text, b.tokens) if share >= b.tokens else _compress_block(b, share, query, policy)
            done[b.key] = policy.store.put_memo(b.key, *row, replace=True)
        sent[id(b)] = done[b.key]
    return sent, sum(1 for b in candidates if sent[id(b)][0] != b.text)


def _compress_block(b: Block, share: int, query: str | None, policy: Policy) -> tuple[str, int]:
    """One block within `share` tokens, its cut originals stored; returns (text, tokens)."""
    if policy.workers is None:
        return _compress_one(b, share, query, policy)
    return policy.workers.submit(_compress_one, b, share, query, policy).result()


def _compress_one(b: Block, share: int, query: str | None, policy: Policy) -> tuple[str, int]:
    from ..api import compress

    tok, store = policy.tokenizer, policy.store
    if b.structured:
        res = compress(b.text, share, query=query, method="json", tokenizer=tok, settings=policy.settings,
                       markers=True)
        store.put_spans([tuple(s) for s in res.info.get("cut_spans", [])])
        return res.text, tok.count(res.text)
    mid = store.put_original(b.text)
    mark = f"\n[… compressed by ctxc from {b.tokens} tokens; full text: ctxc:{mid}]"
    room = share - tok.count(mark)
    body = ""
    if room >= 8:
        body = compress(b.text, room, query=query, method=policy.method, tokenizer=tok, settings=policy.settings).text
    out = body.rstrip() + mark if body.strip() else mark.lstrip()
    return out, tok.count(out)


def _assemble(messages: list[dict], candidates: list[Block], sent: dict) -> list[dict]:
    out = list(messages)
    for b in candidates:
        text = sent[id(b)][0]
        if text == b.text:
            continue
        m = dict(out[b.msg])
        if b.part is None:
            m["content"] = text
        else:
            parts = list(m["content"])
            parts[b.part] = {**parts[b.part], "text": text}
            m["content"] = parts
        out[b.msg] = m
    return out


def _markers(text: str) -> list[str]:
    from .serve_store import MARKER

    return MARKER.findall(text)
