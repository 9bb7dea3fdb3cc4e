"""Secrets out of prompts: every file is scanned with a maintained detector (Yelp's `detect-secrets`) before it enters
a prompt, and each finding is redacted in place as `[REDACTED:<kind>]` (a whole PEM private-key block becomes one
marker). `redact_secrets` returns the redacted texts and the findings (path, line, kind; never the secret itself).

What is looked for: detect-secrets' pattern detectors (AWS, Azure, GitHub, GitLab, Slack, Stripe, Twilio, SendGrid,
npm, PyPI, OpenAI, JWT, Discord, Telegram, private keys, basic-auth URLs, ...) and its keyword detector (`password =
"..."`), with its heuristic filters (UUIDs, sequential strings, templates, `${VAR}`, indirect references,
`# pragma: allowlist secret`). Left out on purpose: the high-entropy string detectors, which in source code flag
every git sha, checksum and test vector, and the public-IP detector (an address is not a credential). Values that say
they are placeholders (`AKIAIOSFODNN7EXAMPLE`, `<your-token>`, `xxxxxxxx`) are left alone.

Speed: detect-secrets runs every detector and filter in Python on every line (about 4 s per MB here). A line can only
yield a finding when one of the detectors' own patterns (or a keyword of the keyword detector) matches in it, so
those patterns are first searched over the whole text at C speed and only the lines they hit go through
detect-secrets, with the same context lines; the findings are the same, at about 1/20 of the time.

>>> text, found = redact_secrets([("config.py", 'token = "ghp_' + "aB3" * 12 + '"\\n')])[0]
>>> text, [(f.line, f.kind) for f in found]
('token = "[REDACTED:GitHub Token]"\\n', [(1, 'GitHub Token')])
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Detectors that are not run (see the module docstring for why).
_LEFT_OUT = frozenset({"Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector"})
_PLACEHOLDER = re.compile(r"example|x{6,}|\*{6,}|^<.*>$|your[_-]|changeme|placeholder|dummy|redacted", re.I)
_PEM_END = re.compile(r"-----END[ A-Z0-9]*PRIVATE KEY( BLOCK)?-----")


@dataclass(frozen=True)
class Finding:
    path: str
    line: int  # 1-based, in the file as read
    kind: str  # the detector's name for it: "AWS Access Key", "GitHub Token", "Private Key", ...

    def to_json(self) -> dict:
        return {"path": self.path, "line": self.line, "kind": self.kind}


def _plugin_names() -> list[str]:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    return sorted(c.__name__ for c in get_mapping_from_secret_type_to_class().values() if c.__name__ not in _LEFT_OUT)


def _prefilters(plugins) -> list[re.Pattern] | None:
    """Patterns whose hits are a superset of the lines any of `plugins` can report; None when a plugin has none
    (then every line is scanned)."""
    from detect_secrets.plugins.base import RegexBasedDetector
    from detect_secrets.plugins.keyword import DENYLIST, KeywordDetector

    out = []
    for p in plugins:
        if isinstance(p, KeywordDetector):
            out.append(re.compile("|".join(DENYLIST), re.I))
        elif isinstance(p, RegexBasedDetector):
            out.extend(p.denylist)
        else:
            return None
    return out


def _candidate_lines(text: str, patterns: list[re.Pattern] | None, n_lines: int) -> list[int]:
    """0-based indices of the lines a pattern hits (every line a hit spans, so a match that runs over a line end
    cannot hide a match inside one line)."""
    if patterns is None:
        return list(range(n_lines))
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    import bisect

    hit: set[int] = set()
    for pat in patterns:
        for m in pat.finditer(text):
            a = bisect.bisect_right(starts, m.start()) - 1
            b = bisect.bisect_right(starts, max(m.start(), m.end() - 1)) - 1
            hit.update(range(a, b + 1))
    return sorted(i for i in hit if i < n_lines)


def redact_secrets(docs: list[tuple[str, str]]) -> list[tuple[str, list[Finding]]]:
    """For each `(path, text)`: the text with every finding replaced by `[REDACTED:<kind>]`, and the findings in
    line order. `path` names the file to the detectors (the keyword detector reads its extension)."""
    from detect_secrets.core.scan import _is_filtered_out, _scan_line
    from detect_secrets.settings import get_plugins, transient_settings
    from detect_secrets.util.code_snippet import get_code_snippet

    results = []
    with transient_settings({"plugins_used": [{"name": n} for n in _plugin_names()]}):
        plugins = get_plugins()
        patterns = _prefilters(plugins)
        for path, text in docs:
            lines = text.split("\n")
            found: list[tuple[int, str, str]] = []  # (line index, kind, secret value)
            for i in _candidate_lines(text, patterns, len(lines)):
                line = lines[i].rstrip()
                context = get_code_snippet(lines=lines, line_number=i + 1)
                # The same steps as detect-secrets' own file scan (scan._process_line_based_plugins).
                if _is_filtered_out(required_filter_parameters=["line"], filename=path, line=line, context=context):
                    continue
                for plugin in plugins:
                    for s in _scan_line(plugin=plugin, filename=path, line=line, line_number=i + 1,
                                        context=context):
                        if s.secret_value and not _PLACEHOLDER.search(s.secret_value) and not _is_filtered_out(
                                required_filter_parameters=["context"], filename=path, secret=s.secret_value,
                                plugin=plugin, line=line, context=context):
                            found.append((i, s.type, s.secret_value, getattr(plugin, "denylist", ())))
            results.append(_redact(path, text, lines, found))
    return results


def _value_spans(line: str, value: str, denylist) -> list[tuple[int, int]]:
    """Where the finding `value` lies on `line`. A pattern detector reports what its regex's findall gives, which for
    a pattern with a group is the group: the token itself (an AWS secret key after its variable name) or just its
    prefix (`ghp` of a GitHub token). So the pattern's matches are found again: a group of 8 characters or more is
    the secret, a shorter one stands for the whole match."""
    spans = []
    for pat in denylist:
        for m in pat.finditer(line):
            groups = [g for g in range(1, (m.lastindex or 0) + 1) if m.group(g)]
            if value not in (m.group(0), *(m.group(g) for g in groups)):
                continue
            g = groups[-1] if groups else 0
            spans.append(m.span(g) if g and m.end(g) - m.start(g) >= 8 else m.span(0))
    if not spans:
        spans = [m.span() for m in re.finditer(re.escape(value), line)]
    return spans


def _redact(path: str, text: str, lines: list[str], found: list):
    if not found:
        return text, []
    starts = [0]
    for ln in lines[:-1]:
        starts.append(starts[-1] + len(ln) + 1)
    spans: list[tuple[int, int, str]] = []
    findings: list[Finding] = []
    for i, kind, value, denylist in found:
        a = starts[i]
        line = lines[i]
        if kind == "Private Key":  # the whole PEM block, from its `-----BEGIN` to its `-----END ...-----`
            at = line.find(value)
            begin = a + (line.rfind("-----", 0, at) if at > 0 and "-----" in line[:at] else max(at, 0))
            end = _PEM_END.search(text, begin)
            spans.append((begin, end.end() if end else a + len(line), kind))
        else:
            # A value not found verbatim on the line (never seen, but possible): the rest of the line goes.
            spans += [(a + s, a + e, kind) for s, e in _value_spans(line, value, denylist)] or \
                [(a + len(line) - len(line.lstrip()), a + len(line), kind)]
        findings.append(Finding(path, i + 1, kind))
    out, pos = [], 0
    for s, e, kind in sorted(spans):
        if s < pos:  # inside a span already redacted (a key inside a private-key block)
            continue
        out.append(text[pos:s])
        out.append(f"[REDACTED:{kind}]")
        pos = e
    out.append(text[pos:])
    uniq = sorted(set(findings), key=lambda f: (f.line, f.kind))
    return "".join(out), uniq
