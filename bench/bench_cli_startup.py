"""The daily commands, whole process and cold, next to `python -c pass` and `python -c 'import torch'` measured in
the same run: start-up (`--help`, `--version`), `count` on a 50-file folder, extractive `compress` of a 10k-token
file without and with a question, the same file again with a new question, hybrid `retrieve` on a small index,
and `ask`'s first token from a cartridge (time to the first byte on stdout, from process start).

Run: .venv/bin/python bench/bench_cli_startup.py [--runs 5] [--baseline PKG_DIR]

--baseline runs the same commands with another ctxc (a plain package folder, e.g. one commit's tree assembled by
`git archive` + its package-dir mapping) in the same run, so the before/after columns share the machine's load.
Each ctxc gets its own fresh CTXC_HOME (the converted model is hard-linked in, so no run pays its one-time
conversion); "cold" means a fresh process, and for the question cases an empty embedding memo. The machine is
shared: read the ratios to `python -c pass` / `import torch`, not the bare seconds. Goals (issue 14): extractive
compress <= 2.5 s, same document with a new question <= 1.5 s, hybrid retrieve <= 1.5 s, ask first token <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _data import SHARED  # noqa: E402

PY = sys.executable
PASS, TORCH = "python -c pass", "python -c 'import torch'"
HEAVY = ("numpy", "torch", "transformers", "sentence_transformers", "sklearn", "faiss", "ray", "tiktoken")
QUESTIONS = ["Why do startups fail?", "What did the founders learn about money?", "How should you pick a market?",
             "What makes a good programmer?", "Why is growth important?", "What do investors look for?",
             "When should you hire people?", "What is the role of luck?", "How do you find ideas?",
             "What happened to the company in the end?", "Who were the early users?", "What is wrong with meetings?"]


def tokens(text: str) -> int:
    from ctxc.tokenizers import get_tokenizer

    return get_tokenizer("cl100k").count(text)


def make_inputs(work: Path) -> dict:
    """A 10k-token file (essays joined), a 50-file folder, a 1k-token document for the cartridge."""
    essays = sorted((SHARED / "haystack").glob("paulgraham_*.txt"))
    text, parts = "", []
    for e in essays:
        parts.append(e.read_text())
        text = "\n\n".join(parts)
        if tokens(text) >= 10_000:
            break
    while tokens(text) > 10_000:
        text = text[: int(len(text) * 0.98)]
    (work / "doc10k.txt").write_text(text)
    folder = work / "fifty"
    folder.mkdir()
    chunks = [text[i:i + 1500] for i in range(0, len(text), 1500)]
    for i in range(50):
        sub = folder / f"part{i // 10}"
        sub.mkdir(exist_ok=True)
        (sub / f"note{i:02d}.md").write_text(chunks[i % len(chunks)])
    small = essays[-1].read_text()
    while tokens(small) > 1000:
        small = small[: int(len(small) * 0.9)]
    (work / "doc1k.txt").write_text(small)
    return {"doc": work / "doc10k.txt", "folder": folder, "small": work / "doc1k.txt",
            "doc_tokens": tokens(text), "small_tokens": tokens(small)}


def fresh_home(base: Path, models_from: Path | None) -> Path:
    home = Path(tempfile.mkdtemp(dir=base, prefix="home-"))
    if models_from and (models_from / "models").is_dir():
        def link(src, dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)

        shutil.copytree(models_from / "models", home / "models", copy_function=link)
    return home


class Ctxc:
    """One ctxc to run: this checkout's (`ctxc` beside the interpreter) or a plain package folder."""

    def __init__(self, label: str, pkg: Path | None, home: Path):
        self.label, self.home = label, home
        self.env = dict(os.environ, CTXC_HOME=str(home))
        self.env.pop("CTXC_THREADS", None)
        if pkg is None:
            self.cmd = [str(Path(PY).with_name("ctxc"))]
        else:
            self.env["PYTHONPATH"] = str(pkg)
            self.cmd = [PY, "-c", "import sys; sys.argv[0] = 'ctxc'; from ctxc.cli import main; main()"]

    def run(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd + [str(a) for a in args], env=self.env, capture_output=True, text=True,
                              check=check)

    def timed(self, *args) -> tuple[float, float]:
        """(wall seconds, CPU seconds of the child): other jobs on the machine stretch the first, barely the second."""
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(self.cmd + [str(a) for a in args], env=self.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"{self.label}: ctxc {' '.join(map(str, args))} failed: {r.stderr.strip()[-300:]}")
        return wall, _cpu_since(r0)

    def first_byte(self, *args) -> tuple[float, float]:
        """(seconds from process start to the first byte on stdout, i.e. the first answer token of `ask`; the
        `ttft_s` that `ask --stats` reports, which counts from the end of model loading)."""
        t0 = time.perf_counter()
        p = subprocess.Popen(self.cmd + [str(a) for a in args] + ["--stats"], env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        p.stdout.read(1)
        t = time.perf_counter() - t0
        p.stdout.read()
        err = p.stderr.read().decode(errors="replace")
        p.wait()
        stats = json.loads(err.strip().splitlines()[-1])
        return t, stats["ttft_s"]

    def forget_embeddings(self) -> None:
        for f in self.home.glob("embeddings.sqlite*"):
            f.unlink()


def _cpu_since(r0) -> float:
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def plain(cmd: list[str]) -> tuple[float, float]:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0, _cpu_since(r0)


def cases(c: Ctxc, inp: dict, work: Path) -> list[tuple[str, object]]:
    """(name, thunk returning seconds) for one ctxc; set-up (index, cartridge) happens here, untimed."""
    idx = work / f"idx-{c.label}"
    c.run("index", "build", inp["folder"], "-o", idx)
    cid = c.run("cache", "build", inp["small"]).stdout.strip().splitlines()[-1]
    q = iter(QUESTIONS * 10)

    def cold(*args):
        c.forget_embeddings()  # cold: the document was never embedded before
        return c.timed("compress", inp["doc"], "-b", "x4", *args)

    def new_question():
        c.run("compress", inp["doc"], "-b", "x4", "-q", QUESTIONS[0])  # the document's sentences are now memoised
        return c.timed("compress", inp["doc"], "-b", "x4", "-q", next(q))

    return [
        ("ctxc --help", lambda: c.timed("--help")),
        ("count 50-file folder", lambda: c.timed("count", inp["folder"])),
        ("compress x4 10k tokens", lambda: cold()),
        ("compress x4 + question", lambda: cold("-q", next(q))),
        ("same doc, new question", new_question),
        ("retrieve hybrid (50 files)", lambda: c.timed("retrieve", idx, next(q), "-b", "1k")),
        ("ask: first token", lambda: c.first_byte("ask", cid, next(q), "-n", "8")),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per command (default 5; the median is shown)")
    ap.add_argument("--baseline", type=Path, help="another ctxc as a plain package folder, run side by side")
    ap.add_argument("--models-from", type=Path, default=Path(os.environ.get("CTXC_HOME", Path.home() / ".cache" /
                                                                               "ctxc")),
                    help="a CTXC_HOME whose converted models are linked into each fresh home")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ctxc-daily-"))
    try:
        inp = make_inputs(work)
        ctxcs = [Ctxc("now", None, fresh_home(work, args.models_from))]
        if args.baseline:
            ctxcs.insert(0, Ctxc("baseline", args.baseline, fresh_home(work, args.models_from)))
        table = {c.label: cases(c, inp, work) for c in ctxcs}
        probes = [(PASS, lambda: plain([PY, "-c", "pass"])), (TORCH, lambda: plain([PY, "-c", "import torch"]))]
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        # interleaved, so that a burst of load elsewhere hits every column alike
        for _ in range(args.runs):
            for name, fn in probes:
                results.setdefault(("probe", name), []).append(fn())
            for c in ctxcs:
                for name, fn in table[c.label]:
                    results.setdefault((c.label, name), []).append(fn())
        med = {k: statistics.median(w for w, _ in v) for k, v in results.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in results.items()}
        py, torch_s = med[("probe", PASS)], med[("probe", TORCH)]
        labels = [c.label for c in ctxcs]
        print(f"inputs: {inp['doc_tokens']:,}-token file, 50-file folder, {inp['small_tokens']:,}-token cartridge; "
              f"median of {args.runs} cold processes; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"probes: {PASS} {py:.3f} s (CPU {cpu[('probe', PASS)]:.3f} s), {TORCH} {torch_s:.3f} s "
              f"(CPU {cpu[('probe', TORCH)]:.3f} s)")
        print("wall s: whole process; /torch: wall over `import torch` in the same run; CPU s: the child's user+sys "
              "(barely moved by other jobs). For `ask`, the CPU column holds ask --stats' ttft_s instead: the first "
              "token after the model is loaded.\n")
        head = f"{'command':32}" + "".join(f"{lab + ' s':>13}{'/torch':>8}{'CPU s':>8}" for lab in labels)
        if len(labels) == 2:
            head += f"{'speed-up':>10}"
        print(head)
        for name, _ in table[labels[-1]]:
            row = f"{name:32}"
            for lab in labels:
                v = med[(lab, name)]
                row += f"{v:13.3f}{v / torch_s:8.2f}{cpu[(lab, name)]:8.3f}"
            if len(labels) == 2:
                row += f"{med[(labels[0], name)] / med[(labels[1], name)]:9.1f}x"
            print(row)
        goals = {"compress x4 10k tokens": 2.5, "same doc, new question": 1.5, "retrieve hybrid (50 files)": 1.5}
        print("\ngoals (wall seconds, this run; a busy machine inflates them, the /torch column does not move):")
        for name, goal in goals.items():
            v = med[("now", name)]
            print(f"  {name:30} {v:6.3f} s  goal {goal} s  {'meets' if v <= goal else 'MISSES'}")
        ttft = cpu[("now", "ask: first token")]
        print(f"  {'ask: first token (ttft_s)':30} {ttft:6.3f} s  goal 1.0 s  {'meets' if ttft <= 1 else 'MISSES'}"
              f"  (from process start: {med[('now', 'ask: first token')]:.3f} s, model load included)")
        code = ("import sys\nfrom ctxc.cli import app\nfrom typer.testing import CliRunner\n"
                f"CliRunner().invoke(app, ['count', {str(inp['doc'])!r}])\n"
                f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules) or 'none')")
        heavy = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=ctxcs[-1].env).stdout.strip()
        print(f"heavy modules imported by `ctxc count FILE`: {heavy}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
