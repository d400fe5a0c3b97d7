"""Confine user-supplied paths to a root directory.

Tools accept paths *relative* to the read-only data root (or the workspace). Anything that could
reach outside — absolute paths, ``..`` segments, ``~``, URL-encoded or NUL tricks, symlinks that
point out of the root — is refused with a ToolError that says what to pass instead.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import unquote

from servers.common.errors import ToolError

_DRIVE = re.compile(r"^[A-Za-z]:")


def _check_relative(user_path: str, what: str) -> PurePosixPath:
    if not isinstance(user_path, str) or not user_path.strip():
        raise ToolError(f"Empty {what} path.", hint=f"Pass a path relative to the {what} root, e.g. 'slides/a.svs'.")
    if "\x00" in user_path:
        raise ToolError(f"The {what} path contains a NUL byte.", hint="Pass a plain relative path.")
    decoded = user_path
    for _ in range(3):  # catch double-encoding such as %252e%252e
        nxt = unquote(decoded)
        if nxt == decoded:
            break
        decoded = nxt
    decoded = unicodedata.normalize("NFKC", decoded)
    for candidate in {user_path, decoded}:
        if candidate.startswith(("/", "\\", "~")) or _DRIVE.match(candidate) or PureWindowsPath(candidate).is_absolute():
            raise ToolError(
                f"Absolute path {user_path!r} is not allowed.",
                hint=f"Pass a path relative to the {what} root (list files to see what is there).",
            )
        parts = re.split(r"[\\/]+", candidate)
        if any(p == ".." for p in parts):
            raise ToolError(
                f"Path {user_path!r} climbs out of the {what} root with '..'.",
                hint=f"Pass a path inside the {what} root.",
            )
    return PurePosixPath(user_path.replace("\\", "/"))


def confine(root: str | os.PathLike, user_path: str, *, what: str = "data", must_exist: bool = True) -> Path:
    """Resolve ``user_path`` inside ``root``; refuse anything that escapes it.

    Symlinks are followed and the *resolved* target must still be inside the resolved root.
    """
    rel = _check_relative(user_path, what)
    root_resolved = Path(root).expanduser().resolve()
    target = (root_resolved / rel).resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise ToolError(
            f"Path {user_path!r} resolves outside the {what} root (a symlink points out of it).",
            hint=f"Pass a path whose real location is inside {root_resolved}.",
        )
    if must_exist and not target.exists():
        parent = target.parent
        near = ""
        if parent.is_dir():
            names = sorted(p.name for p in parent.iterdir())[:12]
            near = f" Files in {parent.relative_to(root_resolved) if parent != root_resolved else '.'}: {', '.join(names) or '(empty)'}."
        raise ToolError(f"No such file in the {what} root: {user_path!r}.{near}")
    return target


def resolve_data_path(user_path: str, root: str | os.PathLike | None = None, *, must_exist: bool = True) -> Path:
    """A path under the configured data root (read-only by convention)."""
    if root is None:
        from servers.common.config import get_config

        root = get_config().data_root
    return confine(root, user_path, what="data", must_exist=must_exist)


def resolve_workspace_path(user_path: str, root: str | os.PathLike | None = None, *, must_exist: bool = True) -> Path:
    """A path under the configured workspace."""
    if root is None:
        from servers.common.config import get_config

        root = get_config().workspace
    return confine(root, user_path, what="workspace", must_exist=must_exist)


def list_files(root: str | os.PathLike, subdir: str = ".", pattern: str = "*", limit: int = 500) -> list[str]:
    """Relative paths of files under ``root/subdir`` matching ``pattern`` (recursive)."""
    base = confine(root, subdir, what="data") if subdir not in ("", ".") else Path(root).resolve()
    root_resolved = Path(root).resolve()
    out = []
    for p in sorted(base.rglob(pattern)):
        if p.is_file():
            out.append(str(p.relative_to(root_resolved)))
            if len(out) >= limit:
                break
    return out
