"""Find MCP servers: built-in folders, extra folders, and installed entry points.

A server is any ``<dir>/<name>/server.py`` that defines a FastMCP instance (conventionally named
``mcp``). Built-ins live in this repository's ``servers/``; more folders can be added with
``CYTOAGENT_SERVER_PATH`` (os.pathsep-separated); installed packages add servers through the
``cytoagent.servers`` entry-point group (``name = "package.module:mcp"``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from servers.common.errors import ToolError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "servers"
ENTRY_POINT_GROUP = "cytoagent.servers"
_SKIP = {"common", "__pycache__"}


@dataclass(frozen=True)
class ServerSpec:
    name: str
    source: str  # "builtin" | "path" | "entrypoint"
    target: str  # module name ("servers.spatial.server"), file path, or "module:attr"
    description: str = ""

    def command(self, python: str | None = None) -> list[str]:
        """The stdio command line that starts this server."""
        return [python or sys.executable, "-m", "cytoagent", "serve", self.name]


def _docstring(path: Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _scan(directory: Path, source: str) -> dict[str, ServerSpec]:
    found: dict[str, ServerSpec] = {}
    if not directory.is_dir():
        return found
    for sub in sorted(directory.iterdir()):
        server_py = sub / "server.py"
        if sub.name in _SKIP or sub.name.startswith((".", "_")) or not server_py.is_file():
            continue
        target = f"servers.{sub.name}.server" if source == "builtin" else str(server_py)
        found[sub.name] = ServerSpec(sub.name, source, target, _docstring(server_py))
    return found


def discover(extra_dirs: list[str | os.PathLike] | None = None) -> dict[str, ServerSpec]:
    """All servers by name. Later sources do not override earlier ones (built-ins win)."""
    specs = _scan(BUILTIN_DIR, "builtin")
    dirs = list(extra_dirs or [])
    env = os.environ.get("CYTOAGENT_SERVER_PATH", "")
    dirs += [d for d in env.split(os.pathsep) if d]
    for d in dirs:
        for name, spec in _scan(Path(d).expanduser().resolve(), "path").items():
            specs.setdefault(name, spec)
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # pragma: no cover - broken metadata must not break discovery
        eps = []
    for ep in eps:
        specs.setdefault(ep.name, ServerSpec(ep.name, "entrypoint", ep.value, f"from package {ep.value}"))
    return specs


def get_spec(name: str, extra_dirs: list | None = None) -> ServerSpec:
    specs = discover(extra_dirs)
    if name not in specs:
        raise ToolError(f"No server named {name!r}.", hint=f"Known servers: {', '.join(sorted(specs)) or 'none'}.")
    return specs[name]


def _find_fastmcp(module) -> object:
    from fastmcp import FastMCP

    obj = getattr(module, "mcp", None)
    if isinstance(obj, FastMCP):
        return obj
    for value in vars(module).values():
        if isinstance(value, FastMCP):
            return value
    raise ToolError(f"{module.__name__} defines no FastMCP server.", hint="Define `mcp = FastMCP(...)` in server.py.")


def load_server(spec: ServerSpec):
    """Import a server's module and return its FastMCP instance."""
    if spec.source == "builtin":
        module = importlib.import_module(spec.target)
    elif spec.source == "path":
        # Load the folder as a uniquely named package so relative imports inside it work and two
        # drop-ins with the same module names cannot collide.
        pkg_name = f"cytoagent_ext_{spec.name}"
        folder = Path(spec.target).parent
        if pkg_name not in sys.modules:
            init = folder / "__init__.py"
            pkg_spec = importlib.util.spec_from_file_location(
                pkg_name, init if init.is_file() else None, submodule_search_locations=[str(folder)])
            if pkg_spec is None:  # a folder without __init__.py: a namespace-like package
                pkg_spec = importlib.machinery.ModuleSpec(pkg_name, None, is_package=True)
                pkg_spec.submodule_search_locations = [str(folder)]
            pkg = importlib.util.module_from_spec(pkg_spec)
            sys.modules[pkg_name] = pkg
            if pkg_spec.loader is not None:
                pkg_spec.loader.exec_module(pkg)
        module = importlib.import_module(f"{pkg_name}.server")
    else:
        mod, _, attr = spec.target.partition(":")
        module = importlib.import_module(mod)
        if attr:
            return getattr(module, attr)
    return _find_fastmcp(module)


def build_hub(specs: dict[str, ServerSpec]):
    """One FastMCP server mounting all given servers, tools namespaced ``<server>_<tool>``."""
    from cytoagent.mcpkit import create_server

    hub = create_server("cytoagent", "All cytoagent servers in one process; tool names are prefixed by server.",
                        artifacts=False)
    for name, spec in specs.items():
        hub.mount(load_server(spec), namespace=name)
    return hub
