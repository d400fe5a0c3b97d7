"""Path confinement: every escape attempt is refused with a clear message."""

import os

import pytest

from servers.common.errors import ToolError
from servers.common.paths import confine, list_files, resolve_data_path, resolve_workspace_path


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    (r / "slides").mkdir(parents=True)
    (r / "slides" / "a.svs").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("top secret")
    os.symlink(tmp_path / "secret.txt", r / "link_out.txt")
    os.symlink(tmp_path, r / "dir_out")
    os.symlink(r / "slides" / "a.svs", r / "link_in.svs")
    return r


ESCAPES = [
    ("/etc/passwd", "Absolute path"),
    ("//etc/passwd", "Absolute path"),
    ("\\etc\\passwd", "Absolute path"),
    ("C:\\Windows\\system32", "Absolute path"),
    ("~/secret.txt", "Absolute path"),
    ("../secret.txt", "climbs out"),
    ("slides/../../secret.txt", "climbs out"),
    ("slides\\..\\..\\secret.txt", "climbs out"),
    ("%2e%2e/secret.txt", "climbs out"),
    ("%252e%252e/secret.txt", "climbs out"),
    ("..%2fsecret.txt", "climbs out"),
    ("%2Fetc%2Fpasswd", "Absolute path"),
    ("slides/a.svs\x00.png", "NUL"),
    ("link_out.txt", "outside"),
    ("dir_out/secret.txt", "outside"),
    ("\uff0e\uff0e/secret.txt", "climbs out"),  # fullwidth dots normalise to '..'
    ("", "Empty"),
]


@pytest.mark.parametrize("bad,fragment", ESCAPES)
def test_escape_attempts_are_refused(root, bad, fragment):
    with pytest.raises(ToolError) as e:
        confine(root, bad)
    assert fragment.lower() in str(e.value).lower()
    assert "secret" not in str(e.value).replace("secret.txt", "")  # never leaks file content


def test_inside_paths_resolve(root):
    assert confine(root, "slides/a.svs") == (root / "slides" / "a.svs").resolve()
    assert confine(root, "./slides/a.svs").name == "a.svs"
    assert confine(root, "link_in.svs") == (root / "slides" / "a.svs").resolve()  # symlink inside is fine


def test_missing_file_lists_neighbours(root):
    with pytest.raises(ToolError, match="a.svs"):
        confine(root, "slides/b.svs")
    assert confine(root, "slides/new.txt", must_exist=False).name == "new.txt"


def test_configured_roots(data_root, workspace_dir):
    (data_root / "x.csv").write_text("1")
    assert resolve_data_path("x.csv") == (data_root / "x.csv").resolve()
    with pytest.raises(ToolError, match="workspace"):
        resolve_workspace_path("../data/x.csv")
    with pytest.raises(ToolError):
        resolve_workspace_path(str(data_root / "x.csv"))


def test_list_files(root):
    files = list_files(root, ".", "*.svs")
    assert "slides/a.svs" in files
    with pytest.raises(ToolError):
        list_files(root, "../", "*")
