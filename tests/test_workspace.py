"""Workspace artifacts: index, atomic writes, several processes at once, loading by kind."""

import json
import multiprocessing as mp

import numpy as np
import pandas as pd
import pytest

from servers.common.atomic import atomic_path, atomic_write_text
from servers.common.errors import ToolError
from servers.common.workspace import Workspace


def test_save_and_load_roundtrip(workspace):
    arr = np.arange(12, dtype=np.uint16).reshape(3, 4)
    a = workspace.save_array(arr, kind="labels", name="cells", provenance={"tool": "t", "args": {"x": arr}})
    assert a.id.startswith("labels-") and a.shape == [3, 4] and a.dtype == "uint16"
    assert a.provenance["args"]["x"] == "<array (3, 4) uint16>"
    np.testing.assert_array_equal(workspace.load(a.id), arr)
    t = workspace.save_table(pd.DataFrame({"a": [1, 2, 3]}), name="tab")
    assert t.n_rows == 3 and workspace.load(t.id)["a"].tolist() == [1, 2, 3]
    g = workspace.save_json({"type": "FeatureCollection", "features": [{}, {}]}, kind="geojson")
    assert g.n_rows == 2 and workspace.abspath(g).suffix == ".geojson"
    tif = workspace.save_array(arr, kind="image", fmt="tiff")
    np.testing.assert_array_equal(workspace.load(tif.id), arr)
    assert {x.id for x in workspace.list()} == {a.id, t.id, g.id, tif.id}
    assert [x.id for x in workspace.list(kind="labels")] == [a.id]


def test_get_delete_and_errors(workspace):
    a = workspace.save_text("hello", kind="code", ext="py")
    assert workspace.load(a.id) == "hello"
    assert workspace.get(a.id).to_dict()["uri"] == f"artifact://{a.id}"
    workspace.delete(a.id)
    assert not workspace.abspath(a).exists()
    with pytest.raises(ToolError, match="list_artifacts"):
        workspace.get(a.id)
    with pytest.raises(ToolError, match="kind"):
        workspace.save_bytes(b"x", kind="nonsense")
    with pytest.raises(ToolError, match="format"):
        workspace.save_array(np.zeros(2), fmt="jpeg")


def test_resolve_refuses_escape(workspace):
    with pytest.raises(ToolError):
        workspace.resolve("../../etc/passwd")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "atomic" / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def _writer(root: str, n: int, tag: int) -> list[str]:
    ws = Workspace(root)
    return [ws.save_json({"i": i, "tag": tag}, name=f"w{tag}_{i}").id for i in range(n)]


def test_concurrent_processes_share_the_index(workspace_dir):
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        ids = pool.starmap(_writer, [(str(workspace_dir), 15, t) for t in range(3)])
    ws = Workspace(workspace_dir)
    all_ids = {i for chunk in ids for i in chunk}
    assert len(all_ids) == 45
    listed = {a.id for a in ws.list(limit=1000)}
    assert listed == all_ids
    for a in ws.list(limit=5):
        assert json.loads(ws.abspath(a).read_text())["tag"] in (0, 1, 2)
    mode = __import__("sqlite3").connect(ws.db_path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_crafted_index_entry_is_refused(workspace, tmp_path):
    """A planted index row pointing outside the workspace is never followed."""
    (tmp_path / "outside.txt").write_text("secret")
    a = workspace.save_text("ok")
    with workspace._connect() as con:
        con.execute("UPDATE artifacts SET path=? WHERE id=?", ("../outside.txt", a.id))
    with pytest.raises(ToolError, match="outside the workspace"):
        workspace.load(a.id)
    workspace.delete(a.id)  # removes the row, leaves the outside file alone
    assert (tmp_path / "outside.txt").read_text() == "secret" and not workspace.exists(a.id)


def test_resolve_unknown_artifact_id_says_artifact(workspace):
    """An unknown id is reported as a missing artifact (not as a missing file listing .index etc.)."""
    with pytest.raises(ToolError) as e:
        workspace.resolve("table-nope")
    msg = str(e.value)
    assert "No artifact with id 'table-nope'" in msg and "list_artifacts" in msg and ".index" not in msg
    with pytest.raises(ToolError, match="No such file in the workspace"):
        workspace.resolve("artifacts/missing.parquet")
