"""Code-aware compression: keep the skeleton of a source file (imports, class headers, signatures, docstrings) and
the function bodies that matter for the query whole; other bodies become a placeholder so the output still parses.

Python is parsed with `ast` (exact statement spans); JavaScript/TypeScript, Go, Rust, Java and C/C++ with tree-sitter
(tree-sitter-language-pack), and their output parses again with the same grammar; other languages are split by brace
or indentation structure.
Bodies are ranked by identifier-aware BM25 fused with dense similarity and, for the best few, the local LM's
conditional perplexity of the query given the body (LongCodeZip's approximated mutual information).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..fit import Fitter, head
from ..retrievers.bm25 import BM25
from ..tokenizers import Tokenizer
from .base import Compressed, Compressor

# Tiers: lower is kept first. Named functions (the query says their name) come before everything else.
T_NAMED, T_IMPORT, T_HEADER, T_DOC, T_STMT, T_BODY, T_COMMENT = range(7)
_SMALL_STMT = 64  # module-level statements up to this many tokens count as skeleton; bigger ones compete as bodies

_BRACE_LANGS = {".js", ".jsx", ".ts", ".tsx", ".java", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".go", ".rs",
                ".php", ".swift", ".kt", ".scala", ".sh", ".r", ".m"}
_LINE_COMMENT = {".rb": "#", ".sh": "#", ".r": "#", ".lua": "--", ".m": "%", ".py": "#", ".pyi": "#"}
_CONTROL = re.compile(r"^\s*(?:}\s*)?(?:if|else|for|foreach|while|do|switch|case|try|catch|finally|return|with|"
                      r"elif|except|loop|match|unless|until|begin|when|select|synchronized|defer|go)\b")
_CONTAINER = re.compile(r"\b(?:class|struct|interface|namespace|impl|trait|module|object|enum|extension|protocol|"
                        r"union|extern\s+\"C\")\b")
_IMPORT_LINE = re.compile(r"^\s*(?:#\s*include|import\b|from\s+\S+\s+import\b|using\b|use\b|package\b|require\b|"
                          r"#\s*import|@import|library\b|source\b)")


@dataclass
class Item:
    """A piece of the skeleton or a body that can be kept or dropped. `needs` must be kept for it to be kept."""

    key: str
    tier: int
    cost: int = 0
    needs: list[str] = field(default_factory=list)
    rel: float = 0.0
    order: int = 0


class Has:
    """Shown when item `key` is kept."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, sel: set[str]) -> bool:
        return self.key in sel


class Placeholder:
    """Shown when the signature `key` is kept but none of `instead` (the body, or a class's members) is."""

    def __init__(self, key: str, instead: tuple[str, ...]):
        self.key, self.instead = key, instead

    def __call__(self, sel: set[str]) -> bool:
        return self.key in sel and not any(x in sel for x in self.instead)


@dataclass
class Piece:
    """Output text in document order: verbatim `text[start:end]` or an inserted `literal`, shown when `show(sel)`.
    `show.key` is the item the piece's tokens are charged to; blank lines (`show=None`) are separators."""

    start: int
    end: int
    show: "Has | Placeholder | None"
    literal: str | None = None
    blank: bool = False


@dataclass
class CodeUnit:
    """A function/class/statement to rank: its display name, full source text and the items its relevance feeds."""

    name: str
    qualname: str
    text: str
    items: list[str]
    kind: str


class _Plan:
    def __init__(self):
        self.items: dict[str, Item] = {}
        self.pieces: list[Piece] = []
        self.units: list[CodeUnit] = []

    def item(self, key: str, tier: int, needs: list[str] | None = None) -> str:
        self.items[key] = Item(key, tier, needs=list(needs or []), order=len(self.items))
        return key


def _line_starts(text: str) -> list[int]:
    starts = [0]
    for m in re.finditer("\n", text):
        starts.append(m.end())
    if starts[-1] != len(text):
        starts.append(len(text))
    return starts


def _has(key: str) -> Has:
    return Has(key)


# ---------------------------------------------------------------------------------------------------------------
# Python: statement spans from ast


