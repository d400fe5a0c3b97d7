"""Library shared by every server (no MCP inside): config, paths, workspace, errors, images,
progress, executors."""

from servers.common.config import Config, get_config
from servers.common.errors import ToolError
from servers.common.paths import resolve_data_path, resolve_workspace_path
from servers.common.workspace import Artifact, Workspace, get_workspace

__all__ = [
    "Artifact",
    "Config",
    "ToolError",
    "Workspace",
    "get_config",
    "get_workspace",
    "resolve_data_path",
    "resolve_workspace_path",
]
