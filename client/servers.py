"""Connections to MCP servers over stdio: cytoagent's own (from discovery) and external ones from a
Claude-Desktop-style ``{"mcpServers": {...}}`` JSON file.

Tools are offered to models as ``<server>_<tool>``, sanitised to ``^[a-zA-Z0-9_-]{1,64}$`` (the
rule both OpenAI and Anthropic accept) with a reverse map back to (server, tool). A server that
dies mid-run is restarted (up to ``max_restarts`` times) and the failed call returns an error
outcome that tells the model what happened. Tool calls have a per-call timeout.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.providers.base import ToolOutcome, ToolSpec
from servers.common.errors import ToolError

log = logging.getLogger("cytoagent.client")

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_PASSTHROUGH_ENV = ("LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                    "CUDA_VISIBLE_DEVICES", "CYTOAGENT_SERVER_PATH", "CYTOAGENT_CONFIG", "XDG_CACHE_HOME",
                    "CYTOAGENT_SHARED_DATA", "CYTOAGENT_MODELS")

ProgressCallback = Callable[[str, float, float | None, str | None], Awaitable[None] | None]


@dataclass
class ServerConfig:
    """How to start one server: a stdio command (or an HTTP ``url`` for external servers)."""

    name: str
    command: str = ""
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    source: str = "cytoagent"  # "cytoagent" | "external" | "in-memory"
    server: Any = None  # a FastMCP instance connected in memory (tests, embedding) instead of a process

    def describe(self) -> dict[str, Any]:
        """For transcripts: the command line and the *names* of env vars (values may be secrets)."""
        cmd = [self.command, *self.args] if self.command else None
        return {"name": self.name, "source": self.source, "command": cmd, "url": self.url,
                "env_keys": sorted(self.env)}

    @classmethod
    def in_memory(cls, name: str, server: Any) -> ServerConfig:
        """A FastMCP server object connected in memory (no process; cannot crash separately)."""
        return cls(name=name, server=server, source="in-memory")


def server_env(*, data_root: str | os.PathLike | None = None, workspace: str | os.PathLike | None = None,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for our stdio servers (children do not inherit the parent's environment)."""
    from servers.common.config import get_config

    cfg = get_config().with_overrides(
        data_root=Path(data_root).expanduser().resolve() if data_root else None,
        workspace=Path(workspace).expanduser().resolve() if workspace else None,
    )
    env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
    env.update(cfg.env())
    pp = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(pp))
    env["FASTMCP_SHOW_SERVER_BANNER"] = "false"
    env["FASTMCP_CHECK_FOR_UPDATES"] = "off"
    env.update(extra or {})
    return env


def cytoagent_servers(names: list[str] | None = None, *, data_root: str | os.PathLike | None = None,
                      workspace: str | os.PathLike | None = None, server_dirs: list[str] | None = None,
                      python: str | None = None) -> dict[str, ServerConfig]:
    """Configs for our discovered servers (all of them when ``names`` is None)."""
    from cytoagent.discovery import discover

    dirs = [str(Path(d).expanduser().resolve()) for d in (server_dirs or [])]
    specs = discover(dirs)
    if names:
        unknown = [n for n in names if n not in specs]
        if unknown:
            raise ToolError(f"Unknown server(s): {', '.join(unknown)}.",
                            hint=f"Known servers: {', '.join(sorted(specs)) or 'none'}.")
        specs = {n: specs[n] for n in names}
    extra = {}
    if dirs:
        env_dirs = [d for d in os.environ.get("CYTOAGENT_SERVER_PATH", "").split(os.pathsep) if d]
        extra["CYTOAGENT_SERVER_PATH"] = os.pathsep.join(dict.fromkeys(dirs + env_dirs))
    env = server_env(data_root=data_root, workspace=workspace, extra=extra)
    out = {}
    for name, spec in specs.items():
        cmd = spec.command(python)
        out[name] = ServerConfig(name=name, command=cmd[0], args=cmd[1:], env=dict(env), cwd=str(REPO_ROOT))
    return out