class _PyPlanner:
    def __init__(self, text: str, tree: ast.Module):
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.ls = _line_starts(text)
        self.plan = _Plan()
        self.tree = tree

    def off(self, line: int) -> int:
        """Char offset of the start of 1-based `line` (len(text) past the end)."""
        return self.ls[line - 1] if line - 1 < len(self.ls) else len(self.text)

    def indent_of(self, line: int) -> str:
        s = self.lines[line - 1]
        return s[: len(s) - len(s.lstrip())]

    def shares_line(self, first) -> bool:
        """True when a body's first statement starts on a line that holds header text (`def f(): return 1`,
        `def f(a,\n      b): return a`): such a def has no body lines of its own and is kept or dropped whole."""
        line = _first_line(first)
        col = first.col_offset
        if line != first.lineno:  # decorated: the `@` sits one column before the decorator expression
            col = min(d.col_offset for d in first.decorator_list if d.lineno == line) - 1
        prefix = self.lines[line - 1].encode("utf-8")[: max(0, col)]  # ast columns are UTF-8 byte offsets
        return bool(prefix.strip())

    def span(self, a: int, b: int, show) -> None:
        """Lines a..b (1-based, inclusive)."""
        if b >= a:
            self.plan.pieces.append(Piece(self.off(a), self.off(b + 1), show))

    def gap(self, a: int, b: int, comment_show) -> None:
        """Lines between statements: blank lines are separators, comment lines go with the next statement."""
        for ln in range(a, b + 1):
            if ln - 1 >= len(self.lines):
                break
            if self.lines[ln - 1].strip():
                self.plan.pieces.append(Piece(self.off(ln), self.off(ln + 1), comment_show))
            else:
                self.plan.pieces.append(Piece(self.off(ln), self.off(ln + 1), None, blank=True))

    def build(self) -> _Plan:
        body = self.tree.body
        doc_key = None
        if body and _is_docstring(body[0]):
            d = body[0]
            doc_key = self.plan.item("module.doc", T_DOC)
            self.gap(1, d.lineno - 1, _has(doc_key))
            self.span(d.lineno, d.end_lineno, _has(doc_key))
            body = body[1:]
            first = d.end_lineno + 1
        else:
            first = 1
        self.container(body, first, [], "", len(self.lines))
        return self.plan

    def container(self, stmts: list, first_line: int, needs: list[str], prefix: str, last_line: int) -> list[str]:
        """Plan `stmts` (a module or class body); returns the keys whose presence means 'something is shown'."""
        shown_keys = []
        pos = first_line
        for st in stmts:
            start = _first_line(st)
            if start < pos:  # `a = 1; b = 2`: the second statement is already part of the first one's lines
                continue
            key = self.stmt(st, start, needs, prefix, pos)
            shown_keys.append(key)
            pos = st.end_lineno + 1
        # Trailing comments of a container are cheap context at best: they go with the last statement.
        if stmts and pos <= last_line:
            tail = shown_keys[-1] + ".com"
            if tail not in self.plan.items:
                self.plan.item(tail, T_COMMENT, [shown_keys[-1]])
            self.gap(pos, last_line, _has(tail))
        return shown_keys

    def stmt(self, st, start: int, needs: list[str], prefix: str, gap_from: int) -> str:
        p = self.plan
        is_def = isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        name = getattr(st, "name", None) if is_def else None
        qual = f"{prefix}{name}" if name else f"{prefix}L{start}"
        key = f"{qual}@{start}"
        one_line = is_def and self.shares_line(st.body[0])
        kind = "class" if isinstance(st, ast.ClassDef) else ("def" if is_def else "stmt")
        if isinstance(st, (ast.Import, ast.ImportFrom)):
            tier = T_IMPORT
        elif is_def:
            tier = T_HEADER
        else:
            tier = T_STMT
        sig = p.item(key, tier, needs)
        com = p.item(key + ".com", T_COMMENT, [sig])
        self.gap(gap_from, start - 1, _has(com))
        if not is_def or one_line:
            self.span(start, st.end_lineno, _has(sig))
            p.units.append(CodeUnit(name or "", qual, _src(self.text, self.off(start), self.off(st.end_lineno + 1)),
                                [sig], kind))
            return sig
        body = st.body
        doc = None
        hdr_end = _first_line(body[0]) - 1
        # Comment and blank lines between the `:` and the first statement belong to the body, not the signature.
        while hdr_end > start and (not self.lines[hdr_end - 1].strip()
                                   or self.lines[hdr_end - 1].lstrip().startswith("#")):
            hdr_end -= 1
        if _is_docstring(body[0]):
            doc = p.item(key + ".doc", T_DOC, [sig])
            rest = body[1:]
        else:
            rest = body
        self.span(start, hdr_end, _has(sig))
        if doc:
            self.span(hdr_end + 1, body[0].end_lineno, _has(doc))
        ind = self.indent_of(body[0].lineno)
        unit_items = [sig] + ([doc] if doc else [])
        if kind == "class":
            after_doc = body[0].end_lineno + 1 if doc else hdr_end + 1
            inner = list(rest)
            # The placeholder must come right after the header/docstring: later members may be shown.
            placeholder_at = len(p.pieces)
            child_keys = self.container(inner, after_doc, [sig], f"{qual}.", st.end_lineno)
            keys = tuple(child_keys) + ((doc,) if doc else ())
            p.pieces.insert(placeholder_at, Piece(0, 0, Placeholder(sig, keys), literal=f"{ind}...\n"))
            p.units.append(CodeUnit(name, qual, _src(self.text, self.off(start), self.off(st.end_lineno + 1)),
                                unit_items, kind))
            return sig
        if rest:
            full = p.item(key + ".body", T_BODY, [sig] + ([doc] if doc else []))
            p.pieces.append(Piece(0, 0, Placeholder(sig, (full,)), literal=f"{ind}...\n"))
            self.span(hdr_end + 1 if not doc else body[0].end_lineno + 1, st.end_lineno, _has(full))
            unit_items.append(full)
        elif doc:  # the docstring is the whole body: without it, `...` keeps the def valid
            p.pieces.append(Piece(0, 0, Placeholder(sig, (doc,)), literal=f"{ind}...\n"))
        p.units.append(CodeUnit(name, qual, _src(self.text, self.off(start), self.off(st.end_lineno + 1)),
                            unit_items, kind))
        return sig


def _src(text: str, a: int, b: int) -> str:
    return text[a:b]


def _is_docstring(st) -> bool:
    return isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant) and isinstance(st.value.value, str)


def _first_line(st) -> int:
    """First line of a statement, decorators included."""
    return min([st.lineno] + [d.lineno for d in getattr(st, "decorator_list", [])])


# ---------------------------------------------------------------------------------------------------------------
# Other languages: blocks from braces (C family) or indentation


