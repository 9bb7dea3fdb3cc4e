"""`ctxc serve` overhead, side by side in one run, on loopback only, bounded in requests and time.

Three processes: an instant upstream (a minimal real OpenAI-compatible uvicorn app in this file: it answers at
once, echoing a nonce from the request and the digest of every message it received, so the proxy's own cost is
what is measured, and corrupted or crossed answers are caught), `ctxc serve` pointed at it (a real process:
`ctxc serve --upstream http://127.0.0.1:PORT/v1 --budget 8k --headroom 0`), and this client.

Reported:
  - sequential latency of a small chat request: client -> upstream directly, vs through `ctxc serve` (pass-through:
    nothing to compress) and with `X-Ctxc-Bypass: 1`; p50/p95 and the added p50/p95;
  - requests/s with 8 concurrent clients, directly and through `ctxc serve`, and failed or corrupted answers;
  - an 8k-token context compressed to a 2k budget (extractive, with the question): the added latency through the
    server vs the same `ctxc.compress` call in this process, per document, and again for the same request (memo
    hit); 8 concurrent identical new requests (one compression, identical bytes for all) and 8 concurrent distinct
    ones;
  - a 10-turn conversation replayed through the server: every request's messages, as the upstream received them,
    start with the previous request's, byte for byte;
  - peak RSS (VmHWM) of the `ctxc serve` process.

Goals (issue 18): pass-through p50 overhead <= 10 ms; compression overhead <= the in-process call + 10 ms; 0 failed
or corrupted answers; the replay byte-stable. Timings on a shared machine drift: the direct and proxied requests are
interleaved so that both see the same load.

Run: .venv/bin/python bench/bench_serve.py [--requests 200] [--docs 6] [--deadline 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import SHARED  # noqa: E402

CTXC = str(Path(sys.executable).with_name("ctxc"))
QUESTION = "What does the author say about startups and investors?"
INPROC_BUDGET = 1950


# -------------------------------------------------------------------------------------------- the instant upstream
def upstream_app():
    """A minimal real OpenAI-compatible endpoint that answers at once: the content is `echo:<last word of the last
    user message>`, and `ctxc_received` lists the digest of every message as received."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from ctxc.apps.serve_policy import message_hash

    async def chat(request):
        body = json.loads(await request.body())
        users = [m for m in body["messages"] if m.get("role") == "user"]
        nonce = (users[-1].get("content") or "").split()[-1] if users else ""
        out = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
               "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo:{nonce}"},
                            "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
               "ctxc_received": [message_hash(m) for m in body["messages"]]}
        if body.get("stream"):
            async def events():
                delta = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "",
                         "choices": [{"index": 0, "delta": {"content": f"echo:{nonce}"}, "finish_reason": "stop"}]}
                yield f"data: {json.dumps(delta)}\n\ndata: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse(out)

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "bench", "object": "model"}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"])])


def run_upstream(port: int) -> None:
    import uvicorn

    uvicorn.run(upstream_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# --------------------------------------------------------------------------------------------------------- helpers
def wait_up(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up in {timeout:.0f} s")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return (xs[lo] + (xs[hi] - xs[lo]) * (k - lo)) * 1000


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def small_request(nonce: str) -> dict:
    return {"model": "bench", "max_tokens": 16, "messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": f"And of Italy? ref {nonce}"}]}


def long_docs(n: int, tokens: int) -> list[str]:
    """`n` documents of exactly `tokens` cl100k tokens, made of haystack essays and reports taken in turn, none used
    twice (so no request is a memo hit for another)."""
    from ctxc.tokenizers import get_tokenizer

    tok = get_tokenizer("cl100k")
    files = sorted((SHARED / "haystack").glob("paulgraham_*.txt")) + sorted((SHARED / "haystack").glob("usgov_*.txt"))
    texts = iter([f.read_text() for f in files if f.stat().st_size > 4000])
    out = []
    for _ in range(n):
        parts: list[str] = []
        while tok.count("\n\n".join(parts)) < tokens:
            part = next(texts, None)
            if part is None:
                raise SystemExit(f"../shared/data/haystack holds too little text for {n} documents of {tokens} tokens")
            parts.append(part)
        out.append(tok.truncate("\n\n".join(parts), tokens))
    return out


