"""`ctxc serve` on loopback, driven by the official `openai` client and by raw HTTP (httpx): real uvicorn servers in
threads (the local model upstream, and a second server that proxies to it as to any OpenAI-compatible URL), and one
`ctxc serve` process. Also the structure-aware `json` method on its own."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from ctxc.apps.serve import ServeConfig, ServerThread, create_app, free_port
from ctxc.apps.serve_policy import message_hash
from ctxc.apps.serve_store import SpanStore
from ctxc.tokenizers import get_tokenizer

TOK = get_tokenizer("cl100k")
TOKEN = "test-token-123"
CTXC = str(Path(sys.executable).with_name("ctxc"))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def local(lm, tmp_path_factory, one_thread):
    """`ctxc serve --upstream local --auth-token ...` with a 256 KiB request limit, on a free loopback port."""
    store = SpanStore(tmp_path_factory.mktemp("serve") / "serve.sqlite")
    config = ServeConfig(upstream="local", budget="2k", method="extractive", auth_token=TOKEN,
                         max_request_bytes=256 << 10, max_new_tokens=16)
    with ServerThread(create_app(config, lm=lm, store=store)) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(local):
    with httpx.Client(base_url=local.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(local):
    return openai.OpenAI(base_url=local.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


def fema(sample_text: str, tokens: int) -> str:
    return TOK.truncate(sample_text, tokens)


def tool_result(page: int, n: int) -> str:
    return json.dumps({"tool": "search", "page": page, "results": [
        {"id": f"r{page}-{k}", "title": f"Result {k} of page {page}", "snippet": "FEMA grants cover firefighting costs "
         * 3, "score": round(1 - k / 50, 3), "tags": ["fema", "grant"]} for k in range(n)]})


# ------------------------------------------------------------------------------------------------ the openai client
def test_openai_client_chat_stream_and_models(client, http):
    messages = [{"role": "user", "content": "Say hello."}]
    raw = client.chat.completions.with_raw_response.create(model="ctxc-local", messages=messages, max_tokens=6)
    done = raw.parse()
    text = done.choices[0].message.content
    assert isinstance(text, str) and text.strip()
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens <= 6
    assert int(raw.headers["x-ctxc-input-tokens"]) == int(raw.headers["x-ctxc-output-tokens"]) > 0
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="ctxc-local", messages=messages, max_tokens=6, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == text and finish == done.choices[0].finish_reason  # greedy: the same answer streamed
    # the same stream as raw HTTP: server-sent events, the savings headers, usage last, then [DONE]
    body = {"model": "ctxc-local", "messages": messages, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-ctxc-input-tokens"] == raw.headers["x-ctxc-input-tokens"]
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == text
    assert events[-1]["choices"] == [] and events[-1]["usage"] == done.usage.model_dump(exclude_none=True)
    assert [m.id for m in client.models.list().data] == ["ctxc-local"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_long_context_is_compressed_to_the_budget_and_expands(client, http, sample_text):
    doc = fema(sample_text, 2000)
    messages = [{"role": "system", "content": doc}, {"role": "user", "content": "Who approves FMAG declarations?"}]
    budget = {"X-Ctxc-Budget": "600"}
    dry = http.post("/v1/ctxc/compress", json={"model": "ctxc-local", "messages": messages}, headers=budget).json()
    assert dry["input_tokens"] > 2000 and dry["output_tokens"] <= dry["budget"] == 600
    assert dry["messages"][1] == messages[1]  # the query is never changed
    (marker,) = dry["markers"]
    assert f"ctxc:{marker}" in dry["messages"][0]["content"]
    assert http.get(f"/v1/ctxc/expand/{marker}").json()["text"] == doc
    assert http.get("/v1/ctxc/expand/0123456789abcdef").status_code == 404
    raw = client.chat.completions.with_raw_response.create(model="ctxc-local", messages=messages, max_tokens=3,
                                                          extra_headers=budget)
    assert raw.parse().choices[0].message.content.strip()
    assert int(raw.headers["x-ctxc-output-tokens"]) == dry["output_tokens"] <= 600
    # what the chat request sent is, byte for byte, what the dry run showed
    assert raw.headers["x-ctxc-message-hashes"].split(",") == [message_hash(m) for m in dry["messages"]]
    # the body field does what the headers do; bypass forwards untouched
    body = {"model": "ctxc-local", "messages": messages, "ctxc": {"budget": 600}}
    assert http.post("/v1/ctxc/compress", json=body).json()["messages"] == dry["messages"]
    cut = http.post("/v1/ctxc/compress", json=body, headers={"X-Ctxc-Method": "truncate"}).json()
    assert cut["output_tokens"] <= 600 and cut["messages"][0]["content"].startswith(doc[:300])
    assert cut["messages"][0]["content"] != dry["messages"][0]["content"]
    r = http.post("/v1/ctxc/compress", json=body, headers={"X-Ctxc-Bypass": "1"})
    assert r.json()["messages"] == messages and r.headers["x-ctxc-output-tokens"] == r.headers["x-ctxc-input-tokens"]


def replay_conversation(sample_text: str, story_text: str) -> tuple[list[dict], list[list[dict]]]:
    """A recorded 10-turn conversation: a system document, a long user turn pasted in the first request, tool
    results in JSON, a long user remark, short turns."""
    first = [{"role": "system", "content": "You answer from this document.\n\n" + fema(sample_text, 1400)},
             {"role": "user", "content": "Here is a story I like:\n\n" + TOK.truncate(story_text, 700)},
             {"role": "assistant", "content": "Noted."},
             {"role": "user", "content": "Who approves FMAGs?"}]

    def call(i, q):
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "search", "arguments": json.dumps({"q": q})}}]}

    turns = [
        [{"role": "assistant", "content": "FEMA's Regional Administrator."}, {"role": "user", "content": "How fast?"}],
        [call(1, "FMAG timing"), {"role": "tool", "tool_call_id": "c1", "content": tool_result(1, 12)}],
        [{"role": "assistant", "content": "Within hours."},
         {"role": "user", "content": "Thanks. " + "A longer remark about eligibility and cost shares. " * 16}],
        [{"role": "assistant", "content": "Understood."}, {"role": "user", "content": "What costs are eligible?"}],
        [call(2, "eligible costs"), {"role": "tool", "tool_call_id": "c2", "content": tool_result(2, 8)}],
        [{"role": "assistant", "content": "Firefighting costs."}, {"role": "user", "content": "And the cost share?"}],
        [{"role": "assistant", "content": "75% federal."}, {"role": "user", "content": "Who pays the rest?"}],
        [{"role": "assistant", "content": "The state."}, {"role": "user", "content": "Summarise in one line."}],
        [{"role": "assistant", "content": "FEMA approves, pays 75%."}, {"role": "user", "content": "Thanks!"}],
    ]
    return first, turns


def replay(http, sample_text: str, story_text: str, budget: int):
    """The conversation's 10 requests through the dry run: (the answer, each message as sent) per turn."""
    first, turns = replay_conversation(sample_text, story_text)
    messages = list(first)
    for t in range(10):
        messages = messages + (turns[t - 1] if t else [])
        r = http.post("/v1/ctxc/compress", json={"model": "ctxc-local", "messages": messages},
                      headers={"X-Ctxc-Budget": str(budget)})
        assert r.status_code == 200, r.text
        yield r, [json.dumps(m, sort_keys=True) for m in r.json()["messages"]]


