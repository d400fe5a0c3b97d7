"""Turn what a sandbox call produced into workspace artifacts (done by the server, not the kernel)."""

from __future__ import annotations

from pathlib import Path

from servers.common.workspace import Artifact, Workspace

_KIND_BY_EXT = {
    ".png": "figure", ".jpg": "figure", ".jpeg": "figure", ".svg": "figure", ".pdf": "figure",
    ".npy": "image", ".npz": "image", ".tif": "image", ".tiff": "image", ".ome.tif": "image",
    ".zarr": "image", ".parquet": "table", ".csv": "table", ".tsv": "table", ".feather": "table",
    ".h5ad": "anndata", ".geojson": "geojson", ".json": "json", ".txt": "text", ".md": "text",
    ".log": "text", ".py": "code", ".pt": "model", ".onnx": "model", ".pkl": "file",
}


def kind_for(path: str | Path) -> str:
    """Artifact kind for a file name (by extension; ``file`` when unknown)."""
    name = Path(path).name.lower()
    for ext in sorted(_KIND_BY_EXT, key=len, reverse=True):
        if name.endswith(ext):
            return _KIND_BY_EXT[ext]
    return "file"


def register_files(ws: Workspace, rel_paths: list[str], provenance: dict, limit: int = 200) -> list[Artifact]:
    """Register workspace files as artifacts; a file already indexed keeps its id (entry refreshed)."""
    if not rel_paths:
        return []
    existing = {a.path: a for a in ws.list(limit=100_000)}
    out = []
    for rel in rel_paths[:limit]:
        p = ws.root / rel
        if not p.is_file() or p.is_symlink():
            continue
        old = existing.get(rel)
        kind = old.kind if old else kind_for(rel)
        meta = {}
        shape = dtype = None
        if kind == "image" and rel.endswith(".npy"):
            try:
                import numpy as np

                arr = np.load(p, mmap_mode="r", allow_pickle=False)
                shape, dtype = arr.shape, str(arr.dtype)
            except Exception:  # noqa: BLE001 — a malformed file is still a file
                kind = "file"
        out.append(ws.register(kind, p, artifact_id=old.id if old else None, name=Path(rel).name,
                               shape=shape, dtype=dtype, provenance=provenance, meta=meta))
    return out
