"""The function bank: every evaluation of every candidate, in SQLite.

Tables:
- ``functions``: code by hash (first seen, origin).
- ``evaluations``: one row per (task fingerprint, split, code hash) with status, score, per-image
  metrics and error. Re-evaluating the same code on the same split is answered from here.
- ``runs`` and ``proposals``: an optimisation run's slots (rollout, iteration, slot) and the code (and
  AutoML parameters) proposed for each, written *before* evaluation, so a killed run resumes by
  evaluating what was proposed but not yet scored, and never proposes or evaluates a slot twice.

WAL mode + a busy timeout let several processes (the MCP server, a running loop) share one bank;
every write is its own short transaction, so a SIGKILL loses at most evaluations in flight.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from servers.common.errors import ToolError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    code_hash TEXT PRIMARY KEY,
    code TEXT NOT NULL,
    origin TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task TEXT NOT NULL,
    task_fp TEXT NOT NULL,
    split TEXT NOT NULL,
    code_hash TEXT NOT NULL REFERENCES functions(code_hash),
    status TEXT NOT NULL,
    score REAL NOT NULL,
    metric TEXT,
    n_images INTEGER,
    per_image TEXT,
    error TEXT,
    duration_s REAL,
    isolation TEXT,
    created REAL NOT NULL,
    UNIQUE (task_fp, split, code_hash)
);
CREATE INDEX IF NOT EXISTS evaluations_rank ON evaluations(task_fp, split, status, score);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    task_fp TEXT NOT NULL,
    proposer TEXT NOT NULL,
    config TEXT,
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS proposals (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    rollout INTEGER NOT NULL,
    iteration INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    code_hash TEXT NOT NULL REFERENCES functions(code_hash),
    params TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, rollout, iteration, slot)
);
"""


