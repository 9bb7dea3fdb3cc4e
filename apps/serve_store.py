"""What `ctxc serve` and `ctxc mcp` remember, in one SQLite file under the ctxc home (`serve.sqlite`):

- `spans`: every original that a compression cut, by its content address (`ctxc:<id>` markers carry the id), so
  `GET /v1/ctxc/expand/{id}` and the MCP tool `expand` can give it back;
- `memo`: what each long message was sent as, by the content address of the message and of everything that decides
  its compression (method, budget, tokenizer, output settings). A message is compressed once; every later request
  that holds it sends the stored bytes, so the upstream's prompt cache keeps matching the prefix.

Concurrent requests and processes are safe: SQLite's locking with a WAL journal, and `memo_once` (and `gate`, which
the policy also takes around a compaction) lets one thread compute a missing entry while the others wait for it and
read the same row (the first write wins, so even two processes that race end up sending identical bytes).
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..compressors.structured import MARKER_HEX, marker_id
from ..errors import InputError
from ..settings import Settings

MARKER = re.compile(r"ctxc:([0-9a-f]{%d})" % MARKER_HEX)
FILE_NAME = "serve.sqlite"


class SpanStore:
    """Originals of cut spans and the per-message memo (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _refuse_link(self.path)
        self._lock = threading.Lock()  # one connection shared by the server's worker threads
        self._pending: dict[str, threading.Lock] = {}
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None, check_same_thread=False)
        with self._lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            # A memo and a cache of originals, not a record: NORMAL skips the fsync of every commit; WAL keeps the
            # file consistent, and a crash can only lose the latest rows.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS spans (id TEXT PRIMARY KEY, text TEXT NOT NULL, "
                            "created REAL NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS memo (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                            "tokens INTEGER NOT NULL, created REAL NOT NULL)")

    @classmethod
    def open(cls, settings: Settings) -> "SpanStore":
        return cls(settings.home_dir() / FILE_NAME)

    # ------------------------------------------------------------------------------------------------ spans
    def put_spans(self, spans: list[tuple[str, str]]) -> None:
        """Store originals by id; an id is its text's content address, so an existing row is already right."""
        if not spans:
            return
        now = time.time()
        with self._lock, self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO spans (id, text, created) VALUES (?, ?, ?)",
                                [(i, t, now) for i, t in spans])

    def put_original(self, text: str) -> str:
        """Store `text` and return its marker id."""
        mid = marker_id(text)
        self.put_spans([(mid, text)])
        return mid

    def get_span(self, mid: str) -> str | None:
        if not re.fullmatch(r"[0-9a-f]{%d}" % MARKER_HEX, mid or ""):
            return None
        with self._lock:
            row = self.db.execute("SELECT text FROM spans WHERE id = ?", (mid,)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------------------------------------- memo
    def get_memo(self, key: str) -> tuple[str, int] | None:
        with self._lock:
            row = self.db.execute("SELECT text, tokens FROM memo WHERE key = ?", (key,)).fetchone()
        return (row[0], int(row[1])) if row else None

    def get_memos(self, keys: list[str]) -> dict[str, tuple[str, int]]:
        out: dict[str, tuple[str, int]] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                part = keys[i: i + 500]
                rows = self.db.execute(f"SELECT key, text, tokens FROM memo WHERE key IN ({','.join('?' * len(part))})",
                                       part)
                out.update({k: (t, int(n)) for k, t, n in rows})
        return out

    def put_memo(self, key: str, text: str, tokens: int, replace: bool = False) -> tuple[str, int]:
        """Record what a message is sent as; without `replace` the first row written wins, and that row is what
        comes back (so racing writers agree)."""
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(f"{verb} INTO memo (key, text, tokens, created) VALUES (?, ?, ?, ?)",
                            (key, text, tokens, time.time()))
            row = self.db.execute("SELECT text, tokens FROM memo WHERE key = ?", (key,)).fetchone()
        return row[0], int(row[1])

    def memo_once(self, key: str, compute: Callable[[], tuple[str, int]]) -> tuple[tuple[str, int], bool]:
        """The memo row for `key`, computing it (once per process, however many threads ask) when missing.
        Returns ((text, tokens), whether it was already there)."""
        with self.gate(key):
            hit = self.get_memo(key)
            if hit is not None:
                return hit, True
            text, tokens = compute()
            return self.put_memo(key, text, tokens), False

    @contextmanager
    def gate(self, key: str):
        """One thread at a time for `key` (the others wait, then find what it stored)."""
        with self._lock:
            lock = self._pending.setdefault(key, threading.Lock())
        try:
            with lock:
                yield
        finally:
            # Threads still waiting on this lock hold it themselves and will find the row; new ones need no lock.
            with self._lock:
                if self._pending.get(key) is lock:
                    del self._pending[key]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"spans": self.db.execute("SELECT COUNT(*) FROM spans").fetchone()[0],
                    "memo": self.db.execute("SELECT COUNT(*) FROM memo").fetchone()[0]}

    def close(self) -> None:
        with self._lock:
            self.db.close()


def _refuse_link(path: Path) -> None:
    """The store lives in the home; a link planted there could send every write somewhere else."""
    for p in (path, Path(str(path) + "-wal"), Path(str(path) + "-shm")):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise InputError(f"{p} is a symbolic link or not a regular file: ctxc never writes through links",
                             f"remove {p}")
