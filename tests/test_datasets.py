"""`cytoagent data fetch`: mirror copies verified by SHA-256, checksum failures, idempotence."""

import hashlib
import json
import subprocess
import sys

import pytest

from cytoagent import datasets
from servers.common.errors import ToolError
from tests.conftest import REPO, server_env


@pytest.fixture
def tiny_manifest(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "spots").mkdir(parents=True)
    files = {"spots/a.csv": b"1,2\n3,4\n", "spots/b.png": b"\x89PNG fake"}
    for rel, data in files.items():
        (mirror / rel).write_bytes(data)
    manifest = {"datasets": {"spots": {"description": "tiny", "files": {
        rel: [hashlib.sha256(d).hexdigest(), len(d)] for rel, d in files.items()}}}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    monkeypatch.setattr(datasets, "MANIFEST", path)
    return mirror


def test_fetch_from_mirror_then_idempotent(tiny_manifest, tmp_path):
    dest = tmp_path / "dest"
    r = datasets.fetch(["spots"], dest=dest, mirror=tiny_manifest)
    assert r["mirror"] == 2 and r["present"] == 0
    assert (dest / "spots" / "a.csv").read_bytes() == b"1,2\n3,4\n"
    r2 = datasets.fetch(["spots"], dest=dest, mirror=tiny_manifest)
    assert r2["present"] == 2 and r2["mirror"] == 0
    assert datasets.status(dest)[0]["present"] == 2


def test_corrupt_mirror_file_is_rejected(tiny_manifest, tmp_path):
    (tiny_manifest / "spots" / "a.csv").write_bytes(b"tampered")
    with pytest.raises(ToolError, match="could not be fetched") as e:
        datasets.fetch(["spots"], dest=tmp_path / "dest", mirror=tiny_manifest)
    assert "spots/a.csv" in str(e.value) and "--mirror" in str(e.value)
    assert not (tmp_path / "dest" / "spots" / "a.csv").exists()  # nothing unverified is left behind


def test_unknown_dataset_and_missing_mirror(tiny_manifest, tmp_path):
    with pytest.raises(ToolError, match="Known datasets: spots"):
        datasets.fetch(["nope"], dest=tmp_path)
    with pytest.raises(ToolError, match="does not exist"):
        datasets.fetch(["spots"], dest=tmp_path, mirror=tmp_path / "absent")


def test_manifest_matches_shared_data(shared_data):
    """The pinned checksums describe the real shared datasets (a spot check per dataset)."""
    m = datasets.load_manifest()
    assert set(m["datasets"]) == {"wsi", "he_nuclei", "fluo_nuclei", "spots", "spatial", "models"}
    for name in m["datasets"]:
        entry = datasets.dataset_files(name, m)[0]
        assert datasets.sha256_of(shared_data / entry.path) == entry.sha256, entry.path


def test_cli_fetch_from_shared_mirror(shared_data, tmp_path):
    out = subprocess.run([sys.executable, "-m", "cytoagent", "data", "fetch", "spots", "models",
                          "--mirror", str(shared_data), "--dest", str(tmp_path / "d")],
                         capture_output=True, text=True, env=server_env(), cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["files"] == 9 and res["mirror"] == 9
    assert (tmp_path / "d" / "spots" / "smfish.csv").is_file()
