"""The search journal: one SQLite row per finished trial, committed the moment it finishes.

The journal is the search's durable state. A search killed at any point (even SIGKILL) loses at
most the trials that were running; running the same command again replays the finished trials
into the engine and never reruns them. The journal also pins the search's configuration (data,
teacher, student, space, seed, proxy settings): resuming with a different configuration is an
error rather than a silent mix of two searches.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

SCHEMA_VERSION = 1
_MAGIC = "autokd-journal"


class JournalError(ValueError):
    """A journal that cannot be used: corrupt, from another program, or another search."""


@dataclass
class Trial:
    id: int
    design: Dict[str, str]
    reward: float
    status: str  # "ok" | "diverged" | "failed"
    metrics: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    seed: int = 0
    strategy: str = "mcts"
    created: float = 0.0


class Journal:
    def __init__(self, path: str, config: Optional[Dict[str, Any]] = None):
        """Open (or create) the journal at ``path``.

        ``config``: the search configuration; stored on creation, compared on reopening. Keys
        whose values differ are named in the error.
        """
        self.path = str(path)
        # Compare configurations as their JSON forms (tuples and lists are the same thing there).
        config = json.loads(json.dumps(config, sort_keys=True)) if config is not None else None
        self.config: Dict[str, Any] = dict(config or {})
        exists = os.path.exists(self.path)
        if exists and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:
                head = f.read(16)
            if head != b"SQLite format 3\x00":
                raise JournalError(
                    f"{self.path}: not an autokd journal (expected an SQLite file, found "
                    f"{head[:16]!r}); move it away or choose another --out folder"
                )
        try:
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._init(config)
        except sqlite3.DatabaseError as e:
            raise JournalError(f"{self.path}: corrupt journal ({e}); move it away to start afresh") from e

    def _init(self, config):
        db = self._db
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            db.execute("BEGIN")
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                "CREATE TABLE trials (id INTEGER PRIMARY KEY, design TEXT NOT NULL, reward REAL NOT NULL,"
                " status TEXT NOT NULL, metrics TEXT NOT NULL, seconds REAL NOT NULL,"
                " seed INTEGER NOT NULL, strategy TEXT NOT NULL, created REAL NOT NULL)"
            )
            db.execute("INSERT INTO meta VALUES ('magic', ?)", (_MAGIC,))
            db.execute("INSERT INTO meta VALUES ('version', ?)", (str(SCHEMA_VERSION),))
            db.execute("INSERT INTO meta VALUES ('config', ?)", (json.dumps(config or {}, sort_keys=True),))
            db.execute("COMMIT")
            return
        if not {"meta", "trials"} <= tables:
            raise JournalError(f"{self.path}: not an autokd journal (tables {sorted(tables)})")
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if meta.get("magic") != _MAGIC:
            raise JournalError(f"{self.path}: not an autokd journal (magic {meta.get('magic')!r})")
        if meta.get("version") != str(SCHEMA_VERSION):
            raise JournalError(
                f"{self.path}: journal format version {meta.get('version')}, expected {SCHEMA_VERSION}"
            )
        try:
            self.config = json.loads(meta.get("config", "{}"))
        except json.JSONDecodeError as e:
            raise JournalError(f"{self.path}: corrupt journal configuration ({e})") from e
        if config is not None:
            diff = sorted(k for k in set(config) | set(self.config) if config.get(k) != self.config.get(k))
            if diff:
                parts = [f"{k}: journal has {self.config.get(k)!r}, this run has {config.get(k)!r}" for k in diff]
                raise JournalError(
                    f"{self.path}: the journal belongs to a search with another configuration "
                    f"({'; '.join(parts)}); use another --out folder or the same options"
                )
        return

    @property
    def stored_config(self) -> Dict[str, Any]:
        return json.loads(dict(self._db.execute("SELECT key, value FROM meta"))["config"])

    def add(self, design, reward, status, metrics=None, seconds=0.0, seed=0, strategy="mcts") -> Trial:
        """Append one finished trial; durable when this returns."""
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO trials (design, reward, status, metrics, seconds, seed, strategy, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                json.dumps(design, sort_keys=True),
                float(reward),
                status,
                json.dumps(metrics or {}, sort_keys=True),
                float(seconds),
                int(seed),
                strategy,
                now,
            ),
        )
        return Trial(cur.lastrowid, dict(design), float(reward), status, dict(metrics or {}),
                     float(seconds), int(seed), strategy, now)

    def trials(self) -> List[Trial]:
        try:
            rows = self._db.execute(
                "SELECT id, design, reward, status, metrics, seconds, seed, strategy, created"
                " FROM trials ORDER BY id"
            ).fetchall()
            return [
                Trial(r[0], json.loads(r[1]), r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8])
                for r in rows
            ]
        except (sqlite3.DatabaseError, json.JSONDecodeError) as e:
            raise JournalError(f"{self.path}: corrupt trial rows ({e})") from e

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM trials").fetchone()[0]

    def close(self):
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