def long_request(doc: str, nonce: str) -> dict:
    return {"model": "bench", "max_tokens": 16, "messages": [
        {"role": "system", "content": "Answer from this document.\n\n" + doc},
        {"role": "user", "content": f"{QUESTION} ref {nonce}"}]}


def answered(r, nonce: str) -> bool:
    """A 200 whose answer is this request's echo (a crossed or corrupted answer is a failure)."""
    try:
        return r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == f"echo:{nonce}"
    except (ValueError, KeyError, IndexError, TypeError):
        return False


def replay(url: str, doc: str, tool, long, budget: str = "4k") -> dict:
    """Ten turns through the server (default headroom): how many requests' messages, as the upstream received them,
    did not start with the previous request's; how many compactions; whether every answer came back."""
    import httpx

    messages = [{"role": "system", "content": "Answer from this document.\n\n" + doc}]
    received, out = None, {"changed": 0, "compacted": 0, "failed": 0, "over": 0, "turns": 0, "tokens": []}
    with httpx.Client(timeout=300) as h:
        for t in range(10):
            more = "Some more context for this turn. " * 40 if long(t) else ""
            messages.append({"role": "user", "content": f"Question {t}: {QUESTION} {more}ref t{t}"})
            r = h.post(url, json={"model": "bench", "messages": messages},
                       headers={"X-Ctxc-Budget": budget, "X-Ctxc-Headroom": "0.25"})
            got = r.json()["ctxc_received"]
            out["failed"] += not answered(r, f"t{t}") or got != r.headers["x-ctxc-message-hashes"].split(",")
            out["changed"] += received is not None and got[: len(received)] != received
            out["compacted"] += r.headers["x-ctxc-compacted"] == "1"
            out["over"] += int(r.headers["x-ctxc-output-tokens"]) > int(r.headers["x-ctxc-budget"])
            out["tokens"].append((int(r.headers["x-ctxc-input-tokens"]), int(r.headers["x-ctxc-output-tokens"])))
            out["turns"] += 1
            received = got
            messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
            if tool(t):  # a tool call and its result, in JSON
                messages.append({"role": "assistant", "content": None, "tool_calls": [{
                    "id": f"call{t}", "type": "function", "function": {"name": "rows", "arguments": "{}"}}]})
                messages.append({"role": "tool", "tool_call_id": f"call{t}", "content": json.dumps({"rows": [
                    {"n": k, "text": f"row {k} of turn {t} " * 5} for k in range(60)]})})
    return out


def through_server(h, url: str, body: dict):
    t0 = time.perf_counter()
    r = h.post(url, json=body, headers={"X-Ctxc-Budget": "2k"})
    return r, time.perf_counter() - t0


def in_process(body: dict, settings):
    """The call the server makes for the document: the budget less the question, the chat wrapping and the marker
    it appends (about 50 tokens in all)."""
    import ctxc

    t0 = time.perf_counter()
    res = ctxc.compress(body["messages"][0]["content"], budget=INPROC_BUDGET, query=body["messages"][1]["content"],
                        settings=settings)
    return res, time.perf_counter() - t0


def concurrent(url: str, make, clients: int, per_client: int, headers: dict | None = None) -> tuple[float, int, int]:
    """`clients` threads, each with its own connection, sending `per_client` requests: (requests/s, done, failed)."""
    import httpx

    failed, done = [0], [0]
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(c: int) -> None:
        with httpx.Client(timeout=120) as h:
            start.wait()
            for i in range(per_client):
                nonce = f"c{c}i{i}"
                try:
                    ok = answered(h.post(url, json=make(nonce), headers=headers), nonce)
                except httpx.HTTPError:
                    ok = False
                with lock:
                    done[0] += 1
                    failed[0] += not ok

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.perf_counter() - t0), done[0], failed[0]


