"""The workspace: a directory shared by all servers, holding artifacts and their SQLite index.

An artifact is a file a tool produced (image, labels, table, AnnData, GeoJSON, figure, code, …)
with an id, kind, path, shape/dtype or row count, provenance (tool + arguments) and creation
time. Several server processes may write at once: the index uses SQLite in WAL mode with a busy
timeout, and every file is written atomically before it is registered.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from servers.common.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from servers.common.errors import ToolError

INDEX_DIR = ".index"

KINDS = ("image", "labels", "mask", "table", "anndata", "geojson", "json", "figure", "code", "text", "file", "model")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    shape TEXT,
    dtype TEXT,
    n_rows INTEGER,
    bytes INTEGER,
    provenance TEXT,
    meta TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_kind ON artifacts(kind);
CREATE INDEX IF NOT EXISTS artifacts_created ON artifacts(created);
"""


@dataclass
class Artifact:
    id: str
    kind: str
    name: str
    path: str  # relative to the workspace root
    shape: list[int] | None = None
    dtype: str | None = None
    n_rows: int | None = None
    bytes: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["uri"] = f"artifact://{self.id}"
        return {k: v for k, v in d.items() if v not in (None, {}, [])}

    def summary(self) -> str:
        bits = [f"{self.id} ({self.kind}) {self.name}"]
        if self.shape:
            bits.append("shape=" + "x".join(map(str, self.shape)))
        if self.dtype:
            bits.append(f"dtype={self.dtype}")
        if self.n_rows is not None:
            bits.append(f"rows={self.n_rows}")
        return " ".join(bits)


def _jsonable(obj: Any) -> Any:
    """Provenance arguments made JSON-safe (arrays and objects become short descriptions)."""
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj][:100]
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        return f"<array {tuple(obj.shape)} {obj.dtype}>"
    return repr(obj)[:200]


