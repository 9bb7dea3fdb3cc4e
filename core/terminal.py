"""Text for terminals: anything that came from a file (names, paths, ids, messages) is shown through `printable`,
so it cannot move the cursor, clear the screen or retitle the window."""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and the bidirectional overrides that can make a terminal show something else than the
# bytes say ("Trojan Source"). Tab and newline are left to the callers that want them.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object, newlines: bool = False) -> str:
    r"""`text` with control characters shown as escapes; `newlines=False` escapes line breaks too (one-line
    messages).

    >>> printable("evil\x1b[2Jname\n")
    'evil\\x1b[2Jname\\n'
    """
    s = str(text)
    if not newlines:
        s = s.replace("\r", "\\r").replace("\n", "\\n")
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", s)
