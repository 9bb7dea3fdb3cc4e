"""What compression keeps, measured on the user's own documents.

With questions: for every method and budget each document is compressed (with the question as the query, unless
`query_aware=False`), and for each question we record whether an answer string survived and the local LM's mean
NLL of the answer given compressed context + question, next to the NLL given the full context. Without questions:
coverage, the share of the document's numbers, named entities and content words that survive.
`write_report()` turns the result into report.md, results.json and PNG plots (retention and NLL vs budget).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..budget import Budget
from ..errors import InputError
from ..paths import OutputTree
from ..settings import Settings
from ..retrievers.bm25 import tokenize_words


@dataclass
class Question:
    question: str
    answers: list[str]
    id: str = ""
    doc: str | None = None  # which document (file name) it is about; None: every document
    context: str | None = None  # its own context, when the questions file carries one


@dataclass
class QARow:
    method: str
    budget: str
    doc: str
    qid: str
    question: str
    answer: str
    in_full: bool  # an answer string occurs in the full document
    kept: bool  # ... and in the compressed one
    nll: float | None
    nll_full: float | None
    input_tokens: int
    output_tokens: int
    seconds: float
    nll_windows: int = 1  # the full-document NLL is the best of this many windows (1: the whole document fit)


@dataclass
class CoverageRow:
    method: str
    budget: str
    doc: str
    numbers: float | None
    entities: float | None
    words: float
    input_tokens: int
    output_tokens: int
    seconds: float


@dataclass
class EvalResult:
    methods: list[str]
    budgets: list[str]
    tokenizer: str
    mode: str  # "qa" or "coverage"
    rows: list = field(default_factory=list)
    model: str | None = None
    settings: dict = field(default_factory=dict)

    def summary(self) -> list[dict]:
        """One row per (method, budget), in the order asked for."""
        out = []
        for m in self.methods:
            for b in self.budgets:
                rs = [r for r in self.rows if r.method == m and r.budget == b]
                if not rs:
                    continue
                d = {"method": m, "budget": b, "n": len(rs),
                     "ratio": _mean([r.input_tokens / max(1, r.output_tokens) for r in rs]),
                     "output_tokens": _mean([r.output_tokens for r in rs]),
                     "seconds": _mean([r.seconds for r in rs])}
                if self.mode == "qa":
                    ans = [r for r in rs if r.in_full]
                    d["answerable"] = len(ans)
                    d["retention"] = _mean([float(r.kept) for r in ans])
                    d["nll"] = _mean([r.nll for r in rs if r.nll is not None])
                    d["nll_full"] = _mean([r.nll_full for r in rs if r.nll_full is not None])
                    both = d["nll"] is not None and d["nll_full"] is not None
                    d["nll_delta"] = (d["nll"] - d["nll_full"]) if both else None
                else:
                    for k in ("numbers", "entities", "words"):
                        d[k] = _mean([getattr(r, k) for r in rs if getattr(r, k) is not None])
                out.append(d)
        return out

    def to_json(self) -> dict:
        return {"mode": self.mode, "methods": self.methods, "budgets": self.budgets, "tokenizer": self.tokenizer,
                "model": self.model, "settings": self.settings, "summary": self.summary(),
                "rows": [asdict(r) for r in self.rows]}


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


# ---------------------------------------------------------------------------------------------------------------
# Inputs


QUESTIONS_HINT = "pass a JSON-lines file of questions (one object per line: question, answers)"


def load_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """JSONL, one object per line: `question`, `answers` (list) or `answer` (string); optional `id`, `doc` (file
    name the question is about), `context` or `contexts` (its own context, used when no document path is given)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file", QUESTIONS_HINT)
    if p.is_dir():
        raise InputError(f"{p} is a directory", QUESTIONS_HINT)
    from ..textio import read_text

    out: list[Question] = []
    for n, line in enumerate(read_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise InputError(f"{p} line {n} is not valid JSON ({err.msg})", "one JSON object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not obj["question"].strip():
            raise InputError(f"{p} line {n} has no \"question\" string", 'e.g. {"question": "...", "answers": ["..."]}')
        answers = obj.get("answers", obj.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not [a for a in answers if isinstance(a, str) and a.strip()]:
            raise InputError(f"{p} line {n} has no \"answers\" (a list of strings) or \"answer\"",
                             'e.g. {"question": "...", "answers": ["..."]}')
        ctx = obj.get("context")
        if ctx is None and isinstance(obj.get("contexts"), list):
            ctx = "\n\n".join(str(c) for c in obj["contexts"])
        out.append(Question(obj["question"].strip(), [a for a in answers if isinstance(a, str) and a.strip()],
                            str(obj.get("id", n)), obj.get("doc"), ctx if isinstance(ctx, str) else None))
        if limit and len(out) >= limit:
            break
    if not out:
        raise InputError(f"{p} has no questions", 'one JSON object per line: {"question": "...", "answers": ["..."]}')
    return out


def load_documents(path: str | Path, encoding: str | None = None) -> list[tuple[str, str]]:
    """(name, text) for a file, or for every text file under a directory (binary files are skipped)."""
    from ..textio import read_text

    from ..walk import walk

    p = Path(path)
    found = walk([p])
    if found.files and found.files[0].explicit:
        return [(p.name, read_text(p, encoding))]
    docs = []
    for f in found.files:
        try:
            docs.append((f.rel, read_text(f.path, encoding)))
        except InputError:
            continue
    if not docs:
        raise InputError(f"{p} holds no text files", "pass a text file or a directory of text files")
    return docs


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def _norm_text(s: str) -> str:
    return " ".join(re.sub(r"[^\w%$.,'-]+", " ", s.lower()).split())


def answer_found(answers: list[str], text: str) -> bool:
    """An answer string occurs in `text` (case, punctuation and spacing ignored).

    >>> answer_found(["May 18, 2018"], "released on may 18,  2018.")
    True
    """
    t = f" {_norm_text(text)} "
    for a in answers:
        a = _norm_text(a).strip(" .,")
        if a and re.search(rf"(?<!\w){re.escape(a)}(?!\w)", t):
            return True
    return False


_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,:/]\d+)*%?")
_ENTITY = re.compile(r"\b[A-Z][\w'’&-]*(?:\s+(?:of|de|la|the|and|for|von|van|&)?\s*[A-Z][\w'’&-]*)*")
_COMMON = frozenset("""The A An In On At Of And But Or For To From By With As It Its This That These Those He She They
We I You If When While After Before Then There Here What Which Who Why How Some All No Not Each Every Any One Two Mr Mrs
Ms Dr So Yet Also However Thus""".split())


def numbers_in(text: str) -> set[str]:
    return {m.group(0).rstrip(".,") for m in _NUMBER.finditer(text)}


def entities_in(text: str) -> set[str]:
    """Capitalised names (single words that only ever appear at sentence starts are not counted).

    >>> sorted(entities_in("The Federal Emergency Management Agency met in Denver. Then it left."))
    ['Denver', 'Federal Emergency Management Agency']
    """
    out = set()
    for m in _ENTITY.finditer(text):
        e = m.group(0).strip()
        words = e.split()
        while len(words) > 1 and words[0] in _COMMON:  # "The Federal ..." -> "Federal ..."
            words = words[1:]
        e = " ".join(words)
        if " " not in e:
            if e in _COMMON or len(e) < 2:
                continue
            before = text[max(0, m.start() - 3) : m.start()]
            if not before.strip() or re.search(r"[.!?:\"“]\s*$", before):
                continue  # sentence-initial single word: capitalised by position, not a name
        out.add(e)
    return out


def coverage(original: str, compressed: str) -> dict:
    """Share of the original's numbers, named entities and content words that are still in `compressed`."""
    nums, ents = numbers_in(original), entities_in(original)
    c_nums = numbers_in(compressed)
    low = compressed.lower()
    words = set(tokenize_words(original))
    c_words = set(tokenize_words(compressed))
    return {
        "numbers": (len(nums & c_nums) / len(nums)) if nums else None,
        "entities": (sum(1 for e in ents if e.lower() in low) / len(ents)) if ents else None,
        "words": len(words & c_words) / max(1, len(words)),
    }


class AnswerScorer:
    """Mean NLL (nats/token) of an answer given a context and a question, under the local instruct LM (chat
    template), through `ctxc.lm.target_nll`.

    A context that does not fit `window` model tokens (default: the model's whole context) is scored window by
    window (half-overlapping, covering all of it) and the best window counts: the answer's NLL when the model sees the
    part of the document that best supports it. The row records how many windows that took, so a report never
    passes off a truncated baseline as the full document."""

    def __init__(self, model: str | None = None, window: int | None = None, settings: Settings | None = None):
        from ..lm import load_model

        self.settings = settings or Settings.current()
        self.lm = load_model(model, settings=self.settings)
        self.window = min(window or self.lm.max_context, self.lm.max_context)

    def _prompt(self, context: str, question: str) -> str:
        msgs = [{"role": "user", "content": f"{context}\n\nAnswer the question briefly.\nQuestion: {question}"}]
        return self.lm.tokenizer.hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def nll(self, context: str, question: str, answer: str) -> tuple[float, int]:
        """(mean answer NLL, number of windows scored: 1 when the whole context fit)."""
        from ..lm import target_nll

        tok = self.lm.tokenizer
        a_ids = tok.encode(answer.strip())[:64]
        # a margin of 8 tokens: a window decoded and re-encoded inside the template can merge differently
        room = max(16, self.window - len(tok.encode(self._prompt("", question))) - len(a_ids) - 8)
        c_ids = tok.encode(context)
        if len(c_ids) <= room:
            pieces = [context]
        else:
            starts = list(range(0, len(c_ids) - room, max(1, room // 2))) + [len(c_ids) - room]
            pieces = [tok.decode(c_ids[s:s + room]) for s in starts]
        prompts = [tok.encode(self._prompt(p, question))[: self.window - len(a_ids)] for p in pieces]
        nll = target_nll(self.lm, prompts, a_ids, threads=self.settings.threads, kernels=self.settings.kernels)
        return float(nll.min()), len(pieces)


# ---------------------------------------------------------------------------------------------------------------
# Running


def _items(docs: list[tuple[str, str]] | None,
           questions: list[Question] | None) -> list[tuple[str, str, list[Question]]]:
    """(doc name, text, its questions) triples."""
    if questions is None:
        return [(n, t, []) for n, t in (docs or [])]
    if not docs:
        out = []
        for q in questions:
            if not q.context:
                raise InputError(f"question {q.id!r} has no context and no document was given",
                                 "pass a document PATH, or give each question a \"context\"")
            out.append((f"q{q.id}", q.context, [q]))
        return out
    names = {n for n, _ in docs} | {Path(n).name for n, _ in docs}
    for q in questions:
        if q.doc and q.doc not in names:
            raise InputError(f"question {q.id!r} is about {q.doc!r}, which is not among the documents",
                             "its \"doc\" must be a file name under PATH")
    return [(n, t, [q for q in questions if not q.doc or q.doc in (n, Path(n).name)]) for n, t in docs]


def run_eval(
    docs: list[tuple[str, str]] | None,
    questions: list[Question] | None,
    methods: list[str],
    budgets: list[str],
    tokenizer: str | None = None,
    nll: bool = True,
    query_aware: bool = True,
    model: str | None = None,
    nll_window: int | None = None,
    progress=None,
    settings: Settings | None = None,
    **options,
) -> EvalResult:
    """Compress every document with every method at every budget and measure what survived (see module doc).
    `progress(done, total, what)` hears about each step."""
    from ..api import compress, get_tokenizer
    from ..compressors.registry import get_compressor

    settings = settings or Settings.current()
    if not methods:
        raise InputError("no methods to evaluate", "pass e.g. --methods extractive,truncate")
    if not budgets:
        raise InputError("no budgets to evaluate", "pass e.g. --budgets 4x,10x,2k")
    for m in methods:
        get_compressor(m, settings, **options)  # unknown methods or options fail before any work is done
    for b in budgets:
        Budget.parse(b)
    tok = get_tokenizer(tokenizer, settings)
    items = _items(docs, questions)
    mode = "qa" if questions is not None else "coverage"
    scorer = AnswerScorer(model, nll_window, settings) if (nll and mode == "qa") else None
    res = EvalResult(list(methods), list(budgets), tok.name, mode,
                     model=str(scorer.lm.source) if scorer else None,
                     settings={"query_aware": query_aware, "nll": bool(scorer),
                               "nll_window": scorer.window if scorer else None})
    per_doc = [max(1, len(qs)) if (mode == "qa" and query_aware) else 1 for _, _, qs in items]
    jobs = sum(per_doc) * len(methods) * len(budgets)
    done = 0

    def advance(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, jobs, what)

    full_nll: dict[tuple[str, str], tuple[float, int]] = {}
    for name, text, qs in items:
        n_in = tok.count(text)
        if mode == "qa" and not qs:
            continue
        for m in methods:
            for b in budgets:
                if mode == "coverage":
                    r = compress(text, b, method=m, tokenizer=tok, settings=settings, **options)
                    cov = coverage(text, r.text)
                    res.rows.append(CoverageRow(m, b, name, cov["numbers"], cov["entities"], cov["words"],
                                                n_in, r.output_tokens, r.seconds))
                    advance(f"{m} @ {b}: {name}")
                    continue
                shared = None if query_aware else \
                    compress(text, b, method=m, tokenizer=tok, settings=settings, **options)
                for q in qs:
                    r = shared or compress(text, b, query=q.question, method=m, tokenizer=tok, settings=settings,
                                           **options)
                    answer = q.answers[0]
                    row = QARow(m, b, name, q.id, q.question, answer, answer_found(q.answers, text),
                                answer_found(q.answers, r.text), None, None, n_in, r.output_tokens, r.seconds)
                    if scorer:
                        key = (name, q.id)
                        if key not in full_nll:
                            full_nll[key] = scorer.nll(text, q.question, answer)
                        row.nll_full, row.nll_windows = full_nll[key]
                        row.nll, _ = scorer.nll(r.text, q.question, answer)
                    res.rows.append(row)
                    if query_aware:
                        advance(f"{m} @ {b}: {name}")
                if not query_aware:
                    advance(f"{m} @ {b}: {name}")
    return res



# ---------------------------------------------------------------------------------------------------------------
# Report


def _fmt(v, pct: bool = False, nd: int = 2) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.0f}%" if pct else f"{v:.{nd}f}"


def summary_rows(res: EvalResult) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the summary table (shared by the terminal and report.md)."""
    if res.mode == "qa":
        head = ["method", "budget", "ratio", "tokens", "answer kept", "NLL", "NLL full", "ΔNLL", "s/doc"]
        rows = [[d["method"], d["budget"], f"{d['ratio']:.1f}x", f"{d['output_tokens']:.0f}",
                 f"{_fmt(d['retention'], True)} ({d['answerable']})", _fmt(d["nll"]), _fmt(d["nll_full"]),
                 ("+" if (d["nll_delta"] or 0) >= 0 else "") + _fmt(d["nll_delta"]), f"{d['seconds']:.2f}"]
                for d in res.summary()]
        if not res.settings.get("nll"):  # not measured: no columns of dashes
            keep = [i for i, h in enumerate(head) if "NLL" not in h]
            head, rows = [head[i] for i in keep], [[r[i] for i in keep] for r in rows]
    else:
        head = ["method", "budget", "ratio", "tokens", "numbers", "entities", "words", "s/doc"]
        rows = [[d["method"], d["budget"], f"{d['ratio']:.1f}x", f"{d['output_tokens']:.0f}", _fmt(d["numbers"], True),
                 _fmt(d["entities"], True), _fmt(d["words"], True), f"{d['seconds']:.2f}"] for d in res.summary()]
    return head, rows


def plot(res: EvalResult, out: OutputTree) -> list[str]:
    """PNG plots: one line per method against the compression ratio it achieved (log scale, so 1.4x and 10x are
    where they belong), each point labelled with its budget; distinct markers and dashes keep overlapping methods
    visible, and the title gives n. No NLL plot when the NLL was not measured."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = res.summary()
    if res.mode == "qa":
        panels = [("retention", "answer kept", True, "retention.png")]
        if res.settings.get("nll"):
            panels.append(("nll", "answer NLL (nats/token)", False, "nll.png"))
    else:
        panels = [("numbers", "numbers kept", True, "coverage_numbers.png"),
                  ("entities", "named entities kept", True, "coverage_entities.png"),
                  ("words", "content words kept", True, "coverage_words.png")]
    n_docs = len({r.doc for r in res.rows})
    n_q = len({(r.doc, r.qid) for r in res.rows}) if res.mode == "qa" else 0
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--"), ("X", "-."), ("*", ":")]
    files = []
    for key, label, pct, fname in panels:
        fig, ax = plt.subplots(figsize=(6.8, 4.2), dpi=110)
        drew = False
        for i, m in enumerate(res.methods):
            pts = []
            for b in res.budgets:
                d = next((s for s in summ if s["method"] == m and s["budget"] == b), None)
                v = d.get(key) if d else None
                if v is not None and d.get("ratio"):
                    pts.append((d["ratio"], 100 * v if pct else v, b, d.get("answerable", d["n"])))
            if not pts:
                continue
            pts.sort()
            marker, dash = styles[i % len(styles)]
            n = pts[0][3] if key == "retention" else None
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=dash, alpha=0.85,
                    markersize=7 - (i % 3), label=m + (f" (n={n})" if n is not None else ""))
            for x, y, b, _ in pts:
                ax.annotate(b, (x, y), textcoords="offset points", xytext=(4, 4 + 7 * (i % 3)), fontsize=7,
                            alpha=0.8)
            drew = True
        if key == "nll":
            full = _mean([s.get("nll_full") for s in summ])
            if full is not None:
                ax.axhline(full, color="gray", linestyle="--", label="full document")
                drew = True
        if key == "retention":
            ax.set_ylim(-3, 103)
        ax.set_xscale("log")
        # "4x" at round ratios instead of matplotlib's 4×10^0 on major and minor ticks
        from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

        lo, hi = ax.get_xlim()
        ticks = [t for t in (1, 1.5, 2, 3, 4, 6, 10, 15, 20, 30, 50, 100, 200, 500, 1000) if lo <= t <= hi]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:g}x")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("compression ratio achieved (input tokens / output tokens, log scale)")
        ax.set_ylabel(label + (" (%)" if pct else ""))
        ax.grid(alpha=0.3, which="both")
        if drew:
            ax.legend(fontsize=8)
        what = {"retention": "Answer still in the compressed text",
                "nll": "Answer NLL given compressed context + question (lower is better)"}.get(key, label)
        ax.set_title(f"{what}\n{n_docs} document(s)" + (f", {n_q} question(s)" if n_q else ""), fontsize=10)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        out.write(fname, buf.getvalue())
        files.append(fname)
    return files


REPORT_MARK = ".ctxc-eval-report"
REPORT_FILES = ("report.md", "results.json", "retention.png", "nll.png", "coverage_numbers.png",
                "coverage_entities.png", "coverage_words.png")


def check_report_dir(out_dir: str | Path, inputs: list[str | Path] = ()) -> Path:
    """The report folder, checked before any work: a new or empty folder, or one an earlier `ctxc eval` wrote (it
    holds its mark file and only report files). A folder holding anything else is refused, so a report never
    replaces a user's file, and no report file may be one of the inputs."""
    out = Path(out_dir)
    if out.is_symlink():
        raise InputError(f"report folder {out} is a symbolic link", "pass -o the folder itself")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder", "pass -o a new folder for the report")
    if out.is_dir():
        present = {p.name for p in out.iterdir()}
        foreign = sorted(present - {REPORT_MARK, *REPORT_FILES})
        if present and (REPORT_MARK not in present or foreign):
            shown = ", ".join(foreign[:3]) or ", ".join(sorted(present)[:3])
            raise InputError(f"report folder {out} holds files ctxc eval did not write ({shown})",
                             "pass -o a new or empty folder, e.g. -o report/")
        targets = {(out / f).resolve() for f in REPORT_FILES}
        for i in inputs:
            if Path(i).resolve() in targets:
                raise InputError(f"the report would overwrite the input {i}", "pass -o another folder")
    return out


def write_report(res: EvalResult, out_dir: str | Path, inputs: list[str | Path] = ()) -> list[Path]:
    """report.md + results.json + PNG plots under `out_dir` (see `check_report_dir`). Every file is written
    atomically and never through a link. Returns the files written."""
    out = check_report_dir(out_dir, inputs)
    tree = OutputTree(out)
    tree.write(REPORT_MARK, b"written by ctxc eval; the folder may be rewritten by the next run\n")
    files: list[Path] = []
    plot_note = ""
    try:
        files += [out / f for f in plot(res, tree)]
    except ImportError:
        plot_note = "\n> Plots were skipped: matplotlib is not installed (`pip install 'ctxc[eval]'`).\n"
    head, rows = summary_rows(res)
    md = ["# ctxc eval report", ""]
    n_docs = len({r.doc for r in res.rows})
    md.append(f"{n_docs} document(s), methods {', '.join(res.methods)}, budgets {', '.join(res.budgets)}, "
              f"tokenizer {res.tokenizer}." + (f" Scoring model: `{Path(res.model).name}`." if res.model else ""))
    md.append("")
    md.append("| " + " | ".join(head) + " |")
    md.append("|" + "|".join("---" for _ in head) + "|")
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md.append("")
    if res.mode == "qa":
        md += ["**answer kept**: share of the questions whose answer occurs in the full document that still find it "
               "(verbatim, case-insensitive) in the compressed one; the count of such questions in brackets. "
               "Abstractive methods paraphrase, so this undercounts what they keep.", ""]
        if res.settings.get("nll"):
            md += ["**NLL**: mean negative log-likelihood per answer token given compressed context + question "
                   "(**NLL full**: given the full document); **ΔNLL** > 0 means the compressed context makes the "
                   "answer less likely.", ""]
            windowed = [r for r in res.rows if r.nll_windows > 1]
            w = res.settings.get("nll_window")
            if windowed:
                docs = len({r.doc for r in windowed})
                md += [f"> NLL full: {docs} document(s) exceed the scoring window of {w:,} model tokens; for those, "
                       f"NLL full is the best of {max(r.nll_windows for r in windowed)} half-overlapping windows "
                       "that together cover the whole document (the answer given the part that best supports it).",
                       ""]
            else:
                md += [f"> NLL full is the answer given the whole document (every document fit the scoring window "
                       f"of {w:,} model tokens).", ""]
            md += ["![answer retention](retention.png)", "", "![answer NLL](nll.png)", ""] if not plot_note else []
        else:
            md += ["![answer retention](retention.png)", ""] if not plot_note else []
    else:
        md += ["Coverage without questions: share of the document's distinct numbers, capitalised names and content "
               "words that are still in the compressed text.", ""]
        md += [f"![{k}](coverage_{k}.png)" for k in ("numbers", "entities", "words")] if not plot_note else []
        md.append("")
    md.append(plot_note)
    if res.mode == "qa":
        nll = bool(res.settings.get("nll"))
        md += ["## Per question", "", "| method | budget | doc | question | answer | kept |" +
               (" NLL | NLL full |" if nll else ""), "|---|---|---|---|---|---|" + ("---|---|" if nll else "")]
        for r in res.rows[:500]:
            q = r.question.replace("|", "\\|")[:80]
            a = r.answer.replace("|", "\\|")[:40]
            md.append(f"| {r.method} | {r.budget} | {r.doc} | {q} | {a} | "
                      f"{'yes' if r.kept else ('no' if r.in_full else 'n/a')} |" +
                      (f" {_fmt(r.nll)} | {_fmt(r.nll_full)} |" if nll else ""))
        if len(res.rows) > 500:
            md.append(f"\n({len(res.rows) - 500} more rows in results.json)")
    tree.write_text("report.md", "\n".join(md) + "\n")
    tree.write_text("results.json", json.dumps(res.to_json(), indent=1, ensure_ascii=False))
    return [out / "report.md", out / "results.json"] + files


def parse_list(spec: str | None, what: str) -> list[str]:
    items = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if not items:
        raise InputError(f"no {what} given", f"pass a comma-separated list, e.g. --{what} " +
                         ("extractive,truncate" if what == "methods" else "4x,10x,2k"))
    return items


__all__ = ["Question", "QARow", "CoverageRow", "EvalResult", "load_questions", "load_documents", "answer_found",
           "coverage", "entities_in", "numbers_in", "AnswerScorer", "run_eval", "write_report", "summary_rows",
           "plot", "parse_list"]