class Bank:
    """A SQLite function bank at ``path`` (created on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    # -- connection ---------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute("PRAGMA busy_timeout=30000")
            self._local.conn = c
        return c

    class _Tx:
        def __init__(self, conn):
            self.conn = conn

        def __enter__(self):
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, et, ev, tb):
            self.conn.execute("ROLLBACK" if et else "COMMIT")

    def _tx(self):
        return Bank._Tx(self._conn())

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # -- functions and evaluations -----------------------------------------------------------
    def add_function(self, code_hash: str, code: str, origin: str | None = None) -> None:
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO functions(code_hash, code, origin, created) VALUES (?,?,?,?)",
                      (code_hash, code, origin, time.time()))

    def code(self, code_hash: str) -> str:
        row = self._conn().execute("SELECT code FROM functions WHERE code_hash=?", (code_hash,)).fetchone()
        if row is None:
            raise ToolError(f"No function with hash {code_hash!r} in the bank.",
                            hint="Use a code_hash from bank_top / bank_history.")
        return row["code"]

    def record(self, task: str, task_fp: str, ev: dict[str, Any], code: str | None = None,
               origin: str | None = None) -> bool:
        """Store one evaluation (``Evaluation.to_dict()``); False if that (task, split, code) was already there."""
        now = time.time()
        with self._tx() as c:
            if code is not None:
                c.execute("INSERT OR IGNORE INTO functions(code_hash, code, origin, created) VALUES (?,?,?,?)",
                          (ev["code_hash"], code, origin, now))
            cur = c.execute(
                "INSERT OR IGNORE INTO evaluations(task, task_fp, split, code_hash, status, score, metric, n_images,"
                " per_image, error, duration_s, isolation, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (task, task_fp, ev["split"], ev["code_hash"], ev["status"], float(ev["score"]), ev.get("metric"),
                 ev.get("n_images"), json.dumps(ev.get("per_image") or []), ev.get("error"), ev.get("duration_s"),
                 ev.get("isolation"), now))
            return cur.rowcount == 1

    def lookup(self, task_fp: str, split: str, code_hash: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT * FROM evaluations WHERE task_fp=? AND split=? AND code_hash=?",
                                   (task_fp, split, code_hash)).fetchone()
        return _row(row) if row else None

    def evaluated(self, task_fp: str, split: str, hashes: Iterable[str]) -> set[str]:
        hs = list(set(hashes))
        out: set[str] = set()
        for i in range(0, len(hs), 500):
            chunk = hs[i:i + 500]
            q = f"SELECT code_hash FROM evaluations WHERE task_fp=? AND split=? AND code_hash IN ({','.join('?' * len(chunk))})"
            out |= {r[0] for r in self._conn().execute(q, (task_fp, split, *chunk))}
        return out

    def top(self, task_fp: str, k: int = 5, split: str = "val", *, worst: bool = False,
            include_failures: bool = False, run_id: str | None = None, rollout: int | None = None,
            with_code: bool = True) -> list[dict[str, Any]]:
        """Best (or worst) ``k`` distinct functions by score on ``split``; ties broken by first seen."""
        where = ["e.task_fp=?", "e.split=?"]
        args: list[Any] = [task_fp, split]
        if not include_failures:
            where.append("e.status='ok'")
        if run_id is not None:
            where.append("e.code_hash IN (SELECT code_hash FROM proposals WHERE run_id=?"
                         + (" AND rollout=?" if rollout is not None else "") + ")")
            args += [run_id] + ([rollout] if rollout is not None else [])
        order = "e.score ASC, e.id ASC" if worst else "e.score DESC, e.id ASC"
        q = (f"SELECT e.*, f.code FROM evaluations e JOIN functions f USING(code_hash) WHERE {' AND '.join(where)}"
             f" ORDER BY {order} LIMIT ?")
        rows = [_row(r) for r in self._conn().execute(q, (*args, int(k)))]
        if not with_code:
            for r in rows:
                r.pop("code", None)
        return rows

    def history(self, task_fp: str, split: str = "val", limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Evaluations in the order they were made (oldest first), without per-image details."""
        q = ("SELECT id, task, split, code_hash, status, score, metric, error, duration_s, created FROM evaluations"
             " WHERE task_fp=? AND split=? ORDER BY id LIMIT ? OFFSET ?")
        return [dict(r) for r in self._conn().execute(q, (task_fp, split, int(limit), int(offset)))]

    def counts(self, task_fp: str) -> dict[str, Any]:
        rows = self._conn().execute("SELECT split, status, COUNT(*) n FROM evaluations WHERE task_fp=? "
                                    "GROUP BY split, status", (task_fp,)).fetchall()
        out: dict[str, Any] = {}
        for r in rows:
            out.setdefault(r["split"], {})[r["status"]] = r["n"]
        return out

    # -- runs and proposals -------------------------------------------------------------------
    def start_run(self, run_id: str, task: str, task_fp: str, proposer: str, config: dict[str, Any]) -> dict[str, Any]:
        """Create the run, or return the stored one (its config must match to resume)."""
        with self._tx() as c:
            row = c.execute("SELECT * FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                c.execute("INSERT INTO runs(run_id, task, task_fp, proposer, config, created) VALUES (?,?,?,?,?,?)",
                          (run_id, task, task_fp, proposer, json.dumps(config, sort_keys=True), time.time()))
                return {"run_id": run_id, "resumed": False}
        stored = json.loads(row["config"] or "{}")
        if row["task_fp"] != task_fp or row["proposer"] != proposer or stored != json.loads(json.dumps(config)):
            raise ToolError(f"Run {run_id!r} exists in {self.path} with different settings "
                            f"(task {row['task']}, proposer {row['proposer']}, {stored}).",
                            hint="Resume with the same arguments, or pass a new --run-id / --out.")
        return {"run_id": run_id, "resumed": True}

    def finish_run(self, run_id: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE runs SET finished=? WHERE run_id=?", (time.time(), run_id))

    def runs(self, task_fp: str | None = None) -> list[dict[str, Any]]:
        q, a = "SELECT * FROM runs", ()
        if task_fp:
            q, a = q + " WHERE task_fp=?", (task_fp,)
        return [dict(r) for r in self._conn().execute(q + " ORDER BY created", a)]

    def add_proposals(self, run_id: str, rows: list[dict[str, Any]], origin: str | None = None) -> None:
        """Store proposals ``{"rollout", "iteration", "slot", "code_hash", "code", "params"}`` in one transaction."""
        now = time.time()
        with self._tx() as c:
            for r in rows:
                c.execute("INSERT OR IGNORE INTO functions(code_hash, code, origin, created) VALUES (?,?,?,?)",
                          (r["code_hash"], r["code"], origin, now))
                c.execute("INSERT OR IGNORE INTO proposals(run_id, rollout, iteration, slot, code_hash, params, created)"
                          " VALUES (?,?,?,?,?,?,?)", (run_id, r["rollout"], r["iteration"], r["slot"], r["code_hash"],
                                                     json.dumps(r.get("params")), now))

    def proposals(self, run_id: str, task_fp: str, split: str = "val", *, rollout: int | None = None,
                  iteration: int | None = None) -> list[dict[str, Any]]:
        """Proposals of a run (ordered), each with its evaluation on ``split`` if there is one."""
        where, args = ["p.run_id=?"], [run_id]
        if rollout is not None:
            where.append("p.rollout=?")
            args.append(rollout)
        if iteration is not None:
            where.append("p.iteration=?")
            args.append(iteration)
        q = ("SELECT p.rollout, p.iteration, p.slot, p.code_hash, p.params, p.created, f.code, e.status, e.score, "
             "e.error, e.id AS eval_id FROM proposals p JOIN functions f USING(code_hash) LEFT JOIN evaluations e "
             "ON e.code_hash=p.code_hash AND e.task_fp=? AND e.split=? WHERE " + " AND ".join(where)
             + " ORDER BY p.iteration, p.rollout, p.slot")
        out = []
        for r in self._conn().execute(q, (task_fp, split, *args)):
            d = dict(r)
            d["params"] = json.loads(d["params"]) if d["params"] else None
            out.append(d)
        return out


def _row(r: sqlite3.Row) -> dict[str, Any]:
    d = dict(r)
    if isinstance(d.get("per_image"), str):
        d["per_image"] = json.loads(d["per_image"])
    return d


def default_bank_path() -> Path:
    from servers.common.config import get_config

    return Path(get_config().workspace) / "preprocess" / "bank.sqlite"


_BANKS: dict[str, Bank] = {}
_BANKS_LOCK = threading.Lock()


def get_bank(path: str | Path | None = None) -> Bank:
    """The bank at ``path`` (default ``<workspace>/preprocess/bank.sqlite``), one object per path."""
    p = str(Path(path or default_bank_path()).resolve())
    with _BANKS_LOCK:
        if p not in _BANKS:
            _BANKS[p] = Bank(p)
        return _BANKS[p]
