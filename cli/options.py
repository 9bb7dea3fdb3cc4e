"""Every shared command-line option, defined once (pip's `cmdoptions` pattern): one spelling, one short flag, one help
text and one metavar for the same thing on every command.

    -b/--budget  -q/--query  -m/--method  -t/--tokenizer  -f/--format  -o/--output  -i/--include  -x/--exclude
    -0/--null  -O/--option  --encoding  --progress/--no-progress  --stats  --fail-if-over  --embedder
"""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer


class Format(str, Enum):
    """`text` for people; `json`: one document (an object, or a list when several inputs were named); `jsonl`: one
    object per line, one per result."""

    text = "text"
    json = "json"
    jsonl = "jsonl"


Budget = Annotated[Optional[str], typer.Option(
    "--budget", "-b", metavar="BUDGET",
    help="Token budget: 4k, 4096, 1.5k, 25% (of the input) or x4 (compress 4x). Default: the budget setting, x4.")]
Query = Annotated[Optional[str], typer.Option(
    "--query", "-q", metavar="QUESTION", help="The question the output must answer (what to keep).")]
Method = Annotated[Optional[str], typer.Option(
    "--method", "-m", metavar="METHOD",
    help="Method or pipeline (`ctxc methods`), e.g. extractive or extractive+tokens. Default: the method setting, "
         "else extractive, or code for source files.")]
Tokenizer = Annotated[Optional[str], typer.Option(
    "--tokenizer", "-t", metavar="TOKENIZER",
    help="What budgets are counted in: cl100k (default), o200k, a model name (gpt-4o, gpt-4, ...), "
         "model (the local LM's) or hf:PATH.")]
OutputFormat = Annotated[Format, typer.Option(
    "--format", "-f", help="text, json (one document) or jsonl (one object per line).")]
Null = Annotated[bool, typer.Option(
    "--null", "-0", help="Read NUL-separated paths from stdin (find -print0, git ls-files -z).")]
MethodOption = Annotated[Optional[list[str]], typer.Option(
    "--option", "-O", metavar="KEY=VALUE",
    help="A method option (repeatable), checked against the method's options (`ctxc methods`).")]
Encoding = Annotated[Optional[str], typer.Option(
    "--encoding", metavar="ENCODING", help="Input encoding (default utf-8), e.g. latin-1.")]
Include = Annotated[Optional[list[str]], typer.Option(
    "--include", "-i", metavar="PATTERN",
    help="Only files matching this gitignore-style pattern (repeatable): '*.md', 'docs/', 'src/*.py'.")]
Exclude = Annotated[Optional[list[str]], typer.Option(
    "--exclude", "-x", metavar="PATTERN",
    help="Skip files and folders matching this gitignore-style pattern (repeatable): 'tests', '*.log'.")]
Progress = Annotated[bool, typer.Option(
    "--progress/--no-progress", help="Progress on stderr while it works (only when stderr is a terminal).")]
Stats = Annotated[bool, typer.Option("--stats", help="Print one JSON line of figures per result to stderr.")]
Embedder = Annotated[Optional[str], typer.Option(
    "--embedder", metavar="DIR", help="sentence-transformers model folder (default: the bundled all-MiniLM-L6-v2).")]
Model = Annotated[Optional[str], typer.Option(
    "--model", metavar="PATH", help="Local LM: HF directory or .gguf file (same as the global --model).")]
