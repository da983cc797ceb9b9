"""The search journal: one SQLite row per finished trial, committed the moment it finishes.

The journal is the search's durable state. A search killed at any point (even SIGKILL) loses at
most the trials that were running; running the same command again replays the finished trials
into the engine and never reruns them. The journal also pins the search's configuration (data,
teacher, student, space, seed, proxy settings): resuming with a different configuration is an
error rather than a silent mix of two searches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

SCHEMA_VERSION = 1
_MAGIC = "autokd-journal"


class JournalError(ValueError):
    """A journal that cannot be used: corrupt, from another program, or another search; or a
    file system that refuses it (permissions, a full disk, an I/O error, a lock held)."""


STATUSES = ("ok", "diverged", "failed")


def _sqlite_error(path: str, e: sqlite3.Error, doing: str) -> JournalError:
    """One line for an SQLite error, by its cause: only damage is called damage (a read-only
    folder is not a corrupt journal, and the advice to move an intact journal away would lose
    finished trials)."""
    name = getattr(e, "sqlite_errorname", "") or ""
    base = os.path.basename(path)
    if name.startswith("SQLITE_CORRUPT") or name == "SQLITE_NOTADB":
        return JournalError(
            f"{path}: corrupt journal while {doing} ({e}); move it away to start "
            "afresh, or restore it from a copy"
        )
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return JournalError(
            f"{path}: the journal cannot be written while {doing} ({e}): the file or its folder "
            f"is read-only (SQLite also writes {base}-wal and {base}-shm beside it). The journal "
            "is not damaged: fix the permissions, or copy the folder somewhere writable"
        )
    if name == "SQLITE_FULL":
        return JournalError(
            f"{path}: the disk is full while {doing} ({e}); free some space and "
            "run the same command again (the finished trials are kept)"
        )
    if name.startswith("SQLITE_IOERR"):
        return JournalError(
            f"{path}: I/O error while {doing} ({name}: {e}); the disk or file "
            "system failed: check it, then run the same command again"
        )
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return JournalError(
            f"{path}: locked by another process while {doing} ({e}); is another "
            "search running on this --out?"
        )
    return JournalError(f"{path}: SQLite error while {doing} ({name or type(e).__name__}: {e})")


# SQLite errors that come from the file system or other processes, not from the file's bytes.
_ENVIRONMENT = (
    "SQLITE_READONLY",
    "SQLITE_CANTOPEN",
    "SQLITE_PERM",
    "SQLITE_AUTH",
    "SQLITE_FULL",
    "SQLITE_IOERR",
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
)


def _row_problem(row) -> Optional[str]:
    """What is wrong with one stored trial row (None when it is sound)."""
    _, design, reward, status, metrics, seconds, seed, strategy, created = row
    for col, value in (("design", design), ("metrics", metrics)):
        if not isinstance(value, str):
            return f"column {col}: expected JSON text, found {value!r:.60}"
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            return f"column {col}: expected JSON text, found {value!r:.60} ({e})"
        if not isinstance(parsed, dict):
            return f"column {col}: expected a JSON object, found {value!r:.60}"
        if col == "design" and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
        ):
            return f"column design: expected level -> option strings, found {value!r:.60}"
    for col, value in (("reward", reward), ("seconds", seconds), ("created", created)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            return f"column {col}: expected a number, found {value!r:.60}"
    if status not in STATUSES:
        return f"column status: expected one of {', '.join(STATUSES)}, found {status!r:.60}"
    if isinstance(seed, bool) or not isinstance(seed, int):
        return f"column seed: expected an integer, found {seed!r:.60}"
    if not isinstance(strategy, str):
        return f"column strategy: expected text, found {strategy!r:.60}"
    return None


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


@dataclass
class Evaluation:
    """One run of the selection stage (autokd.search.selection): a spec trained with a seed at
    a fidelity, scored on the held-out split."""

    id: int
    key: str  # spec + seed + fidelity, the identity of the run
    label: str  # the candidate ("search #1", "kd", ...)
    design: Optional[Dict[str, str]]
    spec: Dict[str, Any]
    seed: int
    fidelity: Dict[str, Any]  # TrainConfig overrides
    round: int
    status: str
    score: float
    metrics: Dict[str, Any]
    seconds: float

    @staticmethod
    def key_of(spec: Dict[str, Any], seed: int, fidelity: Dict[str, Any], metric: str) -> str:
        spec = {k: v for k, v in spec.items() if k != "name"}
        return json.dumps([spec, int(seed), fidelity, metric], sort_keys=True)


_EVALUATIONS = (
    "CREATE TABLE IF NOT EXISTS evaluations (id INTEGER PRIMARY KEY, key TEXT NOT NULL,"
    " label TEXT NOT NULL, design TEXT NOT NULL, spec TEXT NOT NULL, seed INTEGER NOT NULL,"
    " fidelity TEXT NOT NULL, round INTEGER NOT NULL, status TEXT NOT NULL,"
    " score REAL NOT NULL, metrics TEXT NOT NULL, seconds REAL NOT NULL,"
    " created REAL NOT NULL)"
)


class Journal:
    def __init__(self, path: str, config: Optional[Dict[str, Any]] = None):
        """Open (or create) the journal at ``path``.

        ``config``: the search configuration; stored on creation, compared on reopening. Keys
        whose values differ are named in the error. With a ``config`` (a search that will
        append trials) a journal that cannot be written is refused here, at open.
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
        self._db = None
        with self._sql("opening"):
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._init(config)

    @contextlib.contextmanager
    def _sql(self, doing: str):
        """SQLite errors inside become one-line JournalErrors naming the file and the cause."""
        try:
            yield
        except sqlite3.Error as e:
            if self._db is not None and doing == "opening":
                self._db.close()
            raise _sqlite_error(self.path, e, doing) from None

    def _init(self, config):
        db = self._db
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            db.execute("BEGIN")
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                "CREATE TABLE trials (id INTEGER PRIMARY KEY, design TEXT NOT NULL,"
                " reward REAL NOT NULL, status TEXT NOT NULL, metrics TEXT NOT NULL,"
                " seconds REAL NOT NULL, seed INTEGER NOT NULL, strategy TEXT NOT NULL,"
                " created REAL NOT NULL)"
            )
            db.execute(_EVALUATIONS)
            db.execute("INSERT INTO meta VALUES ('magic', ?)", (_MAGIC,))
            db.execute("INSERT INTO meta VALUES ('version', ?)", (str(SCHEMA_VERSION),))
            db.execute(
                "INSERT INTO meta VALUES ('config', ?)", (json.dumps(config or {}, sort_keys=True),)
            )
            db.execute("COMMIT")
            return
        if not {"meta", "trials"} <= tables:
            raise JournalError(f"{self.path}: not an autokd journal (tables {sorted(tables)})")
        meta = dict(db.execute("SELECT key, value FROM meta"))
        if meta.get("magic") != _MAGIC:
            raise JournalError(f"{self.path}: not an autokd journal (magic {meta.get('magic')!r})")
        if meta.get("version") != str(SCHEMA_VERSION):
            raise JournalError(
                f"{self.path}: journal format version {meta.get('version')}, "
                f"expected {SCHEMA_VERSION}"
            )
        try:
            self.config = json.loads(meta.get("config", "{}"))
        except json.JSONDecodeError as e:
            raise JournalError(f"{self.path}: corrupt journal configuration ({e})") from e
        if config is not None:
            diff = sorted(
                k for k in set(config) | set(self.config) if config.get(k) != self.config.get(k)
            )
            if diff:
                parts = [
                    f"{k}: journal has {self.config.get(k)!r}, this run has {config.get(k)!r}"
                    for k in diff
                ]
                raise JournalError(
                    f"{self.path}: the journal belongs to a search with another configuration "
                    f"({'; '.join(parts)}); use another --out folder or the same options"
                )
            # A search will append trials: prove now that it can (a read-only file would
            # otherwise be found when the first trial has trained, and that trial lost).
            # (a write rolled back: BEGIN IMMEDIATE alone succeeds on a read-only connection)
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('write-probe', '')")
            finally:
                db.execute("ROLLBACK")
            db.execute(_EVALUATIONS)  # journals written before the selection stage existed
        return

    @property
    def stored_config(self) -> Dict[str, Any]:
        with self._sql("reading the configuration"):
            return json.loads(dict(self._db.execute("SELECT key, value FROM meta"))["config"])

    def add(
        self, design, reward, status, metrics=None, seconds=0.0, seed=0, strategy="mcts"
    ) -> Trial:
        """Append one finished trial; durable when this returns."""
        now = time.time()
        with self._sql("recording a trial"):
            cur = self._db.execute(
                "INSERT INTO trials"
                " (design, reward, status, metrics, seconds, seed, strategy, created)"
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
        return Trial(
            cur.lastrowid,
            dict(design),
            float(reward),
            status,
            dict(metrics or {}),
            float(seconds),
            int(seed),
            strategy,
            now,
        )

    _EVAL_COLUMNS = (
        "id, key, label, design, spec, seed, fidelity, round, status, score, metrics, seconds"
    )

    def add_evaluation(
        self, key, label, design, spec, seed, fidelity, round_, status, score, metrics, seconds
    ) -> None:
        """Append one finished run of the selection stage; durable when this returns."""
        with self._sql("recording a selection run"):
            self._db.execute(
                "INSERT INTO evaluations (key, label, design, spec, seed, fidelity, round, status,"
                " score, metrics, seconds, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key,
                    label,
                    json.dumps(design, sort_keys=True),
                    json.dumps(spec, sort_keys=True),
                    int(seed),
                    json.dumps(fidelity, sort_keys=True),
                    int(round_),
                    status,
                    float(score),
                    json.dumps(metrics or {}, sort_keys=True),
                    float(seconds),
                    time.time(),
                ),
            )

    def set_selection(self, record: Dict[str, Any]) -> None:
        """Record the finished selection stage: which runs (evaluation keys) made each of its
        rounds, so a report rebuilds exactly that stage, reused runs of earlier stages
        included; replaces the record of an earlier stage."""
        with self._sql("recording the selection stage"):
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('selection', ?)",
                (json.dumps(record, sort_keys=True),),
            )

    def selection(self) -> Optional[Dict[str, Any]]:
        """The last finished selection stage's record (set_selection), or None."""
        with self._sql("reading the selection stage"):
            row = self._db.execute("SELECT value FROM meta WHERE key = 'selection'").fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except ValueError as e:
            raise JournalError(
                f"{self.path}: the selection stage's record is damaged ({e}); delete it and "
                f"run the search again to redo the stage from its journaled runs (sqlite3 "
                f"{self.path} \"DELETE FROM meta WHERE key='selection'\")"
            ) from None

    def evaluations(self) -> List[Evaluation]:
        """Every run of the selection stage, in order (none for journals without the table)."""
        with self._sql("reading the selection runs"):
            tables = {
                r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if "evaluations" not in tables:
                return []
            rows = self._db.execute(
                f"SELECT {self._EVAL_COLUMNS} FROM evaluations ORDER BY id"
            ).fetchall()
        out = []
        for r in rows:
            try:
                out.append(
                    Evaluation(
                        r[0],
                        r[1],
                        r[2],
                        json.loads(r[3]),
                        json.loads(r[4]),
                        int(r[5]),
                        json.loads(r[6]),
                        int(r[7]),
                        r[8],
                        float(r[9]),
                        json.loads(r[10]),
                        float(r[11]),
                    )
                )
            except (TypeError, ValueError) as e:
                raise JournalError(
                    f"{self.path}: selection run row {r[0]} is damaged ({e}); "
                    "delete it to rerun that run "
                    f"(sqlite3 {self.path} 'DELETE FROM evaluations WHERE id={r[0]}')"
                ) from None
        return out

    def evaluation(self, key: str) -> Optional[Evaluation]:
        """The latest finished run with this key, or None."""
        found = [e for e in self.evaluations() if e.key == key]
        return found[-1] if found else None

    _COLUMNS = "id, design, reward, status, metrics, seconds, seed, strategy, created"

    def trials(self) -> List[Trial]:
        """Every finished trial in id order. A damaged row (bytes zeroed or garbled inside a
        page) raises a JournalError naming that row and what is wrong with it."""
        try:
            rows = self._db.execute(f"SELECT {self._COLUMNS} FROM trials ORDER BY id").fetchall()
        except sqlite3.DatabaseError as e:
            # the file system's refusals are reported as such; anything else (SQLITE_CORRUPT,
            # text that does not decode) is a damaged row, found and named
            if (getattr(e, "sqlite_errorname", "") or "").startswith(_ENVIRONMENT):
                raise _sqlite_error(self.path, e, "reading the trials") from None
            raise self._find_damaged_row(e) from None
        for r in rows:
            problem = _row_problem(r)
            if problem is not None:
                raise self._damaged(r[0], problem, len(rows))
        return [
            Trial(
                r[0],
                json.loads(r[1]),
                float(r[2]),
                r[3],
                json.loads(r[4]),
                float(r[5]),
                int(r[6]),
                r[7],
                float(r[8]),
            )
            for r in rows
        ]

    def _damaged(self, row_id, problem: str, total) -> JournalError:
        return JournalError(
            f"{self.path}: trial row {row_id} of {total} is damaged ({problem}); the journal "
            f"cannot be resumed as it is. Delete that row to go on without it (sqlite3 "
            f"{self.path} 'DELETE FROM trials WHERE id={row_id}') "
            "or restore the journal from a copy"
        )

    def _find_damaged_row(self, cause: sqlite3.DatabaseError) -> JournalError:
        """SQLite refused the whole table: read the rows one at a time (their ids live in the
        b-tree, apart from the damaged payloads) and name the first one it refuses."""
        try:
            ids = [r[0] for r in self._db.execute("SELECT id FROM trials ORDER BY id")]
        except sqlite3.DatabaseError:
            return _sqlite_error(self.path, cause, "reading the trials")
        for row_id in ids:
            try:
                row = self._db.execute(
                    f"SELECT {self._COLUMNS} FROM trials WHERE id = ?", (row_id,)
                ).fetchone()
            except sqlite3.DatabaseError as e:
                return self._damaged(row_id, f"SQLite: {e}", len(ids))
            problem = _row_problem(row)
            if problem is not None:
                return self._damaged(row_id, problem, len(ids))
        return _sqlite_error(self.path, cause, "reading the trials")

    def __len__(self) -> int:
        with self._sql("counting the trials"):
            return self._db.execute("SELECT COUNT(*) FROM trials").fetchone()[0]

    def close(self):
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