def load_mcp_servers_json(path: str | os.PathLike) -> dict[str, ServerConfig]:
    """External servers from a Claude Desktop config (``{"mcpServers": {name: {command, args, env}}}``)."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ToolError(f"MCP config {p} does not exist.", hint="Pass a JSON file with an 'mcpServers' mapping.") from None
    except json.JSONDecodeError as e:
        raise ToolError(f"MCP config {p} is not valid JSON: {e}.") from None
    entries = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise ToolError(f"MCP config {p} has no 'mcpServers' mapping.",
                        hint='Expected {"mcpServers": {"name": {"command": "...", "args": [...], "env": {...}}}}.')
    out = {}
    for name, e in entries.items():
        if not isinstance(e, dict) or not (e.get("command") or e.get("url")):
            raise ToolError(f"MCP config {p}: server {name!r} needs a 'command' (stdio) or a 'url'.")
        if e.get("disabled"):
            continue
        args = e.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ToolError(f"MCP config {p}: 'args' of server {name!r} must be a list of strings.")
        env = {str(k): str(v) for k, v in (e.get("env") or {}).items()}
        out[name] = ServerConfig(name=name, command=e.get("command") or "", args=list(args), env=env,
                                 cwd=e.get("cwd"), url=e.get("url"), source="external")
    return out


# -- tool names ---------------------------------------------------------------------------------
def sanitize_name(name: str, taken: set[str] | None = None) -> str:
    """A provider-safe tool name (``^[a-zA-Z0-9_-]{1,64}$``), unique within ``taken``."""
    s = re.sub(r"[^a-zA-Z0-9_-]", "_", name) or "tool"
    digest = hashlib.sha1(name.encode()).hexdigest()
    if len(s) > 64:
        s = s[:55] + "_" + digest[:8]
    taken = taken if taken is not None else set()
    i = 0
    base = s
    while s in taken:
        i += 1
        s = base[:55] + "_" + digest[i: i + 8] if len(base) > 55 else f"{base}_{i}"
    return s


def clean_schema(schema: dict | None) -> dict:
    """An input schema for LLM APIs: an object schema without ``x-fastmcp-*`` keys."""
    def strip(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if not (isinstance(k, str) and k.startswith("x-fastmcp"))}
        if isinstance(o, list):
            return [strip(x) for x in o]
        return o

    s = strip(schema or {})
    if not isinstance(s, dict) or s.get("type") != "object":
        s = {"type": "object", "properties": {}, **({} if not isinstance(s, dict) else s)}
        s["type"] = "object"
    s.setdefault("properties", {})
    return s


def outcome_from_result(call_id: str, name: str, result: Any, duration_s: float = 0.0) -> ToolOutcome:
    """An MCP ``CallToolResult`` as a :class:`ToolOutcome` (text joined, images decoded)."""
    from client.providers.scripted import parse_value

    texts: list[str] = []
    images: list[bytes] = []
    types: list[str] = []
    for c in result.content or []:
        kind = getattr(c, "type", None)
        if kind == "text":
            texts.append(c.text)
        elif kind == "image":
            try:
                images.append(base64.b64decode(c.data))
                types.append(c.mime_type or "image/png")
            except (ValueError, TypeError):
                texts.append("[an image that could not be decoded]")
        elif kind == "resource":
            res = c.resource
            if getattr(res, "text", None) is not None:
                texts.append(f"[resource {res.uri}]\n{res.text}")
            else:
                texts.append(f"[binary resource {res.uri} ({getattr(res, 'mime_type', None) or 'unknown type'})]")
        elif kind == "resource_link":
            texts.append(f"[resource link: {c.uri}]")
        else:
            texts.append(f"[{kind} content omitted]")
    structured = result.structured_content
    value = parse_value(structured.get("value")) if isinstance(structured, dict) and "value" in structured else None
    return ToolOutcome(call_id=call_id, name=name, is_error=bool(result.is_error), text="\n".join(texts),
                       images=images, image_types=types, structured=structured, value=value, duration_s=duration_s)


# -- connections --------------------------------------------------------------------------------
class ServerConnection:
    """One running server: start, list tools, call, restart."""

    def __init__(self, config: ServerConfig, *, log_dir: Path | None = None, init_timeout_s: float = 120):
        self.config = config
        self.log_dir = log_dir
        self.init_timeout_s = init_timeout_s
        self.client: Any = None
        self.tools: list[Any] = []
        self.restarts = 0
        self.disabled: str | None = None  # why the server is not used any more in this run
        self.generation = 0  # bumped on every (re)start, so concurrent callers restart only once
        self.lock = asyncio.Lock()
        self._stack: AsyncExitStack | None = None
        self._log_file = None

    def _transport(self):
        from fastmcp.client.transports import StdioTransport

        if self.config.server is not None:
            return self.config.server
        if self.config.url:
            return self.config.url
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if self._log_file is None:
                self._log_file = open(self.log_dir / f"{self.config.name}.stderr.log", "a", encoding="utf-8")  # noqa: SIM115
            log_file = self._log_file
        else:
            log_file = None
        return StdioTransport(command=self.config.command, args=list(self.config.args), env=dict(self.config.env),
                              cwd=self.config.cwd, keep_alive=False, log_file=log_file)

    async def start(self) -> None:
        from fastmcp import Client

        stack = AsyncExitStack()
        try:
            client = Client(self._transport(), init_timeout=self.init_timeout_s)
            await asyncio.wait_for(stack.enter_async_context(client), self.init_timeout_s)
            self.tools = list(await asyncio.wait_for(client.list_tools(), self.init_timeout_s))
        except BaseException as e:
            await _quiet_close(stack)
            if isinstance(e, asyncio.CancelledError):
                raise
            where = f" (its stderr is in {self.log_dir / (self.config.name + '.stderr.log')})" if self.log_dir else ""
            raise ToolError(f"Could not start MCP server {self.config.name!r}: {type(e).__name__}: {e}{where}.",
                            hint="Check the server's command and that `cytoagent servers list` shows it.") from e
        self.client, self._stack = client, stack
        self.generation += 1

    async def stop(self) -> None:
        stack, self._stack, self.client = self._stack, None, None
        if stack is not None:
            await _quiet_close(stack)

    async def close(self) -> None:
        await self.stop()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    async def restart(self) -> None:
        await self.stop()
        self.restarts += 1
        await self.start()


async def _quiet_close(stack: AsyncExitStack) -> None:
    try:
        await asyncio.wait_for(stack.aclose(), 15)
    except BaseException as e:  # noqa: BLE001 - a dead server may fail to close cleanly
        if isinstance(e, asyncio.CancelledError) and asyncio.current_task().cancelling():
            raise
        log.debug("closing server connection: %s", e)


def _is_connection_lost(e: BaseException) -> bool:
    import anyio

    if isinstance(e, (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream,
                      BrokenPipeError, ConnectionError, EOFError)):
        return True
    msg = str(e).lower()
    return "connection closed" in msg or "not connected" in msg or "closed resource" in msg


def _is_timeout(e: BaseException) -> bool:
    return isinstance(e, (asyncio.TimeoutError, TimeoutError)) or "timed out" in str(e).lower()


class ServerPool:
    """All servers of one run; ``async with ServerPool(configs) as pool: await pool.call(name, args)``."""

    def __init__(self, configs: dict[str, ServerConfig] | list[ServerConfig], *, log_dir: str | os.PathLike | None = None,
                 max_restarts: int = 3, init_timeout_s: float = 120, dedupe: bool = True):
        cfgs = list(configs.values()) if isinstance(configs, dict) else list(configs)
        # servers' stderr goes to files (a temp folder by default), never onto the user's terminal
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="cytoagent-server-logs-"))
        self.max_restarts = max_restarts
        self.dedupe = dedupe
        self.connections: dict[str, ServerConnection] = {
            c.name: ServerConnection(c, log_dir=self.log_dir, init_timeout_s=init_timeout_s) for c in cfgs}
        self.tool_map: dict[str, tuple[str, str]] = {}  # exposed name -> (server, tool)
        self.specs: list[ToolSpec] = []
        self._schemas: dict[str, dict] = {}

    async def __aenter__(self) -> ServerPool:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        results = await asyncio.gather(*(c.start() for c in self.connections.values()), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.close()
            raise errors[0]
        self._build_tool_map()

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.connections.values()), return_exceptions=True)

    def _build_tool_map(self) -> None:
        """Exposed names → (server, tool). Tools that several of *our* servers define identically
        (list_artifacts, artifact_info, … over the one shared workspace) are offered to the model once
        (``dedupe``), but every server's copy stays callable by its exposed name."""
        self.tool_map.clear()
        self.specs = []
        taken: set[str] = set()
        offered: dict[tuple, int] = {}
        for sname, conn in self.connections.items():
            for t in conn.tools:
                exposed = sanitize_name(f"{sname}_{t.name}", taken)
                taken.add(exposed)
                self.tool_map[exposed] = (sname, t.name)
                schema = clean_schema(t.input_schema)
                self._schemas[exposed] = schema
                desc = (t.description or "").strip()
                key = (t.name, desc, json.dumps(schema, sort_keys=True))
                if self.dedupe and conn.config.source == "cytoagent" and key in offered:
                    first = self.specs[offered[key]]
                    first.description = first.description.replace("] ", f", {sname}] ", 1)
                    continue
                if conn.config.source == "cytoagent":
                    offered[key] = len(self.specs)
                self.specs.append(ToolSpec(name=exposed, description=f"[{sname}] {desc}"[:4000], input_schema=schema))

    def tools(self, servers: list[str] | None = None) -> list[ToolSpec]:
        if servers is None:
            return list(self.specs)
        return [s for s in self.specs if self.tool_map[s.name][0] in servers]

    def schema(self, exposed: str) -> dict | None:
        return self._schemas.get(exposed)

    def find_tool(self, server: str, tool: str) -> str | None:
        """The exposed name of a server's tool, if connected."""
        for exposed, (s, t) in self.tool_map.items():
            if s == server and t == tool:
                return exposed
        return None

    def suggest(self, name: str, n: int = 5) -> list[str]:
        import difflib

        return difflib.get_close_matches(name, list(self.tool_map), n=n, cutoff=0.4)

    async def call(self, exposed: str, arguments: Any, *, call_id: str = "", timeout_s: float | None = None,
                   progress: ProgressCallback | None = None) -> ToolOutcome:
        """Call a tool by its exposed name. Never raises for tool-level problems: unknown tools, bad
        arguments, timeouts and crashed servers all come back as error outcomes with a clear text."""
        t0 = time.monotonic()

        def err(text: str) -> ToolOutcome:
            return ToolOutcome(call_id=call_id, name=exposed, is_error=True, text=text,
                               duration_s=time.monotonic() - t0)

        if exposed not in self.tool_map:
            close = self.suggest(exposed)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            return err(f"Unknown tool {exposed!r}.{hint} Call only the tools listed for you; "
                       f"{len(self.tool_map)} are available.")
        if isinstance(arguments, str):
            return err(f"The arguments for {exposed!r} are not valid JSON: {arguments[:300]!r}. "
                       "Pass a JSON object whose keys are the tool's parameter names.")
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            return err(f"The arguments for {exposed!r} must be a JSON object, not {type(arguments).__name__}.")
        sname, tname = self.tool_map[exposed]
        conn = self.connections[sname]
        if conn.disabled:
            return err(f"Server {sname!r} is unavailable for the rest of this run ({conn.disabled}); "
                       "continue without its tools.")
        if conn.client is None:
            async with conn.lock:
                if conn.client is None:
                    try:
                        await conn.restart()
                    except ToolError as e:
                        return err(f"Server {sname!r} is not running and could not be restarted: {e}")
        generation = conn.generation

        handler = None
        if progress is not None:
            async def handler(p: float, total: float | None, message: str | None) -> None:
                r = progress(exposed, p, total, message)
                if asyncio.iscoroutine(r):
                    await r

        try:
            result = await conn.client.call_tool_mcp(tname, arguments, timeout=timeout_s, progress_handler=handler)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - classified into messages for the model
            if _is_connection_lost(e):
                return await self._after_crash(conn, exposed, e, err, generation)
            if _is_timeout(e):
                return err(f"Tool {exposed!r} did not finish within the per-step timeout of {timeout_s:g} s and "
                           "was cancelled. Use a smaller input (a region, fewer items) or ask for a longer "
                           "--step-timeout.")
            return err(f"Calling {exposed!r} failed: {type(e).__name__}: {e}")
        return outcome_from_result(call_id, exposed, result, time.monotonic() - t0)

    async def _after_crash(self, conn: ServerConnection, exposed: str, e: BaseException,
                           err: Callable[[str], ToolOutcome], generation: int) -> ToolOutcome:
        sname = conn.config.name
        async with conn.lock:
            if conn.generation != generation and conn.client is not None:
                return err(f"Server {sname!r} stopped while running {exposed!r} ({e}); it has already been "
                           "restarted (in-memory state such as sandbox sessions was lost; workspace artifacts "
                           "remain). Retry the call if it is needed.")
            if conn.restarts >= self.max_restarts:
                await conn.stop()
                conn.disabled = f"it crashed {conn.restarts + 1} times"
                return err(f"Server {sname!r} stopped while running {exposed!r} ({e}) and has already been "
                           f"restarted {conn.restarts} times; it is not restarted again. Its tools are unavailable "
                           "for the rest of this run; continue without them.")
            try:
                await conn.restart()
            except ToolError as re_err:
                return err(f"Server {sname!r} stopped while running {exposed!r} ({e}) and could not be "
                           f"restarted: {re_err}")
            self._build_tool_map()
        return err(f"Server {sname!r} stopped (crashed) while running {exposed!r} ({e}). It has been restarted "
                   f"(restart {conn.restarts} of at most {self.max_restarts}); anything held in that server's "
                   "memory, such as sandbox sessions and their variables, was lost, but artifacts saved in the "
                   "workspace remain. Retry the call only if it is needed, perhaps with a smaller input.")