def _strip_code_line(line: str, brace: bool) -> str:
    """A line without string literals and trailing comments (rough, but enough to find block structure)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', line)
    if brace:
        s = re.sub(r"//.*$|/\*.*?\*/", "", s)
    s = re.sub(r"(?<![$\w])#(?!include|import|!).*$", "", s) if not brace else s
    return s


class _GenericPlanner:
    """Blocks are a header line plus the lines it opens: `{ ... }` for brace languages, deeper indentation otherwise.
    Function-like blocks get a body item; container blocks (class, struct, impl, namespace, ...) are recursed into."""

    def __init__(self, text: str, suffix: str):
        self.text = text
        self.lines = text.splitlines(keepends=True)
        self.ls = _line_starts(text)
        # Unknown suffixes: brace structure for C-like text (braces, semicolons, block comments), else indentation.
        n_lines = text.count("\n") + 1
        c_like = text.count("{") + text.count(";") + text.count("/*") > 0.05 * n_lines or "#include" in text
        self.brace = suffix in _BRACE_LANGS or (suffix not in _LINE_COMMENT and c_like)
        marker = _LINE_COMMENT.get(suffix, "//" if self.brace else "#")
        self.placeholder = "/* ... */" if self.brace and suffix not in (".sh", ".r", ".m") else f"{marker} ..."
        self.plan = _Plan()
        self.clean = [_strip_code_line(l.rstrip("\n"), self.brace) for l in self.lines]
        self.close = self._match_blocks()
        self.comment_end = self._block_comments() if self.brace else {}

    def off(self, i: int) -> int:  # 0-based line index -> char offset
        return self.ls[i] if i < len(self.ls) else len(self.text)

    def _block_comments(self) -> dict[int, int]:
        """first line -> last line of each `/* ... */` comment that starts a line and spans several: kept or dropped
        as one piece, so an output never holds half a comment."""
        out, i, n = {}, 0, len(self.lines)
        while i < n:
            s = self.lines[i].lstrip()
            if s.startswith("/*") and "*/" not in s[2:]:
                j = i + 1
                while j < n and "*/" not in self.lines[j]:
                    j += 1
                if j < n:
                    out[i] = j
                i = j + 1
                continue
            i += 1
        return out

    def _match_blocks(self) -> dict[int, int]:
        """header line index -> last line index of its block."""
        out: dict[int, int] = {}
        n = len(self.lines)
        if self.brace:
            stack: list[int] = []
            in_block_comment = False
            for i, s in enumerate(self.clean):
                if in_block_comment:
                    if "*/" in s:
                        s = s.split("*/", 1)[1]
                        in_block_comment = False
                    else:
                        continue
                if "/*" in s:
                    s, in_block_comment = s.split("/*", 1)[0], True
                for ch in s:
                    if ch == "{":
                        stack.append(i)
                    elif ch == "}" and stack:
                        j = stack.pop()
                        if i > j and j not in out:
                            out[j] = i
            # A header whose `{` sits alone on the next line (Allman style): the block belongs to the line above.
            fixed = {}
            for j, e in out.items():
                if self.clean[j].strip() == "{" and j > 0 and self.clean[j - 1].strip():
                    fixed[j - 1] = e
                else:
                    fixed[j] = e
            return fixed
        ind = [len(l) - len(l.lstrip()) if l.strip() else None for l in self.lines]
        for i in range(n):
            if ind[i] is None:
                continue
            j, last = i + 1, i
            while j < n and (ind[j] is None or ind[j] > ind[i]):
                if ind[j] is not None:
                    last = j
                j += 1
            # Closing keyword at the same indentation (`end` in Ruby/Lua) stays with the block.
            if last > i and j < n and self.lines[j].strip() in ("end", "end;", "fi", "done", "esac"):
                last = j
            if last > i:
                out[i] = last
        return out

    def build(self) -> _Plan:
        self.region(0, len(self.lines) - 1, [], "", 0)
        return self.plan

    def region(self, a: int, b: int, needs: list[str], prefix: str, depth: int) -> list[str]:
        p = self.plan
        keys: list[str] = []
        i = a
        pending_comment: list[int] = []
        stmt_run: list[int] = []

        def flush_stmts():
            if not stmt_run:
                return
            s0, s1 = stmt_run[0], stmt_run[-1]
            is_import = all(_IMPORT_LINE.match(self.lines[k]) or not self.lines[k].strip() for k in stmt_run)
            key = p.item(f"{prefix}L{s0 + 1}", T_IMPORT if is_import else T_STMT, needs)
            p.pieces.append(Piece(self.off(s0), self.off(s1 + 1), _has(key)))
            p.units.append(CodeUnit("", f"{prefix}L{s0 + 1}", self.text[self.off(s0): self.off(s1 + 1)], [key], "stmt"))
            keys.append(key)
            stmt_run.clear()

        while i <= b:
            line = self.lines[i]
            s = line.strip()
            if not s:
                flush_stmts()
                p.pieces.append(Piece(self.off(i), self.off(i + 1), None, blank=True))
                i += 1
                continue
            c_end = self.comment_end.get(i)
            if c_end is not None and c_end <= b:
                span = list(range(i, c_end + 1))
                if stmt_run:
                    stmt_run.extend(span)
                else:
                    pending_comment.extend(span)
                i = c_end + 1
                continue
            end = self.close.get(i)
            if end is None or end > b:
                if _is_comment(s, self.brace) and not stmt_run:
                    pending_comment.append(i)
                else:
                    stmt_run.extend(pending_comment)
                    pending_comment.clear()
                    stmt_run.append(i)
                i += 1
                continue
            flush_stmts()
            header = self.clean[i]
            name_m = re.findall(r"([A-Za-z_]\w*)\s*(?:\(|<[^>]*>\s*\(|\{|:|=)", header)
            name = name_m[0] if name_m else f"L{i + 1}"
            for cand in name_m:
                if cand not in ("function", "func", "fn", "def", "public", "private", "static", "async", "const",
                                "let", "var", "export", "default", "void", "int", "sub", "local", "protected"):
                    name = cand
                    break
            qual = f"{prefix}{name}"
            key = f"{qual}@{i + 1}"
            sig = p.item(key, T_HEADER, needs)
            com = p.item(key + ".com", T_COMMENT, [sig])
            for c in pending_comment:
                p.pieces.append(Piece(self.off(c), self.off(c + 1), _has(com)))
            pending_comment.clear()
            hdr_last = i
            # A multi-line signature ends at the line holding the `{` (brace) or at the header (indent).
            if self.brace and "{" not in self.clean[i]:
                hdr_last = i + 1 if i + 1 <= end and self.clean[i + 1].strip().startswith("{") else i
            body_a, body_b = hdr_last + 1, end - 1 if self._closing_line(end) else end
            is_container = bool(_CONTAINER.search(header)) and not _CONTROL.match(header)
            p.pieces.append(Piece(self.off(i), self.off(hdr_last + 1), _has(sig)))
            ind = re.match(r"[ \t]*", self.lines[body_a] if body_a <= body_b else line).group(0)
            if not ind and body_a <= body_b:
                ind = re.match(r"[ \t]*", line).group(0) + "    "
            if is_container and body_a <= body_b:
                at = len(p.pieces)
                child = self.region(body_a, body_b, [sig], f"{qual}.", depth + 1)
                p.pieces.insert(at, Piece(0, 0, Placeholder(sig, tuple(child)), literal=f"{ind}{self.placeholder}\n"))
                items = [sig]
            elif body_a <= body_b:
                full = p.item(key + ".body", T_BODY, [sig])
                p.pieces.append(Piece(0, 0, Placeholder(sig, (full,)), literal=f"{ind}{self.placeholder}\n"))
                p.pieces.append(Piece(self.off(body_a), self.off(body_b + 1), _has(full)))
                items = [sig, full]
            else:
                items = [sig]
            if body_b < end:
                p.pieces.append(Piece(self.off(end), self.off(end + 1), _has(sig)))
            p.units.append(CodeUnit(name, qual, self.text[self.off(i): self.off(end + 1)], items,
                                "class" if is_container else "def"))
            keys.append(sig)
            i = end + 1
        stmt_run.extend(pending_comment)
        flush_stmts()
        return keys

    def _closing_line(self, end: int) -> bool:
        """True when the block's last line only closes it (`}`, `};`, `end`), so it belongs with the header."""
        s = self.clean[end].strip()
        return bool(re.fullmatch(r"}[\s;,)\]]*|end;?|fi|done|esac", s)) or (self.brace and s.startswith("}"))


