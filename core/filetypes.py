"""What kind of text a file holds, from its name: one table for every part of ctxc that cares (chunking for the
index, the automatic choice of the `code` method, and later the packer's language fences).

- `kind_of(path)`: "markdown", "python", "code" (source code and structured text chunked by lines and blocks) or
  "prose".
- `is_source(path)`: a programming language's source file, which the `code` method compresses (a subset of "code":
  JSON, YAML, CSS or HTML are chunked like code but are not programs with function bodies).

>>> kind_of("a/README.md"), kind_of("main.go"), kind_of("config.yaml"), is_source("main.go"), is_source("x.yaml")
('markdown', 'code', 'code', True, False)
"""

from __future__ import annotations

from pathlib import Path

MARKDOWN_SUFFIXES = frozenset({".md", ".markdown", ".mdx", ".rst"})
PYTHON_SUFFIXES = frozenset({".py", ".pyi"})
# Programming languages: the `code` method picks these.
SOURCE_SUFFIXES = PYTHON_SUFFIXES | frozenset(
    ".js .jsx .ts .tsx .mjs .cjs .java .c .h .cc .cpp .cxx .hpp .cs .go .rs .rb .php .swift .kt .kts .scala .sh .bash "
    ".zsh .lua .m .r .pl .jl .dart .ex .exs .hs .ml .fs .groovy".split()
)
# Structured text that is chunked by lines and blocks like code, but is not source code.
STRUCTURED_SUFFIXES = frozenset(".sql .css .scss .less .html .xml .vue .svelte .yaml .yml .toml .json .gradle .tf "
                                ".proto .cmake .mk".split())
CODE_NAMES = frozenset({"makefile", "dockerfile", "cmakelists.txt", "jenkinsfile", "rakefile", "gemfile"})


def kind_of(path: str | None) -> str:
    """'markdown', 'python', 'code' or 'prose', from the file name."""
    if not path:
        return "prose"
    p = Path(path)
    suf = p.suffix.lower()
    if suf in MARKDOWN_SUFFIXES:
        return "markdown"
    if suf in PYTHON_SUFFIXES:
        return "python"
    if suf in SOURCE_SUFFIXES or suf in STRUCTURED_SUFFIXES or p.name.lower() in CODE_NAMES:
        return "code"
    return "prose"


def is_source(path: str | None) -> bool:
    return bool(path) and Path(path).suffix.lower() in SOURCE_SUFFIXES