def test_ten_turn_replay_sends_a_byte_stable_prefix(http, client, sample_text, story_text):
    """Each request's messages, as sent, start with the previous request's messages byte for byte, although the
    document, the pasted story and the tool results are compressed on the way."""
    previous, stats = None, []
    for t, (r, as_sent) in enumerate(replay(http, sample_text, story_text, 2000)):
        sent = r.json()
        assert sent["output_tokens"] <= 2000 and not sent["compacted"], (t, sent["output_tokens"])
        assert r.headers["x-ctxc-message-hashes"].split(",") == [message_hash(m) for m in sent["messages"]]
        if previous is not None:
            assert as_sent[: len(previous)] == previous, f"turn {t + 1} changed the prefix"
        previous = as_sent
        stats.append((sent["compressed"], sent["reused"]))
        for m in sent["messages"]:
            if m["role"] == "tool":
                json.loads(m["content"])  # JSON tool results stay JSON
    assert stats[0][0] == 2  # the document and the pasted story, at the first request
    # the chat route sends what the dry run showed: the 10th request, answered by the model
    first, turns = replay_conversation(sample_text, story_text)
    raw = client.chat.completions.with_raw_response.create(
        model="ctxc-local", messages=first + sum(turns[:9], []), max_tokens=1, extra_headers={"X-Ctxc-Budget": "2000"})
    assert raw.headers["x-ctxc-message-hashes"].split(",") == [message_hash(m) for m in sent["messages"]]
    assert raw.headers["x-ctxc-compressed"] == "0" and raw.parse().usage.prompt_tokens > 0
    assert sum(c for c, _ in stats) >= 4 and all(r >= 2 for _, r in stats[1:])
    assert sent["input_tokens"] > 3000