class Workspace:
    """Artifacts under ``root`` with an index at ``root/index.sqlite``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        (self.root / "artifacts").mkdir(parents=True, exist_ok=True)
        # The index lives in its own folder so the sandbox can mount it read-only as a whole
        # (SQLite creates -wal/-shm files beside the database).
        (self.root / INDEX_DIR).mkdir(exist_ok=True)
        self.db_path = self.root / INDEX_DIR / "index.sqlite"
        # Inside the sandbox the index folder is mounted read-only: read it, never write it.
        self.read_only = self.db_path.exists() and not os.access(self.root / INDEX_DIR, os.W_OK)
        if not self.read_only:
            with self._connect() as con:
                con.executescript(_SCHEMA)

    # -- index ---------------------------------------------------------------------------------
    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            con = sqlite3.connect(f"file:{self.db_path}?immutable=1", uri=True, isolation_level=None)
            try:
                yield con
            finally:
                con.close()
            return
        con = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA synchronous=NORMAL")
            yield con
        finally:
            con.close()

    @staticmethod
    def new_id(kind: str) -> str:
        return f"{kind}-{secrets.token_hex(4)}"

    def _row_to_artifact(self, row: tuple) -> Artifact:
        (aid, kind, name, path, shape, dtype, n_rows, nbytes, prov, meta, created) = row
        return Artifact(
            id=aid,
            kind=kind,
            name=name,
            path=path,
            shape=json.loads(shape) if shape else None,
            dtype=dtype,
            n_rows=n_rows,
            bytes=nbytes,
            provenance=json.loads(prov) if prov else {},
            meta=json.loads(meta) if meta else {},
            created=created,
        )

    def register(
        self,
        kind: str,
        path: str | os.PathLike,
        *,
        name: str | None = None,
        artifact_id: str | None = None,
        shape: tuple[int, ...] | list[int] | None = None,
        dtype: str | None = None,
        n_rows: int | None = None,
        provenance: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Artifact:
        """Index a file that already lies inside the workspace."""
        if self.read_only:
            raise ToolError("The artifact index is read-only here (inside the sandbox).",
                            hint="Just write the file into the workspace: the sandbox registers new files "
                                 "as artifacts after each execute call.")
        if kind not in KINDS:
            raise ToolError(f"Unknown artifact kind {kind!r}.", hint=f"Use one of: {', '.join(KINDS)}.")
        p = Path(path).resolve()
        if self.root not in p.parents:
            raise ToolError(f"Artifact file {p} is not inside the workspace {self.root}.")
        if not p.exists():
            raise ToolError(f"Artifact file {p} does not exist.")
        art = Artifact(
            id=artifact_id or self.new_id(kind),
            kind=kind,
            name=name or p.name,
            path=str(p.relative_to(self.root)),
            shape=[int(s) for s in shape] if shape is not None else None,
            dtype=str(dtype) if dtype is not None else None,
            n_rows=int(n_rows) if n_rows is not None else None,
            bytes=p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file()),
            provenance=_jsonable(provenance or {}),
            meta=_jsonable(meta or {}),
            created=time.time(),
        )
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO artifacts VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    art.id,
                    art.kind,
                    art.name,
                    art.path,
                    json.dumps(art.shape) if art.shape is not None else None,
                    art.dtype,
                    art.n_rows,
                    art.bytes,
                    json.dumps(art.provenance),
                    json.dumps(art.meta),
                    art.created,
                ),
            )
        return art

    def get(self, artifact_id: str) -> Artifact:
        with self._connect() as con:
            row = con.execute("SELECT * FROM artifacts WHERE id=?", (artifact_id,)).fetchone()
        if row is None:
            raise ToolError(
                f"No artifact with id {artifact_id!r}.", hint="Call list_artifacts to see the ids that exist."
            )
        return self._row_to_artifact(row)

    def exists(self, artifact_id: str) -> bool:
        with self._connect() as con:
            return con.execute("SELECT 1 FROM artifacts WHERE id=?", (artifact_id,)).fetchone() is not None

    def list(self, kind: str | None = None, limit: int = 100) -> list[Artifact]:
        q, args = "SELECT * FROM artifacts", []
        if kind:
            q += " WHERE kind=?"
            args.append(kind)
        q += " ORDER BY created DESC LIMIT ?"
        args.append(int(limit))
        with self._connect() as con:
            rows = con.execute(q, args).fetchall()
        return [self._row_to_artifact(r) for r in rows]

    def delete(self, artifact_id: str) -> Artifact:
        art = self.get(artifact_id)
        try:
            p = self.abspath(art)
        except ToolError:  # a bad entry is removed from the index without touching any file
            p = None
        with self._connect() as con:
            con.execute("DELETE FROM artifacts WHERE id=?", (artifact_id,))
        if p is None:
            return art
        if p.is_file():
            p.unlink()
        elif p.is_dir():
            import shutil

            shutil.rmtree(p)
        return art

    def abspath(self, art: Artifact | str) -> Path:
        """The artifact's file, re-checked to lie inside the workspace (the index is data, not trust)."""
        if isinstance(art, str):
            art = self.get(art)
        p = (self.root / art.path).resolve()
        if self.root not in p.parents or INDEX_DIR in p.relative_to(self.root).parts[:1]:
            raise ToolError(f"Artifact {art.id} points outside the workspace ({art.path!r}); refusing to use it.",
                            hint="Delete it with delete_artifact and recreate it.")
        return p

    def resolve(self, ref: str) -> Path:
        """An artifact id or a workspace-relative path → absolute path inside the workspace."""
        if self.exists(ref):
            return self.abspath(ref)
        from servers.common.paths import confine

        ref_s = str(ref)
        if "/" not in ref_s and "\\" not in ref_s and "." not in ref_s and not (self.root / ref_s).exists():
            # looks like an artifact id (kind-hex), not a file path: say so rather than "no such file"
            raise ToolError(
                f"No artifact with id {ref_s!r} (and no such file in the workspace).",
                hint="Pass an artifact id returned by an earlier tool (list_artifacts shows them) "
                "or a workspace-relative file path.",
            )
        return confine(self.root, ref, what="workspace")

    def _target(self, kind: str, name: str | None, ext: str) -> tuple[str, Path]:
        aid = self.new_id(kind)
        stem = (Path(name).stem if name else kind).replace(" ", "_")[:60] or kind
        return aid, self.root / "artifacts" / f"{aid}_{stem}.{ext.lstrip('.')}"

    # -- writers -------------------------------------------------------------------------------
    def save_array(
        self,
        array,
        *,
        kind: str = "image",
        name: str | None = None,
        fmt: str = "npy",
        provenance: dict | None = None,
        meta: dict | None = None,
    ) -> Artifact:
        """Save a numpy array (``npy`` or ``tiff``)."""
        import numpy as np

        arr = np.asarray(array)
        aid, target = self._target(kind, name, fmt)
        with atomic_path(target) as tmp:
            if fmt == "npy":
                with open(tmp, "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)
            elif fmt in ("tif", "tiff"):
                import tifffile

                tifffile.imwrite(tmp, arr, compression="zlib")
            else:
                raise ToolError(f"Unknown array format {fmt!r}.", hint="Use 'npy' or 'tiff'.")
        return self.register(
            kind, target, name=name, artifact_id=aid, shape=arr.shape, dtype=str(arr.dtype),
            provenance=provenance, meta=meta,
        )

    def save_table(
        self, df, *, name: str | None = None, fmt: str = "parquet", provenance: dict | None = None,
        meta: dict | None = None,
    ) -> Artifact:
        """Save a pandas DataFrame as Parquet (default) or CSV."""
        aid, target = self._target("table", name, fmt)
        with atomic_path(target) as tmp:
            if fmt == "parquet":
                df.to_parquet(tmp)
            elif fmt == "csv":
                df.to_csv(tmp, index=True)
            else:
                raise ToolError(f"Unknown table format {fmt!r}.", hint="Use 'parquet' or 'csv'.")
        return self.register(
            "table", target, name=name, artifact_id=aid, n_rows=len(df), shape=list(df.shape),
            provenance=provenance, meta={"columns": [str(c) for c in df.columns][:200], **(meta or {})},
        )

    def save_anndata(self, adata, *, name: str | None = None, provenance: dict | None = None,
                     meta: dict | None = None) -> Artifact:
        aid, target = self._target("anndata", name, "h5ad")
        with atomic_path(target) as tmp:
            adata.write_h5ad(tmp)
        return self.register(
            "anndata", target, name=name, artifact_id=aid, shape=list(adata.shape), n_rows=adata.n_obs,
            provenance=provenance, meta=meta,
        )

    def save_json(self, obj, *, kind: str = "json", name: str | None = None, provenance: dict | None = None,
                  meta: dict | None = None) -> Artifact:
        ext = "geojson" if kind == "geojson" else "json"
        aid, target = self._target(kind, name, ext)
        atomic_write_text(target, json.dumps(obj, default=_json_default))
        n = len(obj.get("features", [])) if isinstance(obj, dict) and "features" in obj else None
        return self.register(kind, target, name=name, artifact_id=aid, n_rows=n, provenance=provenance, meta=meta)

    def save_bytes(self, data: bytes, *, kind: str = "figure", ext: str = "png", name: str | None = None,
                   provenance: dict | None = None, meta: dict | None = None) -> Artifact:
        aid, target = self._target(kind, name, ext)
        atomic_write_bytes(target, data)
        return self.register(kind, target, name=name, artifact_id=aid, provenance=provenance, meta=meta)

    def save_text(self, text: str, *, kind: str = "text", ext: str = "txt", name: str | None = None,
                  provenance: dict | None = None, meta: dict | None = None) -> Artifact:
        return self.save_bytes(text.encode("utf-8"), kind=kind, ext=ext, name=name, provenance=provenance, meta=meta)

    # -- readers -------------------------------------------------------------------------------
    def load(self, ref: str):
        """Load an artifact's content by its kind/extension (array, DataFrame, AnnData, dict, bytes)."""
        path = self.resolve(ref)
        suffix = path.suffix.lower()
        if suffix == ".npy":
            import numpy as np

            return np.load(path, allow_pickle=False)
        if suffix in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        if suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path)
        if suffix == ".csv":
            import pandas as pd

            return pd.read_csv(path, index_col=0)
        if suffix == ".h5ad":
            import anndata

            return anndata.read_h5ad(path)
        if suffix in (".json", ".geojson"):
            return json.loads(path.read_text())
        if suffix in (".txt", ".py", ".md"):
            return path.read_text()
        return path.read_bytes()


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@lru_cache(maxsize=4)
def _workspace_for(root: str) -> Workspace:
    return Workspace(root)


def get_workspace(root: str | os.PathLike | None = None) -> Workspace:
    """The workspace at ``root`` (default: the configured one)."""
    if root is None:
        from servers.common.config import get_config

        root = get_config().workspace
    return _workspace_for(str(Path(root).expanduser().resolve()))


get_workspace.cache_clear = _workspace_for.cache_clear  # type: ignore[attr-defined]
