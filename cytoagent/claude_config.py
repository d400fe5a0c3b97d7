"""Claude Desktop (and any ``mcpServers``-style client) configuration for cytoagent's servers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from servers.common.atomic import atomic_write_text
from servers.common.config import get_config
from servers.common.errors import ToolError


def claude_desktop_config(
    *, data_root: str | None = None, workspace: str | None = None, python: str | None = None,
    names: list[str] | None = None, server_dirs: list[str] | None = None,
) -> dict:
    """``{"mcpServers": {...}}`` with one stdio entry per server, sharing data root and workspace."""
    from cytoagent.discovery import discover

    cfg = get_config()
    env = cfg.with_overrides(
        data_root=Path(data_root).expanduser().resolve() if data_root else None,
        workspace=Path(workspace).expanduser().resolve() if workspace else None,
    ).env()
    env["FASTMCP_SHOW_SERVER_BANNER"] = "false"
    env["FASTMCP_CHECK_FOR_UPDATES"] = "off"
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = repo_root  # works from a source checkout without installing
    dirs = list(server_dirs or [])
    if dirs:
        env["CYTOAGENT_SERVER_PATH"] = os.pathsep.join(str(Path(d).resolve()) for d in dirs)
    specs = discover(dirs)
    if names:
        unknown = sorted(set(names) - set(specs))
        if unknown:
            raise ToolError(f"Unknown servers: {', '.join(unknown)}.", hint=f"Known: {', '.join(sorted(specs))}.")
        specs = {n: specs[n] for n in names}
    py = python or sys.executable
    servers = {}
    for name, spec in specs.items():
        cmd = spec.command(py)
        servers[f"cytoagent-{name}"] = {"command": cmd[0], "args": cmd[1:], "env": dict(env)}
    return {"mcpServers": servers}


def merge_into_file(path: str | os.PathLike, cfg: dict) -> Path:
    """Add/replace our entries in an existing config file, keeping everything else; atomic write."""
    p = Path(path).expanduser()
    existing: dict = {}
    if p.exists() and p.read_text().strip():
        try:
            existing = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ToolError(f"{p} is not valid JSON ({e}); not touching it.", hint="Fix or move the file first.") from e
        if not isinstance(existing, dict):
            raise ToolError(f"{p} does not hold a JSON object.", hint="Fix or move the file first.")
    existing.setdefault("mcpServers", {}).update(cfg["mcpServers"])
    atomic_write_text(p, json.dumps(existing, indent=2) + "\n")
    return p
