"""Shared fixtures: an isolated config per test, in-memory and stdio MCP clients, shared data."""

from __future__ import annotations

import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CYTOAGENT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def data_root(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def workspace_dir(tmp_path) -> Path:
    d = tmp_path / "workspace"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def isolated_config(monkeypatch, data_root, workspace_dir):
    """Every test gets its own data root and workspace (and a fresh config cache)."""
    from servers.common.config import reset_config

    monkeypatch.setenv("CYTOAGENT_DATA_ROOT", str(data_root))
    monkeypatch.setenv("CYTOAGENT_WORKSPACE", str(workspace_dir))
    monkeypatch.setenv("CYTOAGENT_CONFIG", str(workspace_dir / "no-config.toml"))
    monkeypatch.setenv("FASTMCP_SHOW_SERVER_BANNER", "false")
    monkeypatch.setenv("FASTMCP_CHECK_FOR_UPDATES", "off")
    reset_config()
    yield
    reset_config()


@pytest.fixture
def workspace(workspace_dir):
    from servers.common.workspace import get_workspace

    return get_workspace(workspace_dir)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real datasets with ground truth); tests using it skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def shared_data_root(shared_data, monkeypatch):
    """Point the configured data root at the shared data folder."""
    from servers.common.config import reset_config

    monkeypatch.setenv("CYTOAGENT_DATA_ROOT", str(shared_data))
    reset_config()
    return shared_data


@pytest.fixture
def mcp_client():
    """``async with mcp_client("spatial") as c:`` — an in-memory fastmcp Client for a server."""
    from fastmcp import Client

    from cytoagent.discovery import get_spec, load_server

    @asynccontextmanager
    async def factory(name_or_server):
        server = load_server(get_spec(name_or_server)) if isinstance(name_or_server, str) else name_or_server
        async with Client(server) as c:
            yield c

    return factory


def server_env(**extra: str) -> dict[str, str]:
    """Environment for a server subprocess (stdio children do not inherit the parent's env)."""
    keep = ("PATH", "HOME", "CYTOAGENT_DATA_ROOT", "CYTOAGENT_WORKSPACE", "CYTOAGENT_CONFIG", "LANG",
            "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "CYTOAGENT_SERVER_PATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({"FASTMCP_SHOW_SERVER_BANNER": "false", "FASTMCP_CHECK_FOR_UPDATES": "off",
                "PYTHONPATH": str(REPO)})
    env.update(extra)
    return env


@pytest.fixture
def stdio_client():
    """``async with stdio_client("spatial") as c:`` — a real ``cytoagent serve NAME`` subprocess."""
    from fastmcp import Client
    from fastmcp.client.transports import StdioTransport

    @asynccontextmanager
    async def factory(name: str, *, args: list[str] | None = None, env: dict | None = None, timeout: float = 120):
        transport = StdioTransport(command=sys.executable, args=args or ["-m", "cytoagent", "serve", name],
                                   env=server_env(**(env or {})), cwd=str(REPO), keep_alive=False)
        async with Client(transport, timeout=timeout) as c:
            yield c

    return factory