def test_concurrent_requests_compress_a_new_message_once(local, sample_text):
    """Six clients send the same new conversation at once: one compresses, the others wait for the memo and send
    the same bytes."""
    from concurrent.futures import ThreadPoolExecutor

    doc = TOK.truncate(sample_text[len(sample_text) // 2:], 1500)
    body = {"model": "ctxc-local", "messages": [{"role": "system", "content": doc},
                                                {"role": "user", "content": "What is the cost share?"}]}

    def send(_):
        with httpx.Client(base_url=local.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as h:
            r = h.post("/v1/ctxc/compress", json=body, headers={"X-Ctxc-Budget": "500"})
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, range(6)))
    assert len({json.dumps(a["messages"]) for a in answers}) == 1 and answers[0]["output_tokens"] <= 500
    assert sorted((a["compressed"], a["reused"]) for a in answers) == [(0, 1)] * 5 + [(1, 0)]


def test_a_full_budget_compacts_once_then_is_stable_again(http, sample_text, story_text):
    previous, breaks = None, []
    for t, (r, as_sent) in enumerate(replay(http, sample_text, story_text, 1000)):
        assert r.json()["output_tokens"] <= 1000
        if previous is not None and as_sent[: len(previous)] != previous:
            breaks.append(t)
            assert r.json()["compacted"]
        previous = as_sent
    assert len(breaks) == 1, breaks


def test_a_filled_budget_compacts_once_for_growing_questions(http, sample_text):
    """headroom 0 fills the budget to the token (truncate): the next, longer question overflows it and compacts; the
    compaction leaves slack, so the questions after it reuse the compacted document."""
    doc = TOK.truncate(sample_text[len(sample_text) // 3:], 1200)
    headers = {"X-Ctxc-Budget": "800", "X-Ctxc-Headroom": "0", "X-Ctxc-Method": "truncate"}
    compacted, sent = [], set()
    for k in range(5):
        question = "Which costs are eligible?" + " Please answer in one short sentence." * k
        r = http.post("/v1/ctxc/compress", headers=headers, json={"model": "ctxc-local", "messages": [
            {"role": "system", "content": doc}, {"role": "user", "content": question}]}).json()
        assert r["output_tokens"] <= 800
        compacted.append(r["compacted"])
        sent.add(r["messages"][0]["content"])
    assert compacted == [False, True, False, False, False] and len(sent) == 2


def test_concurrent_requests_that_overflow_compact_once(local, http, sample_text):
    """A document decided to fill the budget (headroom 0), then six requests at once whose longer question no longer
    fits it: one compacts, the others wait for it and send the same compacted bytes."""
    from concurrent.futures import ThreadPoolExecutor

    doc = TOK.truncate(sample_text[2 * len(sample_text) // 3:], 1200)
    headers = {"X-Ctxc-Budget": "800", "X-Ctxc-Headroom": "0"}

    def body(question: str) -> dict:
        return {"model": "ctxc-local", "messages": [{"role": "system", "content": doc},
                                                    {"role": "user", "content": question}]}

    assert not http.post("/v1/ctxc/compress", json=body("Who pays?"), headers=headers).json()["compacted"]

    def send(_):
        with httpx.Client(base_url=local.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as h:
            r = h.post("/v1/ctxc/compress", json=body("Who pays?" + " Please answer in one sentence." * 15),
                       headers=headers)
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(send, range(6)))
    assert sorted(a["compacted"] for a in answers) == [False] * 5 + [True]
    assert len({a["messages"][0]["content"] for a in answers}) == 1 and all(a["output_tokens"] <= 800 for a in answers)


def test_json_tool_results_stay_json(http):
    big = json.loads(tool_result(7, 120))
    big["note"] = "x" * 5000
    messages = [{"role": "user", "content": "Find grants."},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c9", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c9", "content": json.dumps(big, indent=2)}]
    sent = http.post("/v1/ctxc/compress", json={"model": "ctxc-local", "messages": messages},
                     headers={"X-Ctxc-Budget": "700"}).json()
    assert sent["output_tokens"] <= 700 < sent["input_tokens"]
    out = json.loads(sent["messages"][2]["content"])
    assert list(out) == list(big) and out["tool"] == "search" and out["page"] == 7
    items = out["results"]
    assert isinstance(items[0], dict) and set(items[0]) == set(big["results"][0]) and items[0] == big["results"][0]
    assert items[-1] == big["results"][-1]
    (note,) = [x for x in items if isinstance(x, str)]
    omitted = int(re.search(r"(\d+) items omitted", note).group(1))
    assert omitted == len(big["results"]) - (len(items) - 1)
    mid = re.search(r"ctxc:([0-9a-f]{16})", note).group(1)
    assert json.loads(http.get(f"/v1/ctxc/expand/{mid}").json()["text"]) == big["results"][len(items) // 2:][:omitted]
    assert out["note"].startswith("xxx") and "chars" in out["note"] and len(out["note"]) < 5000


# ------------------------------------------------------------------------------------------------------ bad requests
def test_bad_requests_get_one_clear_error(http, local):
    def err(r, status, words):
        assert r.status_code == status, (r.status_code, r.text)
        e = r.json()["error"]
        assert words in e["message"] and e["type"], e
        return e

    chat = "/v1/chat/completions"
    err(http.post(chat, content=b'{"model": "ctxc-local", "messages": [', headers={"content-type": "application/json"}),
        400, "not valid JSON")
    err(http.post(chat, content=b"\xff\xfe", headers={"content-type": "application/json"}), 400, "JSON")
    err(http.post(chat, content=b"[" * 100_000, headers={"content-type": "application/json"}), 400, "not valid JSON")
    err(http.post(chat, json=[1, 2]), 400, "JSON object")
    err(http.post(chat, json={"model": "ctxc-local"}), 400, "messages")
    err(http.post(chat, json={"model": "ctxc-local", "messages": []}), 400, "messages")
    err(http.post(chat, json={"model": "ctxc-local", "messages": [{"role": "wizard", "content": "hi"}]}), 400, "role")
    err(http.post(chat, json={"model": "ctxc-local", "messages": [{"role": "user", "content": "hi"}],
                              "stream": "yes"}), 400, "stream")
    err(http.post(chat, json={"model": "ctxc-local", "messages": [{"role": "user", "content": "hi"}],
                              "ctxc": {"budget": "2k", "turbo": True}}), 400, "turbo")
    err(http.post(chat, json={"model": "ctxc-local", "messages": [{"role": "user", "content": "hi"}]},
                  headers={"X-Ctxc-Budget": "lots"}), 400, "bad budget")
    err(http.post(chat, json={"model": "ctxc-local", "messages": [{"role": "user", "content": "hi"}]},
                  headers={"X-Ctxc-Method": "magic"}), 400, "unknown method")
    big = {"model": "ctxc-local", "messages": [{"role": "user", "content": "x " * 200_000}]}
    err(http.post(chat, json=big), 413, "over the limit")
    err(http.get("/v1/nothing"), 404, "no route")
    err(httpx.get(local.url + "/v1/models"), 401, "token")
    assert httpx.get(local.url + "/health").json()["status"] == "ok"  # health needs no token
    assert httpx.get(local.url + "/metrics", headers={"X-Ctxc-Token": TOKEN}).status_code == 200


def test_metrics_count_requests_and_savings(http):
    before = _metric(http, "ctxc_output_tokens_total")
    messages = [{"role": "user", "content": "hi"}]
    r = http.post("/v1/ctxc/compress", json={"model": "ctxc-local", "messages": messages})
    text = http.get("/metrics").text
    assert "# TYPE ctxc_input_tokens_total counter" in text
    assert _metric(http, "ctxc_output_tokens_total") == before + int(r.headers["x-ctxc-output-tokens"])
    assert re.search(r'ctxc_requests_total\{route="chat",status="400"\} [1-9]', text)
    assert _metric(http, "ctxc_input_tokens_total") > _metric(http, "ctxc_output_tokens_total")


def _metric(http, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", http.get("/metrics").text, re.M)
    return float(m.group(1))


# ------------------------------------------------------------------------------------------- an upstream by URL
def test_proxy_to_an_openai_compatible_url(local, tmp_path):
    """A second server forwards to the first as to any OpenAI-compatible endpoint: the client's key goes to the
    upstream only, streaming is relayed, upstream errors pass through, and a dead upstream is a 502 naming it."""
    config = ServeConfig(upstream=local.url + "/v1", budget="2k", method="truncate", auth_token="proxy-token")
    own = {"X-Ctxc-Token": "proxy-token"}  # the proxy's token; Authorization carries the upstream's key

    def upstream_401s() -> float:
        m = re.search(r'ctxc_requests_total\{route="chat",status="401"\} (\S+)',
                      httpx.get(local.url + "/metrics", headers={"X-Ctxc-Token": TOKEN}).text)
        return float(m.group(1)) if m else 0.0

    with ServerThread(create_app(config, store=SpanStore(tmp_path / "proxy.sqlite"))) as proxy:
        c = openai.OpenAI(base_url=proxy.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120, default_headers=own)
        messages = [{"role": "user", "content": "Say hello."}]
        raw = c.chat.completions.with_raw_response.create(model="ctxc-local", messages=messages, max_tokens=6)
        text = raw.parse().choices[0].message.content
        assert text.strip() and raw.headers["x-ctxc-input-tokens"]
        assert raw.headers["x-request-id"] == raw.parse().id  # the upstream's support id comes back
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="ctxc-local", messages=messages, max_tokens=6, stream=True) if ch.choices)
        assert streamed == text
        assert [m.id for m in c.models.list().data] == ["ctxc-local"]
        seen = upstream_401s()
        with pytest.raises(openai.AuthenticationError):  # the upstream's own 401, passed through
            openai.OpenAI(base_url=proxy.url + "/v1", api_key="wrong", max_retries=0,
                          default_headers=own).chat.completions.create(model="ctxc-local", messages=messages,
                                                                       max_tokens=2)
        assert upstream_401s() == seen + 1
        with pytest.raises(openai.AuthenticationError):  # no proxy token: refused before the upstream
            openai.OpenAI(base_url=proxy.url + "/v1", api_key=TOKEN, max_retries=0).chat.completions.create(
                model="ctxc-local", messages=messages, max_tokens=2)
        assert upstream_401s() == seen + 1
        with pytest.raises(openai.AuthenticationError):  # the proxy's own token is never sent on to the upstream
            openai.OpenAI(base_url=proxy.url + "/v1", api_key="proxy-token", max_retries=0).chat.completions.create(
                model="ctxc-local", messages=messages, max_tokens=2)
        assert upstream_401s() == seen + 2
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with ServerThread(create_app(ServeConfig(upstream=dead, method="truncate", connect_timeout=2),
                                 store=SpanStore(tmp_path / "dead.sqlite"))) as proxy:
        r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": messages}, timeout=30)
        assert r.status_code == 502 and dead in r.json()["error"]["message"]
        assert "ctxc_upstream_errors_total 1" in httpx.get(proxy.url + "/metrics").text
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        slow = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        with ServerThread(create_app(ServeConfig(upstream=slow, method="truncate", timeout=1),
                                     store=SpanStore(tmp_path / "slow.sqlite"))) as proxy:
            t0 = time.monotonic()
            r = httpx.post(proxy.url + "/v1/chat/completions", json={"model": "m", "messages": messages}, timeout=30)
            assert r.status_code == 504 and slow in r.json()["error"]["message"] and time.monotonic() - t0 < 10


# --------------------------------------------------------------------------------------------------- the command
def test_ctxc_serve_command(tmp_path):
    env = {**os.environ, "CTXC_CONFIG": "", "CTXC_THREADS": "1"}
    r = subprocess.run([CTXC, "serve", "--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--auth-token" in r.stderr and r.stdout == ""
    port, dead = free_port(), f"http://127.0.0.1:{free_port()}/v1"
    proc = subprocess.Popen([CTXC, "serve", "--port", str(port), "--upstream", dead, "-m", "truncate", "-b", "1k"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"model": "m", "messages": [{"role": "user", "content": "secret prompt text"}]}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 502 and dead in r.json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert out == "" and f"ctxc serve: http://127.0.0.1:{port}/v1" in err
    assert "secret prompt text" not in err  # prompts are not logged


# ------------------------------------------------------------------------------------------------ the json method
def test_json_method_keeps_structure_within_budget():
    from ctxc import compress

    doc = {"items": [{"n": i, "name": f"item {i}", "ok": i % 2 == 0, "w": i / 3, "none": None} for i in range(300)],
           "text": "long " * 2000, "nested": {"deep": [[1, 2, 3]] * 50}}
    src = json.dumps(doc, indent=2)
    for budget in (2000, 400, 120):
        res = compress(src, budget, method="json")
        out = json.loads(res.text)
        assert res.output_tokens <= budget and list(out) == list(doc)
        assert out["items"][0] == doc["items"][0] and out["items"][-1] == doc["items"][-1]
        assert isinstance(out["text"], str) and isinstance(out["nested"]["deep"], list)
    assert compress(src, 400, method="json").text == compress(src, 400, method="json").text
    # prose is not JSON: the fallback method takes it
    assert compress("One sentence here. " * 100, 30, method="json").info["fallback"] == "extractive"


def test_compress_command_takes_the_json_method(tmp_path):
    from typer.testing import CliRunner

    from ctxc.cli import app

    (tmp_path / "r.json").write_text(tool_result(3, 200))
    r = CliRunner().invoke(app, ["compress", str(tmp_path / "r.json"), "-m", "json", "-b", "300"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert TOK.count(r.stdout.strip()) <= 300 and out["page"] == 3 and "items omitted" in json.dumps(out)
