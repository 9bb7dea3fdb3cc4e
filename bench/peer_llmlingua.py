"""Driver: llmlingua 0.2.2 (LLMLingua or LongLLMLingua) on a batch of examples, for `bench_tokens.py --llmlingua`.

Runs with the PEERS venv's python (see ../shared/peers/SETUP.md), never the project's: it does not import ctxc.

  $PEERS_PY bench/peer_llmlingua.py SPEC.json

SPEC.json: {"method": "llmlingua"|"longllmlingua", "ratios": [4, 10], "examples": [{"id", "context", "question"}],
            "chunk_tokens": 256, "threads": null, "time_box_s": null}

The model is loaded once per process (one process per method, so the peak RSS is that method's). It reuses the
peers' own code (../shared/peers: `_common`, `llmlingua_bench`'s shims and context splitter) and the same
compress_prompt recipe as `llmlingua_bench.main()`, with rate = 1/ratio. The BOS llmlingua decodes and the question
LongLLMLingua appends after the compressed context are stripped (ctxc outputs the context alone). stdout gets only
JSON lines:
  {"id", "ratio", "text", "sec"}             per (example, ratio); `sec` = compress_prompt() alone
  {"id", "ratio", "error"}                   when compress_prompt raised (llmlingua has known crashes)
  {"done": true, "load_s", "peak_rss_mb", "version", "n_threads", "interrupted"}   at the end, also when the
                                             time box ran out or on SIGTERM (then the remaining examples are missing)
Anything llmlingua or transformers prints goes to stderr, so the JSON stream stays parseable.
"""

import json
import os
import signal
import sys
import time
import traceback

PEERS = os.environ.get("CTXC_PEERS_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                      "shared", "peers"))
sys.path.insert(0, os.path.abspath(PEERS))

import _common as C  # noqa: E402  (sets the offline env vars before transformers is imported)


def recipe(method: str, question: str, rate: float) -> dict:
    """compress_prompt kwargs, as in llmlingua_bench.main()."""
    kw = dict(rate=rate, target_token=-1)
    if method == "llmlingua":
        # original LLMLingua: budget controller + iterative token-level compression, question-agnostic
        kw.update(instruction="", question="", rank_method="llmlingua")
    elif method == "longllmlingua":
        # LongLLMLingua recipe from the llmlingua README (question-aware coarse+fine compression)
        kw.update(question=question, rank_method="longllmlingua", condition_in_question="after_condition",
                  reorder_context="sort", dynamic_context_compression_ratio=0.3, condition_compare=True,
                  context_budget="+100")
    else:
        raise SystemExit(f"unknown method {method!r}: use llmlingua or longllmlingua")
    return kw


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: peer_llmlingua.py SPEC.json")
    with open(sys.argv[1], encoding="utf-8") as fh:
        spec = json.load(fh)
    method = spec["method"]
    recipe(method, "", 0.5)  # fail on a bad method before loading anything
    # JSON lines go to the real stdout; everything else (library prints, warnings) to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr

    def emit(rec: dict) -> None:
        out.write(json.dumps(rec) + "\n")

    state = {"load_s": None, "version": None}

    def finish(interrupted: bool = False) -> None:
        emit({"done": True, "load_s": state["load_s"], "peak_rss_mb": C.peak_rss_mb(), "interrupted": interrupted,
              "version": state["version"],
              "n_threads": sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None})
        out.flush()

    # A time box (spec "time_box_s", or SIGTERM from outside) ends the run early but still reports load and peak
    # RSS, so a slow llmlingua run on a busy machine leaves usable rows for the examples it finished.
    def on_term(*_a) -> None:
        finish(interrupted=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    import tiktoken
    from llmlingua_bench import _LegacyKVModel, _TokShim, split_contexts

    t0 = time.perf_counter()
    model_dir = C.ensure_hf_model()
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    tiktoken.encoding_for_model = lambda *_a, **_k: _TokShim(hf_tok)  # offline shim (see SETUP.md)
    import llmlingua
    from llmlingua import PromptCompressor

    pc = PromptCompressor(model_name=model_dir, device_map="cpu", model_config={"trust_remote_code": False})
    pc.model = _LegacyKVModel(pc.model)
    state.update(load_s=time.perf_counter() - t0, version=getattr(llmlingua, "__version__", "0.2.2"))
    bos = hf_tok.bos_token or ""
    chunk = int(spec.get("chunk_tokens", 256))

    def compress(context: str, question: str, ratio: float) -> str:
        res = pc.compress_prompt(split_contexts(context, hf_tok, chunk), **recipe(method, question, 1.0 / ratio))
        comp = res["compressed_prompt"]
        while bos and comp.startswith(bos):  # llmlingua decodes the BOS the GGUF tokenizer adds; drop it
            comp = comp[len(bos):]
        # LongLLMLingua appends "\n\n" + question (concate_question=True) and budgets for it (its target is
        # rate * (context + question) - question). ctxc's output is the context alone, so compare like with like.
        if question and comp.endswith(question):
            comp = comp[: -len(question)].rstrip("\n")
        return comp

    deadline = time.perf_counter() + float(spec.get("time_box_s") or float("inf"))
    # Warm-up (lazy imports, allocator) on a small text, as the ctxc workers do, so example 1 isn't charged for it.
    try:
        compress("Warm up sentence one. Another one here.\n\n" * 40, "warm up", 2)
    except Exception:  # noqa: BLE001  (a crash here shows again on the real examples, where it is recorded)
        traceback.print_exc()
    # Shortest first: a run cut short by the time box then has covered as many examples as it could.
    for ex in sorted(spec["examples"], key=lambda e: len(e["context"])):
        if time.perf_counter() > deadline:
            print(f"[{method}] time box reached, stopping before {ex['id']}", file=sys.stderr)
            return finish(interrupted=True)
        for r in spec["ratios"]:
            t = time.perf_counter()
            try:
                text = compress(ex["context"], ex["question"], r)
            except Exception as e:  # noqa: BLE001  (record llmlingua's crash, go on with the next one)
                print(f"[{method}] {ex['id']} x{r}: {type(e).__name__}: {e}", file=sys.stderr)
                emit({"id": ex["id"], "ratio": r, "error": f"{type(e).__name__}: {str(e)[:300]}",
                      "sec": time.perf_counter() - t})
                continue
            emit({"id": ex["id"], "ratio": r, "text": text, "sec": time.perf_counter() - t})
    finish()


if __name__ == "__main__":
    main()