# ------------------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="sequential requests per path")
    ap.add_argument("--concurrent-requests", type=int, default=25, help="requests per client in the 8-client runs")
    ap.add_argument("--docs", type=int, default=6, help="8k-token documents compressed (each a fresh request)")
    ap.add_argument("--deadline", type=float, default=300, help="stop starting new stages after this many seconds")
    ap.add_argument("--upstream-only", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.upstream_only:
        run_upstream(args.upstream_only)
        return

    import httpx

    import ctxc
    from ctxc.apps.serve import free_port
    from ctxc.lm.hw import tune_process

    tune_process()  # what the `ctxc` process does at start, so the in-process calls run as the server's do
    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ctxc-bench-serve-"))
    up_port, px_port = free_port(), free_port()
    up_url, px_url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{px_port}"
    env = {**os.environ, "CTXC_HOME": str(work / "server-home"), "CTXC_CONFIG": ""}
    # In-process compression gets a cold home of its own, as the server has: neither reuses the other's embeddings.
    inproc = ctxc.Settings.resolve({"home": str(work / "bench-home")}, env={**os.environ, "CTXC_CONFIG": ""})
    procs = [subprocess.Popen([sys.executable, __file__, "--upstream-only", str(up_port)], env=env),
             subprocess.Popen([CTXC, "serve", "--port", str(px_port), "--upstream", up_url + "/v1", "-b", "8k",
                               "--headroom", "0", "-m", "extractive"], env=env, stderr=subprocess.DEVNULL)]
    results: dict = {}
    try:
        wait_up(up_url + "/v1/models", procs[0])
        wait_up(px_url + "/health", procs[1])
        chat_direct, chat_proxy = up_url + "/v1/chat/completions", px_url + "/v1/chat/completions"

        # 1. sequential small requests, interleaved
        lat = {"direct": [], "proxy": [], "bypass": []}
        failed = 0
        with httpx.Client(timeout=60) as d, httpx.Client(timeout=60) as p:
            for i in range(20):  # warm-up: connections, the server's tokenizer
                d.post(chat_direct, json=small_request("w"))
                p.post(chat_proxy, json=small_request("w"))
            for i in range(args.requests):
                order = [("direct", d, chat_direct, None), ("proxy", p, chat_proxy, None),
                         ("bypass", p, chat_proxy, {"X-Ctxc-Bypass": "1"})]
                for name, h, url, hdr in order[i % 3:] + order[: i % 3]:
                    nonce = f"{name}{i}"
                    t0 = time.perf_counter()
                    r = h.post(url, json=small_request(nonce), headers=hdr)
                    lat[name].append(time.perf_counter() - t0)
                    failed += not answered(r, nonce)
        results["sequential_failed"] = failed

        # 2. 8 concurrent clients
        conc = {}
        for name, url in (("direct", chat_direct), ("proxy", chat_proxy)):
            conc[name] = concurrent(url, small_request, 8, args.concurrent_requests)

        # 3. an 8k-token context compressed to 2k
        docs = long_docs(args.docs + 11, 8000)
        warm, fresh = docs[0], docs[1:args.docs + 1]
        same, distinct, story = docs[args.docs + 1], docs[args.docs + 2: args.docs + 10], docs[-1]
        docs = None
        comp = []
        with httpx.Client(timeout=300) as h:
            h.post(chat_proxy, json=long_request(warm, "warm"), headers={"X-Ctxc-Budget": "2k"})  # loads the embedder
            ctxc.compress(warm, budget=INPROC_BUDGET, query=QUESTION, settings=inproc)
            for i, doc in enumerate(fresh):
                if time.monotonic() - t_start > args.deadline:
                    break
                body = long_request(doc, f"d{i}")
                t0 = time.perf_counter()
                rd = h.post(chat_direct, json=body)
                t_direct = time.perf_counter() - t0

                # alternate which goes first, so that both see the same drift of a shared machine's load
                if i % 2:
                    (res, t_in), (rp, t_proxy) = in_process(body, inproc), through_server(h, chat_proxy, body)
                else:
                    (rp, t_proxy), (res, t_in) = through_server(h, chat_proxy, body), in_process(body, inproc)
                t0 = time.perf_counter()
                rh = h.post(chat_proxy, json=body, headers={"X-Ctxc-Budget": "2k"})  # the same request again
                t_hit = time.perf_counter() - t0
                ok = answered(rd, f"d{i}") and answered(rp, f"d{i}") and answered(rh, f"d{i}")
                stable = rp.headers["x-ctxc-message-hashes"] == rh.headers["x-ctxc-message-hashes"] == \
                    ",".join(rh.json()["ctxc_received"])
                comp.append({"direct": t_direct, "proxy": t_proxy, "hit": t_hit, "inproc": t_in, "ok": ok,
                             "server": float(rp.headers["x-ctxc-seconds"]),
                             "stable": stable, "in": int(rp.headers["x-ctxc-input-tokens"]),
                             "out": int(rp.headers["x-ctxc-output-tokens"]), "inproc_out": res.output_tokens})

        # 4. concurrent compression: 8 identical new requests at once (one compression, the same bytes for all),
        # then 8 distinct ones
        same_hashes, same_fail = set(), 0
        distinct_fail, distinct_over = 0, 0
        if time.monotonic() - t_start < args.deadline:
            lock, start = threading.Lock(), threading.Barrier(8)

            def one(i: int, doc: str, tag: str) -> None:
                nonlocal same_fail, distinct_fail, distinct_over
                with httpx.Client(timeout=300) as h:
                    start.wait()
                    r = h.post(chat_proxy, json=long_request(doc, f"{tag}{i}"), headers={"X-Ctxc-Budget": "2k"})
                with lock:
                    if tag == "same":
                        same_fail += not answered(r, f"same{i}")
                        same_hashes.add(r.headers.get("x-ctxc-message-hashes", "").split(",")[0])
                    else:
                        distinct_fail += not answered(r, f"distinct{i}")
                        distinct_over += int(r.headers.get("x-ctxc-output-tokens", 10 ** 9)) > 2000

            for tag, bodies in (("same", [same] * 8), ("distinct", distinct)):
                threads = [threading.Thread(target=one, args=(i, bodies[i], tag)) for i in range(8)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                results[f"{tag}_seconds"] = time.perf_counter() - t0

        # 4b. 8 clients sending 8k-token requests whose document the server already compressed (the steady state of
        # a conversation: memo hits), directly and through the server
        results["long_direct"] = concurrent(chat_direct, lambda n: long_request(same, n), 8, 10)
        results["long_hit"] = concurrent(chat_proxy, lambda n: long_request(same, n), 8, 10, {"X-Ctxc-Budget": "2k"})

        # 5. 10-turn conversations, as the upstream received them: a typical one (one tool result, one long user
        # turn) and a heavy one (a tool result every 4 turns, a long user turn every 3), which outgrows the headroom
        replays = {name: replay(chat_proxy, story, tool, long) for name, tool, long in (
            ("typical", lambda t: t == 3, lambda t: t == 6), ("heavy", lambda t: t % 4 == 1, lambda t: t % 3 == 2))}
        metrics = httpx.get(px_url + "/metrics").text
        rss = peak_rss_mb(procs[1].pid)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------------ report
    d50, d95 = pct(lat["direct"], 50), pct(lat["direct"], 95)
    print(f"\nctxc serve overhead (loopback; upstream: a minimal real OpenAI-compatible uvicorn app in "
          f"bench_serve.py that answers instantly, in its own process; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n")
    print("| path | requests | p50 ms | p95 ms | added p50 ms | added p95 ms | req/s, 8 clients | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label in (("direct", "client -> upstream"), ("proxy", "through ctxc serve (pass-through)"),
                        ("bypass", "through ctxc serve (X-Ctxc-Bypass: 1)")):
        xs = lat[name]
        rps, n, bad = conc.get(name, (float("nan"), 0, 0))
        added = "-" if name == "direct" else f"{pct(xs, 50) - d50:.2f}"
        added95 = "-" if name == "direct" else f"{pct(xs, 95) - d95:.2f}"
        tail = f"{rps:.0f} | {bad} |" if name in conc else "- | - |"
        runs = f"{len(xs)} (+{n} concurrent)" if name in conc else f"{len(xs)}"
        print(f"| {label} | {runs} | {pct(xs, 50):.2f} | {pct(xs, 95):.2f} | {added} | {added95} | {tail}")
    print(f"\nsequential answers failed or corrupted: {results['sequential_failed']}")
    if comp:
        added = [c["proxy"] - c["direct"] for c in comp]
        extra = [c["proxy"] - c["direct"] - c["inproc"] for c in comp]
        print(f"\n8k-token context -> 2k budget (extractive, with the question), {len(comp)} fresh documents\n")
        print("| what | p50 ms | p95 ms | max ms |")
        print("|---|---|---|---|")
        for label, xs in (("client -> upstream, 8k context", [c["direct"] for c in comp]),
                          ("through ctxc serve, compressing", [c["proxy"] for c in comp]),
                          ("added by ctxc serve", added),
                          ("the server's own policy + compression time (X-Ctxc-Seconds)", [c["server"] for c in comp]),
                          ("added minus that: HTTP, JSON, forwarding", [c["proxy"] - c["direct"] - c["server"]
                                                                       for c in comp]),
                          ("same ctxc.compress call in-process", [c["inproc"] for c in comp]),
                          ("added minus in-process (goal <= 10)", extra),
                          ("added, the same request again (memo hit)", [c["hit"] - c["direct"] for c in comp])):
            print(f"| {label} | {statistics.median(xs) * 1000:.1f} | {pct(xs, 95):.1f} | {max(xs) * 1000:.1f} |")
        print(f"\ntokens in/out per request: {comp[0]['in']} -> {comp[0]['out']} (budget 2000; in-process budget "
              f"{INPROC_BUDGET}, output {comp[0]['inproc_out']}); answers failed: {sum(not c['ok'] for c in comp)}; "
              f"repeat byte-identical: {sum(c['stable'] for c in comp)}/{len(comp)}")
    if "same_seconds" in results:
        print(f"8 concurrent identical new 8k requests: {results['same_seconds']:.1f} s "
              f"({8 / results['same_seconds']:.2f} req/s), failed {same_fail}, "
              f"distinct compressed bytes {len(same_hashes)} (1 = compressed once, the same for all)")
        print(f"8 concurrent distinct new 8k requests: {results['distinct_seconds']:.1f} s "
              f"({8 / results['distinct_seconds']:.2f} req/s), failed {distinct_fail}, "
              f"over budget {distinct_over}")
    for name, label in (("long_direct", "client -> upstream"), ("long_hit", "through ctxc serve, memo hit")):
        rps, n, bad = results[name]
        print(f"8 clients, 8k-token requests, {label}: {rps:.0f} req/s, {n} requests, failed {bad}")
    for name, r in replays.items():
        print(f"10-turn replay, {name} (8k-token document, 4k budget, headroom 0.25; as the upstream received it): "
              f"{r['turns']} turns, prefix changed at {r['changed']} of {r['turns'] - 1} turns, compactions "
              f"{r['compacted']}, over budget {r['over']}, failed {r['failed']}; tokens in -> out at the last turn "
              f"{r['tokens'][-1][0]} -> {r['tokens'][-1][1]}")
    saved = [line for line in metrics.splitlines() if line.startswith(("ctxc_input_tokens_total",
                                                                       "ctxc_output_tokens_total",
                                                                       "ctxc_compactions_total"))]
    print(f"peak RSS: ctxc serve {rss:.0f} MB; this process, which ran the same compress calls in-process, "
          f"{peak_rss_mb(os.getpid()):.0f} MB; /metrics: {'; '.join(saved)}")
    print(f"total {time.monotonic() - t_start:.0f} s")


if __name__ == "__main__":
    main()
