"""`ctxc mcp` over stdio, driven by the official MCP SDK's own client: the tools are listed, and compress, count,
retrieve, ask and expand answer (errors as tool errors with the one-line message)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import re

import anyio

import ctxc

CTXC = str(Path(sys.executable).with_name("ctxc"))
QUESTION = "Who approves FMAG declarations?"


async def session_calls(env: dict, calls: list) -> tuple[list[str], list]:
    """Tool names, and the result of each call in order; a call's arguments may be a function of the results so
    far."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(command=CTXC, args=["mcp", "--budget", "x4"], env=env)
    with open(os.devnull, "w") as quiet:
        async with stdio_client(params, errlog=quiet) as (read, write):
            async with ClientSession(read, write) as s:
                await s.initialize()
                names = sorted(t.name for t in (await s.list_tools()).tools)
                results = []
                for name, args in calls:
                    results.append(await s.call_tool(name, args(results) if callable(args) else args))
    return names, results


def payload(result) -> dict:
    assert not result.is_error, result.content
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(result.content[0].text)


def test_mcp_tools_over_stdio(tmp_path, sample_text, embedder):
    doc = sample_text[:6000]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "fema.txt").write_text(doc)
    ctxc.build_index(tmp_path / "docs", tmp_path / "idx")
    (tmp_path / "short.txt").write_text(sample_text[:700])
    rows = json.dumps({"rows": [{"n": k, "name": f"row {k}"} for k in range(100)]})
    env = {"CTXC_HOME": os.environ["CTXC_HOME"], "CTXC_CONFIG": "", "CTXC_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    calls = [
        ("compress", {"text": doc, "budget": "300", "query": QUESTION}),
        ("compress", {"path": str(tmp_path / "docs" / "fema.txt"), "method": "truncate"}),
        ("count", {"text": doc}),
        ("retrieve", {"index": str(tmp_path / "idx"), "query": QUESTION, "budget": "200"}),
        ("ask", {"cartridge": str(tmp_path / "short.txt"), "question": "What does the text introduce?",
                 "max_new_tokens": 6}),
        ("compress", {"text": doc, "budget": "lots"}),
        ("expand", {"id": "ctxc:0123456789abcdef"}),
        ("compress", {}),
        ("expand", lambda done: {"id": payload(done[0])["id"]}),  # compress kept the original
        ("compress", {"text": rows, "budget": "150"}),  # JSON: the json method by default
        ("expand", lambda done: {"id": re.search(r"ctxc:[0-9a-f]{16}", payload(done[9])["text"]).group(0)}),
    ]
    names, res = anyio.run(session_calls, env, calls)
    assert names == ["ask", "compress", "count", "expand", "retrieve"]
    first = payload(res[0])
    assert first["output_tokens"] <= 300 < first["input_tokens"] and first["text"].strip() and first["id"]
    by_path = payload(res[1])
    assert by_path["method"] == "truncate" and doc.startswith(by_path["text"])
    assert by_path["output_tokens"] <= by_path["input_tokens"] // 4 + 1  # the server's default budget, x4
    assert payload(res[2]) == {"tokens": ctxc.count(doc), "tokenizer": "cl100k"}
    hits = payload(res[3])
    assert hits["output_tokens"] <= 200 and hits["chunks"] and "fema.txt" in hits["chunks"][0]["path"]
    answer = payload(res[4])
    assert answer["text"].strip() and answer["stats"]["new_tokens"] <= 6
    for bad, words in ((res[5], "bad budget"), (res[6], "no compressed span"), (res[7], "either `text` or `path`")):
        assert bad.is_error and words in bad.content[0].text, bad.content
    assert payload(res[8])["text"] == doc
    assert payload(res[9])["method"] == "json"
    shrunk = json.loads(payload(res[9])["text"])  # JSON stays JSON, its cuts expand to the rows left out
    assert payload(res[9])["output_tokens"] <= 150 and shrunk["rows"][0] == {"n": 0, "name": "row 0"}
    omitted = json.loads(payload(res[10])["text"])
    assert omitted and len(omitted) + len(shrunk["rows"]) - 1 == 100 and omitted[0]["n"] == len(shrunk["rows"]) // 2