def _is_comment(s: str, brace: bool) -> bool:
    return s.startswith(("//", "/*", "*", "#", "--", "%")) and not re.match(
        r"#\s*(include|import|define|if|endif|else|pragma)", s)


# ---------------------------------------------------------------------------------------------------------------
# Other languages on real syntax trees (tree-sitter): JavaScript/TypeScript, Go, Rust, Java, C/C++

# File suffix -> grammar of tree-sitter-language-pack. `.h` is tried as C, then as C++.
TS_LANGUAGES = {".js": "javascript", ".jsx": "javascript", ".mjs": "javascript", ".cjs": "javascript",
                ".ts": "typescript", ".mts": "typescript", ".cts": "typescript", ".tsx": "tsx", ".go": "go",
                ".rs": "rust", ".java": "java", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp",
                ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp"}
_TS_GRAMMARS = frozenset(TS_LANGUAGES.values())
_TS_COMMENTS = frozenset({"comment", "line_comment", "block_comment"})
_TS_ATTRIBUTES = frozenset({"attribute_item", "decorator"})  # Rust `#[test]`, TS `@Input()`: part of the header
_TS_IMPORTS = frozenset({"import_statement", "import_declaration", "use_declaration", "preproc_include",
                         "package_clause", "package_declaration", "using_declaration", "extern_crate_declaration",
                         "namespace_alias_definition"})
# Declarations whose body holds further declarations (recursed into) rather than statements.
_TS_CONTAINERS = frozenset({"class_declaration", "class", "abstract_class_declaration", "interface_declaration",
                            "internal_module", "module", "impl_item", "trait_item", "mod_item", "namespace_definition",
                            "class_specifier", "struct_specifier", "union_specifier", "linkage_specification",
                            "record_declaration", "annotation_type_declaration", "struct_item"})
_TS_CONTAINER_BODIES = frozenset({"class_body", "interface_body", "declaration_list", "field_declaration_list"})
_TS_BLOCKS = frozenset({"block", "statement_block", "compound_statement", "constructor_body"})
_TS_FUNCTION_VALUES = frozenset({"arrow_function", "function_expression", "function", "generator_function", "class"})
_TS_PREPROC_BLOCKS = frozenset({"preproc_ifdef", "preproc_if"})  # include guards wrap whole headers


@lru_cache(maxsize=None)
def ts_parser(language: str):
    """A tree-sitter parser for `language`, or None when tree-sitter-language-pack is not installed."""
    try:
        from tree_sitter_language_pack import get_parser
    except ImportError:
        return None
    return get_parser(language)


def ts_parses(text: str, language: str) -> bool:
    """True when `text` parses with the grammar without an ERROR or MISSING node."""
    parser = ts_parser(language)
    return parser is not None and not parser.parse(text.encode("utf-8")).root_node.has_error


def _last_row(node) -> int:
    """The last row holding text of `node` (a node that ends with its newline ends at column 0 of the next row)."""
    end = node.end_point
    return end[0] - 1 if end[1] == 0 and end[0] > node.start_point[0] else end[0]


def _ts_text(node) -> str:
    return node.text.decode("utf-8", "replace") if node is not None else ""


def _ts_name(node) -> str:
    """The declared name: the `name` field, a C/C++ declarator's identifier, a Rust impl's type."""
    n = node.child_by_field_name("name")
    if n is not None:
        return _ts_text(n)
    d = node.child_by_field_name("declarator")
    while d is not None:
        if d.type in ("identifier", "field_identifier", "destructor_name", "operator_name", "type_identifier"):
            return _ts_text(d)
        if d.type == "qualified_identifier":
            return _ts_text(d).split("::")[-1]
        d = d.child_by_field_name("declarator") or d.child_by_field_name("name")
    t = node.child_by_field_name("type")  # impl blocks
    return _ts_text(t).split("<")[0] if t is not None else ""


def _ts_unwrap(node) -> tuple:
    """(the node holding the body, kind, name): kind is "def" (a function: the body is statements), "container" (its
    body holds declarations) or "stmt". Looks through `export`, C++ `template <...>` and `const f = () => {...}`."""
    t = node.type
    if t == "export_statement":
        inner = node.child_by_field_name("declaration") or node.child_by_field_name("value")
        if inner is None:
            inner = next((c for c in node.named_children if c.type not in _TS_COMMENTS | _TS_ATTRIBUTES), None)
        return _ts_unwrap(inner) if inner is not None and inner.type != "export_clause" else (node, "stmt", "")
    if t == "template_declaration" and node.named_children:
        inner, kind, name = _ts_unwrap(node.named_children[-1])
        return inner, kind, name
    if t in ("lexical_declaration", "variable_declaration"):
        decls = [c for c in node.named_children if c.type == "variable_declarator"]
        if len(decls) == 1:
            value = decls[0].child_by_field_name("value")
            if value is not None and value.type in _TS_FUNCTION_VALUES:
                inner, kind, _ = _ts_unwrap(value)
                return inner, kind, _ts_name(decls[0])
        return node, "stmt", _ts_name(decls[0]) if len(decls) == 1 else ""
    if t == "expression_statement" and node.named_child_count == 1 and \
            node.named_children[0].type in ("internal_module", "module"):
        return _ts_unwrap(node.named_children[0])
    if t in _TS_PREPROC_BLOCKS:
        return node, "preproc", ""
    body = node.child_by_field_name("body")
    name = _ts_name(node)
    if t == "method_declaration" and node.child_by_field_name("receiver") is not None:  # Go: (s *Server) Name
        recv = re.findall(r"\w+", _ts_text(node.child_by_field_name("receiver")))
        name = f"{recv[-1]}.{name}" if recv else name
    if body is not None:
        if t in _TS_CONTAINERS or body.type in _TS_CONTAINER_BODIES:
            return node, "container", name
        if body.type in _TS_BLOCKS:
            return node, "def", name
    return node, "stmt", name


class _TSPlanner:
    """Declarations from the syntax tree: imports, signatures, doc comments and bodies as items, recursing into
    classes, impl blocks, namespaces and include guards. Everything is cut at whole lines, and only where a line
    holds nothing but the piece (a body's lines lie strictly between the line of its `{` and the line of its `}`);
    a declaration that shares its lines is kept or dropped whole. A dropped body becomes `/* ... */`, a comment in
    every one of these grammars, so the output parses again with the same grammar."""

    PLACEHOLDER = "/* ... */"

    def __init__(self, text: str, root):
        self.text = text
        self.ls = _line_starts(text)
        self.plan = _Plan()
        self.root = root

    def off(self, row: int) -> int:
        return self.ls[row] if row < len(self.ls) else len(self.text)

    def blank(self, row: int) -> bool:
        return not self.text[self.off(row): self.off(row + 1)].strip()

    def indent(self, row: int) -> str:
        return re.match(r"[ \t]*", self.text[self.off(row): self.off(row + 1)]).group(0)

    def rows(self, a: int, b: int, show) -> None:
        if b >= a:
            self.plan.pieces.append(Piece(self.off(a), self.off(b + 1), show))

    def build(self) -> _Plan:
        last = max(0, len(self.ls) - 1 if self.text.endswith("\n") else len(self.ls) - 2)
        self.region(list(self.root.children), 0, last, [], "")
        return self.plan

    def region(self, children: list, first: int, last: int, needs: list[str], prefix: str) -> list[str]:
        """Plan `children` (the nodes of a file or of a container's body, rows `first`..`last`); returns the keys
        whose presence means 'something of this region is shown'."""
        keys: list[str] = []
        pos = first
        pending: list = []  # comments and attributes on their own lines, waiting for the next declaration
        for ch in children:
            a, b = ch.start_point[0], _last_row(ch)
            if b < pos or a > last:
                continue
            if a < pos:  # shares a line with what came before: goes with it
                if keys:
                    self.rows(pos, min(b, last), _has(keys[-1]))
                    pos = min(b, last) + 1
                continue
            if ch.type in _TS_COMMENTS | _TS_ATTRIBUTES:
                pending.append(ch)
                continue
            keys.append(self.declaration(ch, pos, pending, needs, prefix))
            pending = []
            pos = _last_row(ch) + 1
        if pos <= last:
            if keys:  # trailing comments of a region are cheap context at best: they go with its last declaration
                tail = self.plan.item(keys[-1] + ".tail", T_COMMENT, [keys[-1]])
                self.gap(pos, last, {}, _has(tail))
            else:  # a region of comments only (or an empty file): one statement
                key = self.plan.item(f"{prefix}L{pos + 1}", T_STMT, needs)
                self.gap(pos, last, {}, _has(key))
                self.plan.units.append(CodeUnit("", f"{prefix}L{pos + 1}", self.text[self.off(pos): self.off(last + 1)],
                                                [key], "stmt"))
                keys.append(key)
        return keys

    def gap(self, a: int, b: int, doc_rows: dict, show) -> None:
        """Rows before a declaration: blank lines are separators, doc-comment rows go with `doc_rows[row]`, other
        comment rows with `show`."""
        for r in range(a, b + 1):
            if self.blank(r):
                self.plan.pieces.append(Piece(self.off(r), self.off(r + 1), None, blank=True))
            else:
                self.plan.pieces.append(Piece(self.off(r), self.off(r + 1), doc_rows.get(r, show)))

    def declaration(self, ch, pos: int, pending: list, needs: list[str], prefix: str) -> str:
        p = self.plan
        node, kind, name = _ts_unwrap(ch)
        start = ch.start_point[0]
        # The comments and attributes right above (no blank line between) belong to the declaration: attributes
        # to its header, comments before the first attribute are its doc comment.
        lead: list = []
        row = start
        for c in reversed(pending):
            if _last_row(c) != row - 1:
                break
            lead.insert(0, c)
            row = c.start_point[0]
        attrs = [c for c in lead if c.type in _TS_ATTRIBUTES]
        if attrs:
            start = attrs[0].start_point[0]
            lead = [c for c in lead if c.end_point[0] < start]
        qual = f"{prefix}{name}" if name else f"{prefix}L{start + 1}"
        key = f"{qual}@{start + 1}"
        tier = T_IMPORT if ch.type in _TS_IMPORTS else (T_STMT if kind == "stmt" else T_HEADER)
        sig = p.item(key, tier, needs)
        com = p.item(key + ".com", T_COMMENT, [sig])
        doc = p.item(key + ".doc", T_DOC, [sig]) if lead else None
        doc_rows = {r: _has(doc) for c in lead for r in range(c.start_point[0], _last_row(c) + 1)}
        self.gap(pos, start - 1, doc_rows, _has(com))
        end = _last_row(ch)
        unit_text = self.text[self.off(start): self.off(end + 1)]
        unit_items = [sig] + ([doc] if doc else [])
        split = self.split(node, kind, end)
        if split is None:
            self.rows(start, end, _has(sig))
            p.units.append(CodeUnit(name, qual, unit_text, unit_items, kind if kind in ("def", "stmt") else "class"))
            return sig
        hdr_end, inner, close = split
        self.rows(start, hdr_end, _has(sig))
        first_inner = inner[0].start_point[0]
        ind = self.indent(first_inner) or self.indent(start) + "    "
        literal = f"{ind}{self.PLACEHOLDER}\n"
        if kind == "def":
            full = p.item(key + ".body", T_BODY, unit_items)
            p.pieces.append(Piece(0, 0, Placeholder(sig, (full,)), literal=literal))
            self.rows(hdr_end + 1, close - 1, _has(full))
            unit_items = unit_items + [full]
        else:
            at = len(p.pieces)
            child_keys = self.region(inner, hdr_end + 1, close - 1, [sig], f"{qual}.")
            p.pieces.insert(at, Piece(0, 0, Placeholder(sig, tuple(child_keys)), literal=literal))
        self.rows(close, end, _has(sig))
        p.units.append(CodeUnit(name, qual, unit_text, unit_items, "class" if kind != "def" else "def"))
        return sig

    def split(self, node, kind: str, end: int):
        """(last header row, inner nodes, closing row) when the body's inner lines can be cut out cleanly, else
        None (the declaration is kept or dropped whole)."""
        if kind in ("def", "container"):
            body = node.child_by_field_name("body")
            inner = [c for c in body.children if c.type not in ("{", "}")]
            hdr_end, close = body.start_point[0], _last_row(body)
        elif kind == "preproc":
            cond = node.child_by_field_name("name") or node.child_by_field_name("condition")
            if cond is None:
                return None
            hdr_end, close = _last_row(cond), _last_row(node)
            inner = [c for c in node.children if c.start_point[0] > hdr_end and c.type != "#endif"]
            kind = "container"
        else:
            return None
        if not inner or close != end or inner[0].start_point[0] <= hdr_end or _last_row(inner[-1]) >= close:
            return None
        return hdr_end, inner, close


def _ts_plan(text: str, language: str) -> tuple["_Plan | None", str]:
    """The plan of `text` in `language` (a `.h` that is not C is tried as C++), or None when tree-sitter is not
    installed or the input does not parse cleanly (then the indentation/brace planner takes it)."""
    for lang in ([language, "cpp"] if language == "c" else [language]):
        parser = ts_parser(lang)
        if parser is None:
            return None, language
        tree = parser.parse(text.encode("utf-8"))
        if not tree.root_node.has_error:
            return _TSPlanner(text, tree.root_node).build(), lang
    return None, language


# ---------------------------------------------------------------------------------------------------------------


def _split_ident(text: str) -> str:
    """`parseHTTPResponse get_value` -> adds `parse HTTP Response get value` so BM25 matches query words."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", text)


def _norm(x: np.ndarray) -> np.ndarray:
    if len(x) == 0:
        return x
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x, dtype=np.float64)


@dataclass
class CodeCompressor(Compressor):
    """Source-code compression that keeps the skeleton and the most relevant function bodies whole.

    Imports, class headers, signatures and docstrings are kept first; function bodies are ranked by relevance to the
    query and kept whole in that order while they fit; the rest become `...` (Python) or a comment placeholder, so
    the output stays syntactically valid (for Python `ast.parse` succeeds on every output). A function the query
    names is kept whole before anything else. Under a budget smaller than the skeleton, comments go first, then
    docstrings, statements and signatures of the least relevant units; the output is never over the budget.
    Ranking follows LongCodeZip (Shi et al., 2025, https://arxiv.org/abs/2510.00446): identifier-aware BM25 fused
    with dense similarity, and the local LM's approximated mutual information `NLL(q) - NLL(q | body)` for the
    `lm_candidates` best bodies.

    Parameters
    ----------
    language: file suffix that picks the parser (".py", ".js", ...); default: Python when the text parses.
    use_lm: score the top bodies with the local LM (conditional perplexity of the query); off = BM25 + dense only.
    dense_candidates: units embedded at most (the BM25 best); the rest get no dense score.
    lead_bodies: with a query that names no function, this many best bodies are kept before the skeleton (when each
        takes at most half the budget), so a tight budget still shows the code that matters most.
    lm_candidates: bodies scored by the LM at most (each costs one forward pass of up to lm_body_tokens tokens).
    lm_body_tokens: model tokens of a body the LM sees (its head: signature, docstring, first statements).
    lm_batch: bodies per forward pass.
    dense_weight, lm_weight: weights of the dense and LM scores in the fusion (BM25 gets the rest).
    embedder: sentence-transformers directory (default: bundled all-MiniLM-L6-v2); dense_weight=0 skips it.
    """

    name = "code"
    language: str | None = None
    use_lm: bool = True
    dense_candidates: int = 48
    lm_candidates: int = 6
    lm_body_tokens: int = 128
    lm_batch: int = 4
    lead_bodies: int = 1
    dense_weight: float = 0.35
    lm_weight: float = 0.3
    embedder: str | None = None

    # -- planning ---------------------------------------------------------------------------------------------
    def plan(self, text: str) -> tuple[_Plan, str]:
        suffix = (self.language or "").lower()
        if suffix and not suffix.startswith("."):
            suffix = "." + suffix
        if suffix in ("", ".py", ".pyi", ".python"):
            try:
                tree = ast.parse(text)
                return _PyPlanner(text, tree).build(), "python"
            except (SyntaxError, ValueError, RecursionError):
                if suffix in (".py", ".pyi"):
                    return _GenericPlanner(text, ".py").build(), "python-indent"
        grammar = TS_LANGUAGES.get(suffix) or (suffix[1:] if suffix[1:] in _TS_GRAMMARS else None)
        if grammar:
            planned, grammar = _ts_plan(text, grammar)
            if planned is not None:
                return planned, grammar
        gp = _GenericPlanner(text, suffix)
        shape = "brace" if gp.brace else "indent"
        # A grammar's name means the output parses; input it could not parse is cut by the heuristics, and says so.
        return gp.build(), (f"{grammar}-{shape}" if grammar else suffix.lstrip(".") or shape)

    # -- ranking ----------------------------------------------------------------------------------------------
    def relevance(self, units: list[CodeUnit], query: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
        """(relevance in [0, 1+] per unit, named mask, info)."""
        n = len(units)
        info: dict = {}
        if n == 0:
            return np.zeros(0), np.zeros(0, dtype=bool), info
        if not query or not query.strip():
            # No query: public API first; a small lead prior so the top of the file frames the rest.
            rel = np.array([0.6 if u.name.startswith("_") and not u.name.startswith("__") else 1.0 for u in units])
            rel = rel + 0.1 * np.exp(-np.arange(n) / max(8.0, n / 4))
            return rel, np.zeros(n, dtype=bool), info
        q_idents = set(re.findall(r"[A-Za-z_][\w.]*", query))
        q_words = {w.lower() for w in re.findall(r"[A-Za-z_]\w*", query)}
        named = np.array([bool(u.name) and len(u.name) >= 2 and (u.name in q_idents or u.qualname in q_idents
                          or any(x.endswith("." + u.name) for x in q_idents)
                          or (len(u.name) >= 4 and u.name.lower() in q_words)) for u in units])
        docs = [_split_ident(u.qualname.replace(".", " ") + " " + u.text) for u in units]
        bm = BM25(docs).scores(_split_ident(query)).astype(np.float64)
        fused = (1 - self.dense_weight - (self.lm_weight if self.use_lm else 0)) * _norm(bm)
        if self.dense_weight > 0:
            from .relevance import embedder_for

            # Embedding every unit of a big module costs tens of seconds on a CPU: only the BM25 best (and the
            # named ones) are embedded, each by its head (name, signature, docstring, first lines).
            cand = np.unique(np.r_[np.argsort(-bm, kind="stable")[: self.dense_candidates], np.flatnonzero(named)])
            vecs = embedder_for(self.embedder, self.settings).encode([units[i].text[:600] for i in cand] + [query])
            dense = np.zeros(n)
            dense[cand] = _norm(vecs[:-1] @ vecs[-1])
            fused += self.dense_weight * dense
        if self.use_lm and self.lm_weight > 0:
            body_units = [i for i, u in enumerate(units) if u.kind == "def"]
            cand = sorted(body_units, key=lambda i: -fused[i])[: self.lm_candidates]
            if cand:
                mi = self.lm_scores([units[i].text for i in cand], query)
                lm = np.zeros(n)
                lm[cand] = _norm(mi)
                fused += self.lm_weight * lm
                info["lm_scored"] = len(cand)
        # Words of the query that are also identifiers in a unit point at it even when it is not named outright.
        ident_hits = np.array([len(q_words & {w.lower() for w in re.findall(r"[A-Za-z_]\w{3,}", u.text)})
                               for u in units])
        fused += 0.05 * _norm(ident_hits.astype(np.float64))
        return fused + 0.01, named, info

    def lm_scores(self, bodies: list[str], query: str) -> np.ndarray:
        """Approximated mutual information per body: mean NLL of the query alone minus given the body (nats/token),
        from `ctxc.lm.target_nll` (one batched pass; only the query rows reach the vocabulary head)."""
        from ..lm import load_model, target_nll

        s = self.config
        lm = load_model(settings=s)
        hf = lm.tokenizer.hf
        q_ids = hf.encode("\n# Question: " + query.strip(), add_special_tokens=False)[:64]
        bos = [hf.bos_token_id] if hf.bos_token_id is not None else []
        ctxs = [bos + hf.encode(b, add_special_tokens=False)[: self.lm_body_tokens] for b in bodies]
        batch_tokens = max(1, self.lm_batch) * (len(bos) + self.lm_body_tokens + len(q_ids))
        nll = target_nll(lm, [bos] + ctxs, q_ids, threads=s.threads, kernels=s.kernels, batch_tokens=batch_tokens)
        return nll[0] - nll[1:]

    # -- selection --------------------------------------------------------------------------------------------
    def compress(self, text: str, budget: int, tokenizer: Tokenizer, query: str | None = None) -> Compressed:
        plan, lang = self.plan(text)
        items, pieces = plan.items, plan.pieces
        rel, named, info = self.relevance(plan.units, query)
        for u, r, nm in zip(plan.units, rel, named):
            for k in u.items:
                items[k].rel = float(r)
                if nm:
                    items[k].tier = T_NAMED
        # Items without a unit (comments, class docstrings already covered, module doc) inherit from what they need.
        for it in items.values():
            if it.rel == 0.0 and it.needs:
                it.rel = items[it.needs[0]].rel
        # Cost of each item: its own pieces (placeholders are charged to the signature they follow).
        owner: dict[int, str] = {}
        texts: dict[str, list[str]] = {k: [] for k in items}
        for i, pc in enumerate(pieces):
            k = _owner(pc)
            if k is not None and k in texts:
                texts[k].append(pc.literal if pc.literal is not None else text[pc.start : pc.end])
                owner[i] = k
        keys = list(items)
        counts = tokenizer.count_many(["".join(texts[k]) for k in keys])
        for k, c in zip(keys, counts):
            items[k].cost = c
        for it in items.values():  # large module-level statements (tables, big if-blocks) compete with bodies
            if it.tier == T_STMT and it.cost > _SMALL_STMT:
                it.tier = T_BODY

        if query and query.strip() and not named.any() and self.lead_bodies > 0:
            bodies = sorted((it for it in items.values() if it.key.endswith(".body") and it.cost <= budget // 2),
                            key=lambda it: -it.rel)
            for it in bodies[: self.lead_bodies]:
                it.tier = T_NAMED
        order = sorted(items.values(), key=_priority)
        sel: set[str] = set()
        added: list[str] = []
        used = 0

        def closure(k: str) -> list[str]:
            out, stack = [], [k]
            while stack:
                x = stack.pop()
                if x in sel or x in out:
                    continue
                out.append(x)
                stack.extend(items[x].needs)
            return out

        for it in order:
            if it.key in sel:
                continue
            need = closure(it.key)
            c = sum(items[x].cost for x in need)
            if used + c <= budget:
                sel.update(need)
                added.extend(reversed(need))
                used += c
        # Exact repair: token counts of pieces are not additive, so drop the last additions (with what depends on
        # them) until it truly fits.
        fitter = Fitter(lambda keys: _render(text, pieces, set(keys))[0], tokenizer, budget)

        def last_added(keys: list[str], over: int) -> set[str]:
            drop = added.pop()
            gone = {drop} | {k for k in keys if _depends(items, k, drop)}
            added[:] = [a for a in added if a not in gone]
            return gone

        kept_keys, _ = fitter.trim(sorted(sel), last_added)
        sel = set(kept_keys)
        out, kept = _render(text, pieces, sel)
        if not out.strip() and text.strip():
            # Every statement alone is over the budget (one giant line): its head rather than nothing, for Python
            # only when the head still parses (the output of Python always does).
            cut, cut_kept = head(text, budget, tokenizer)
            if _parses(cut, lang):
                out, kept = cut, cut_kept
        info.update({"language": lang, "units": len(plan.units),
                     "named": [u.qualname for u, m in zip(plan.units, named) if m],
                     "bodies_kept": sum(1 for k in sel if k.endswith(".body")),
                     "bodies": sum(1 for k in items if k.endswith(".body"))})
        return Compressed(out, kept, info)


def _parses(src: str, lang: str = "python") -> bool:
    """Whether `src` parses in `lang` (Python by `ast`, the tree-sitter grammars by theirs; others: no check)."""
    if lang in _TS_GRAMMARS:
        return ts_parses(src, lang)
    if lang != "python":
        return True
    try:
        ast.parse(src)
        return True
    except (SyntaxError, ValueError, RecursionError):
        return False


def _owner(pc: Piece) -> str | None:
    return pc.show.key if pc.show is not None else None


def _priority(it: Item) -> tuple:
    # Within the body tier, relevance decides (best bodies whole first); elsewhere relevance then document order.
    return (it.tier, -round(it.rel, 6), it.order)


def _depends(items: dict[str, Item], k: str, target: str) -> bool:
    seen, stack = set(), list(items[k].needs)
    while stack:
        x = stack.pop()
        if x == target:
            return True
        if x not in seen:
            seen.add(x)
            stack.extend(items[x].needs)
    return False


def _render(text: str, pieces: list[Piece], sel: set[str]) -> tuple[str, list[tuple[int, int]]]:
    """Shown pieces in order; blank lines only between shown pieces and never two runs in a row."""
    shown = [pc.blank or pc.show(sel) for pc in pieces]
    parts: list[str] = []
    kept: list[tuple[int, int]] = []
    any_shown = False
    pending_blanks: list[Piece] = []
    for pc, s in zip(pieces, shown):
        if not s:
            continue
        if pc.blank:
            # Runs of blank lines that meet where something was dropped would add up: cap them at two lines.
            if any_shown and len(pending_blanks) < 2:
                pending_blanks.append(pc)
            continue
        for b in pending_blanks:
            parts.append(text[b.start : b.end])
        pending_blanks = []
        if pc.literal is not None:
            parts.append(pc.literal)
        else:
            seg = text[pc.start : pc.end]
            if parts and not parts[-1].endswith("\n"):
                parts.append("\n")
            parts.append(seg)
            if kept and kept[-1][1] == pc.start:
                kept[-1] = (kept[-1][0], pc.end)
            else:
                kept.append((pc.start, pc.end))
        any_shown = True
    return "".join(parts), kept
