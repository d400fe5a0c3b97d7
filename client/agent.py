"""The agent loop: a provider (LLM or scripted plan) chains MCP tools (tools mode) or writes Python
that runs in the sandbox server (code mode), with a step limit, per-step timeouts, final-answer
extraction (JSON when asked) and a transcript + report of everything.

    from client.agent import run_agent_sync
    from client.providers import get_provider
    res = run_agent_sync("How many nuclei …?", get_provider("anthropic"), servers=["wsi"], out_dir="runs/a")
    print(res.answer, res.report_path, res.usage.cost_usd)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import prompts
from client.providers.base import Message, Provider, ProviderError, ProviderResponse, ToolOutcome, Usage
from client.servers import ServerConfig, ServerPool, cytoagent_servers, load_mcp_servers_json
from client.transcript import EventSink, Transcript
from servers.common.errors import ToolError

MODES = ("tools", "code", "llm")  # llm: no tools at all (the NOVA "LLM-only" ablation)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
_FENCE = re.compile(r"```[ \t]*(python|py|python3)?[ \t]*\n(.*?)```", re.S | re.I)
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_JSON_FENCE = re.compile(r"```[ \t]*json[ \t]*\n(.*?)```", re.S | re.I)


@dataclass
class RunResult:
    """What a run produced. ``answer`` is parsed JSON when the question asked for JSON (or when the
    answer text is JSON), else the answer text; None when the run ended without an answer."""

    question: str
    answer: Any = None
    answer_text: str | None = None
    ok: bool = False
    error: str | None = None
    stop_reason: str = "no_answer"  # answer | max_steps | error | no_answer
    steps: int = 0
    tool_calls: int = 0
    usage: Usage = field(default_factory=Usage)
    out_dir: Path | None = None
    transcript_path: Path | None = None
    report_path: Path | None = None
    html_path: Path | None = None
    duration_s: float = 0.0
    outcomes: list[ToolOutcome] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"question": self.question, "answer": self.answer, "answer_text": self.answer_text, "ok": self.ok,
                "error": self.error, "stop_reason": self.stop_reason, "steps": self.steps,
                "tool_calls": self.tool_calls, "usage": self.usage.to_dict(), "out_dir": str(self.out_dir),
                "transcript_path": str(self.transcript_path), "report_path": str(self.report_path),
                "html_path": str(self.html_path), "duration_s": round(self.duration_s, 3)}


# -- answer and code extraction -----------------------------------------------------------------
def wants_json(question: str) -> bool:
    """Whether a question asks for a JSON answer."""
    return bool(re.search(r"\bjson\b", question, re.I))


def _parse_json_loose(s: str) -> tuple[bool, Any]:
    s = s.strip()
    m = _JSON_FENCE.search(s)
    if m:
        s = m.group(1).strip()
    elif s.startswith("```"):
        s = s.strip("`").strip()
    try:
        return True, json.loads(s)
    except (json.JSONDecodeError, ValueError):
        pass
    # the last balanced {...} or [...] in the text
    dec = json.JSONDecoder()
    found = None
    for i, ch in enumerate(s):
        if ch in "{[":
            try:
                obj, _end = dec.raw_decode(s, i)
            except json.JSONDecodeError:
                continue
            found = obj
    return (found is not None), found


def extract_answer(text: str, *, want_json: bool = False) -> tuple[Any, str | None, bool]:
    """(answer, answer_text, json_ok). Takes the last ``<answer>…</answer>`` (else the whole text);
    parses JSON when asked (json_ok False when that fails); otherwise objects/arrays and plain
    numbers are parsed and anything else stays text."""
    if not text or not text.strip():
        return None, None, not want_json
    tags = _ANSWER.findall(text)
    raw = (tags[-1] if tags else text).strip()
    if want_json:
        ok, val = _parse_json_loose(raw)
        return (val, raw, True) if ok else (raw, raw, False)
    if raw[:1] in "{[" or raw.startswith("```json"):
        ok, val = _parse_json_loose(raw)
        if ok:
            return val, raw, True
    if _NUMBER.fullmatch(raw):
        return json.loads(raw), raw, True
    return raw, raw, True


def extract_code(text: str) -> str | None:
    """The Python in a reply's fenced code blocks (python/py/unlabelled; several are joined)."""
    blocks = [m.group(2) for m in _FENCE.finditer(text or "")
              if (m.group(1) or "").lower() in ("python", "py", "python3", "")]
    code = "\n".join(b.rstrip() for b in blocks if b.strip())
    return code or None


def format_observation(o: ToolOutcome, max_chars: int = 20_000) -> str:
    """What a code-mode model sees after its code ran."""
    from client.providers.base import outcome_text_for_model

    head = "Observation (error):" if o.is_error else "Observation:"
    extra = f"\n[{len(o.images)} figure(s) attached]" if o.images else ""
    return f"{head}\n{outcome_text_for_model(o, max_chars)}{extra}"


# -- the run ------------------------------------------------------------------------------------
class _Run:
    def __init__(self, question: str, provider: Provider, pool: ServerPool, *, mode: str, max_steps: int,
                 step_timeout_s: float, transcript: Transcript, json_answer: bool, data_root: str,
                 workspace: str, system: str | None, session: str | None, wrap_up: bool,
                 history: list[Message] | None = None):
        self.q = question
        self.provider = provider
        self.pool = pool
        self.mode = mode
        self.max_steps = max_steps
        self.step_timeout_s = step_timeout_s
        self.tr = transcript
        self.json_answer = json_answer
        self.data_root = data_root
        self.workspace = workspace
        self.system = system or prompts.system_prompt(mode, data_root=data_root, workspace=workspace,
                                                      json_answer=json_answer)
        self.session = session or f"agent-{uuid.uuid4().hex[:10]}"
        self.wrap_up = wrap_up
        self.messages: list[Message] = history if history is not None else []
        self.messages.append(Message("user", text=question))
        self.result = RunResult(question=question)
        self.exec_tool = pool.find_tool("sandbox", "execute") or next(
            (n for n, (_s, t) in pool.tool_map.items() if t == "execute"), None)
        self._session_ready = False
        self._last_progress = 0.0

    # tool / code execution ------------------------------------------------------------------
    async def _progress(self, name: str, p: float, total: float | None, message: str | None) -> None:
        now = time.monotonic()
        if (total is not None and p >= total) or now - self._last_progress >= 0.5:  # throttled
            self._last_progress = now
            self.tr.event("progress", name=name, progress=p, total=total, message=message)

    def _exec_args(self, args: dict[str, Any]) -> dict[str, Any]:
        schema = self.pool.schema(self.exec_tool) or {}
        props = schema.get("properties", {})
        args = dict(args)
        if "session" in props and "session" not in args:
            args["session"] = self.session
        if "timeout_s" in props and "timeout_s" not in args:
            args["timeout_s"] = self.step_timeout_s
        return args

    async def _ensure_session(self) -> None:
        """Define DATA / WORKSPACE in the run's sandbox session (created by its first execute), as the
        code-mode prompt promises; harmless in tools mode."""
        if self._session_ready or self.exec_tool is None:
            return
        self._session_ready = True
        o = await self.pool.call(self.exec_tool, self._exec_args({"code": prompts.code_preamble(
            self.data_root, self.workspace)}), call_id="preamble", timeout_s=120)
        if o.is_error:
            self.tr.event("notice", text=f"Could not prepare the sandbox session: {o.text[:500]}")

    async def _call(self, name: str, args: Any, call_id: str) -> ToolOutcome:
        if self.exec_tool is not None and name == self.exec_tool and isinstance(args, dict):
            await self._ensure_session()
            args = self._exec_args(args)
        self.tr.event("tool_call", step=self.result.steps, call_id=call_id, name=name, arguments=args)
        timeout = self.step_timeout_s + (15 if name == self.exec_tool else 0)
        o = await self.pool.call(name, args, call_id=call_id, timeout_s=timeout, progress=self._progress)
        self._record(o)
        return o

    def _record(self, o: ToolOutcome) -> None:
        self.result.tool_calls += 1
        self.result.outcomes.append(o)
        figs = self.tr.save_images(o.images, o.image_types, o.name) if o.images else []
        self.tr.event("tool_result", step=self.result.steps, call_id=o.call_id, name=o.name, is_error=o.is_error,
                      text=o.text[:50_000], structured=o.structured, value=o.value, figures=figs,
                      duration_s=round(o.duration_s, 3))

    # the loop --------------------------------------------------------------------------------
    async def _ask(self, tools: list, tool_choice: str = "auto") -> ProviderResponse:
        if tool_choice == "auto":
            resp = await self.provider.complete(self.system, self.messages, tools)
        else:
            resp = await self.provider.complete(self.system, self.messages, tools, tool_choice=tool_choice)
        self.result.usage.add(resp.usage)
        self.tr.event("model", step=self.result.steps, text=resp.text,
                      tool_calls=[{"id": c.id, "name": c.name, "arguments": c.arguments} for c in resp.tool_calls],
                      usage=resp.usage.to_dict(), stop_reason=resp.stop_reason, model=resp.model)
        return resp

    def _finish(self, text: str, reason: str = "answer") -> bool:
        """Record a final answer; returns False when a JSON answer was asked for and is malformed."""
        ans, raw, ok = extract_answer(text, want_json=self.json_answer)
        self.result.answer, self.result.answer_text = ans, raw
        self.result.stop_reason = reason if raw is not None else "no_answer"
        self.result.ok = raw is not None and ok
        return ok

    async def run(self) -> RunResult:
        tools = self.pool.tools() if self.mode == "tools" else []
        json_retry_used = False
        nudged = False
        while self.result.steps < self.max_steps:
            self.result.steps += 1
            self.tr.event("step", step=self.result.steps)
            resp = await self._ask(tools)
            self.messages.append(Message("assistant", text=resp.text, tool_calls=list(resp.tool_calls)))
            if self.mode == "tools" and resp.tool_calls:
                outcomes = [await self._call(c.name, c.arguments, c.id) for c in resp.tool_calls]
                self.messages.append(Message("tool", results=outcomes))
                continue
            code = extract_code(resp.text) if self.mode == "code" else None
            if code is not None:
                if self.exec_tool is None:
                    raise ToolError("Code mode needs the sandbox server's execute tool.",
                                    hint="Add the 'sandbox' server to the run.")
                self.tr.event("code", step=self.result.steps, code=code)
                o = await self._call(self.exec_tool, {"code": code}, f"code_{self.result.steps}")
                self.messages.append(Message("user", text=format_observation(o), outcome=o))
                continue
            if self.mode == "code" and not nudged and (not resp.text.strip() or not _ANSWER.search(resp.text)):
                nudged = True  # once: a reply with neither code nor <answer> tags
                self.messages.append(Message("user", text=prompts.NO_CODE))
                self.tr.event("notice", text="Reply had neither code nor an <answer>; asked for one of them.")
                continue
            ok = self._finish(resp.text)
            if not ok and not json_retry_used and self.result.steps < self.max_steps:
                json_retry_used = True
                self.tr.event("notice", text="The answer is not valid JSON; asked the model to correct it.")
                self.messages.append(Message("user", text=prompts.JSON_REMINDER))
                continue
            return self.result
        # step limit reached
        self.tr.event("notice", text=f"Step limit ({self.max_steps}) reached.")
        self.result.stop_reason = "max_steps"
        if self.wrap_up:
            self.messages.append(Message("user", text=prompts.WRAP_UP))
            self.tr.event("step", step=self.result.steps + 1)
            # tools stay declared (the history holds tool calls, which APIs only accept with tools)
            # but the model is asked for text only
            tools_now = self.pool.tools() if self.mode == "tools" else []
            resp = await self._ask(tools_now, tool_choice="none" if tools_now else "auto")
            self.messages.append(Message("assistant", text=resp.text))
            if resp.text.strip():
                self._finish(resp.text, reason="max_steps")
                self.result.ok = False  # answered, but only because the budget ran out
        return self.result


def _resolve_servers(servers: Any, mcp_config: Any, mode: str, data_root: str | None, workspace: str | None,
                     server_dirs: list[str] | None) -> dict[str, ServerConfig]:
    if isinstance(servers, dict):
        configs = dict(servers)
    else:
        names = list(servers) if servers else None
        if names is None and mode == "code":
            names = ["sandbox"]
        configs = cytoagent_servers(names, data_root=data_root, workspace=workspace, server_dirs=server_dirs)
    if mcp_config:
        for name, cfg in load_mcp_servers_json(mcp_config).items():
            if name in configs:
                raise ToolError(f"External server {name!r} has the same name as one of ours.",
                                hint="Rename it in the mcpServers JSON.")
            configs[name] = cfg
    if not configs:
        raise ToolError("No MCP servers to connect to.", hint="Pass --servers NAMES or --mcp-config FILE.")
    return configs


async def run_agent(
    question: str,
    provider: Provider,
    *,
    servers: list[str] | dict[str, ServerConfig] | None = None,
    mcp_config: str | os.PathLike | None = None,
    pool: ServerPool | None = None,
    mode: str = "tools",
    max_steps: int = 20,
    step_timeout_s: float = 600,
    out_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    workspace: str | os.PathLike | None = None,
    json_answer: bool | None = None,
    system: str | None = None,
    on_event: EventSink | None = None,
    server_dirs: list[str] | None = None,
    session: str | None = None,
    history: list[Message] | None = None,
) -> RunResult:
    """Answer one question with a provider over MCP servers; always writes a transcript and report.

    Args:
        question: The user's question (paths in it are relative to the data root).
        provider: From :func:`client.providers.get_provider` (anthropic, openai, openai-compatible, scripted).
        servers: Our server names (default: all discovered in tools mode, ``["sandbox"]`` in code
            mode) or ready ``ServerConfig``s by name.
        mcp_config: A Claude-Desktop-style ``{"mcpServers": …}`` JSON file of external servers to add.
        pool: An already started :class:`ServerPool` to reuse (e.g. across many eval questions);
            ``servers``/``mcp_config`` are then ignored and the pool is left running.
        mode: "tools" (function calling over all tools), "code" (Python code actions in the sandbox)
            or "llm" (no servers and no tools: the model answers from the question alone).
        max_steps: Model turns before the run is stopped (then one wrap-up turn asks for an answer).
        step_timeout_s: Per tool call / code execution timeout, seconds.
        out_dir: Where transcript.jsonl, report.md, report.html and figures/ go (a temp folder if None).
        data_root: Data root for the servers (default: the configured one).
        workspace: Workspace for the servers (default: the configured one).
        json_answer: Parse the answer as JSON (None: when the question mentions JSON).
        system: Replace the system prompt.
        on_event: ``fn(kind, record)`` for live progress (the same records as the transcript).
        server_dirs: Extra folders with drop-in servers.
        session: Sandbox session name (default: a fresh one per run).
        history: A conversation to continue (chat); the run appends its turns to this list.
    """
    from servers.common.config import get_config

    mode = "llm" if mode == "llm-only" else mode
    if mode not in MODES:
        raise ToolError(f"Unknown mode {mode!r}.", hint="Use 'tools', 'code' or 'llm'.")
    if max_steps < 1:
        raise ToolError(f"max_steps must be >= 1, got {max_steps}.")
    cfg = get_config().with_overrides(
        data_root=Path(data_root).expanduser().resolve() if data_root else None,
        workspace=Path(workspace).expanduser().resolve() if workspace else None)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="cytoagent-run-"))
    tr = Transcript(out, forward=on_event)
    want_json = wants_json(question) if json_answer is None else bool(json_answer)
    t0 = time.monotonic()
    own_pool = pool is None
    result = RunResult(question=question)
    run: _Run | None = None
    try:
        if own_pool and mode == "llm":
            configs = {}
        elif own_pool:
            configs = _resolve_servers(servers, mcp_config, mode, str(cfg.data_root) if data_root else None,
                                       str(cfg.workspace) if workspace else None, server_dirs)
        else:
            configs = {n: c.config for n, c in pool.connections.items()}
        tr.event("run_start", question=question, provider=getattr(provider, "name", type(provider).__name__),
                 model=getattr(provider, "model", None), mode=mode, servers=list(configs),
                 server_configs=[c.describe() for c in configs.values()], data_root=str(cfg.data_root),
                 workspace=str(cfg.workspace), max_steps=max_steps, step_timeout_s=step_timeout_s,
                 json_answer=want_json)
        if own_pool:
            pool = ServerPool(configs, log_dir=out / "server-logs")
            await pool.start()
        tr.event("tools", names=[t.name for t in pool.tools()])
        run = _Run(question, provider, pool, mode=mode, max_steps=max_steps, step_timeout_s=step_timeout_s,
                   transcript=tr, json_answer=want_json, data_root=str(cfg.data_root), workspace=str(cfg.workspace),
                   system=system, session=session, wrap_up=getattr(provider, "wrap_up", True), history=history)
        tr.event("system", text=run.system)
        if mode == "code" and run.exec_tool is None:
            raise ToolError("Code mode needs the sandbox server (its execute tool is not connected).",
                            hint="Add 'sandbox' to --servers.")
        result = await run.run()
    except (ProviderError, ToolError) as e:
        result = run.result if run is not None else result
        result.ok, result.error, result.stop_reason = False, f"{type(e).__name__}: {e}", "error"
        tr.event("error", text=result.error)
    except asyncio.CancelledError:
        result = run.result if run is not None else result
        result.ok, result.error, result.stop_reason = False, "cancelled", "error"
        tr.event("error", text="Run cancelled.")
        raise
    finally:
        if own_pool and pool is not None:
            await pool.close()
        result.duration_s = time.monotonic() - t0
        result.out_dir, result.transcript_path = out, tr.path
        tr.event("run_end", answer=result.answer, answer_text=result.answer_text, ok=result.ok, error=result.error,
                 stop_reason=result.stop_reason, steps=result.steps, tool_calls=result.tool_calls,
                 usage=result.usage.to_dict(), duration_s=round(result.duration_s, 3))
        result.report_path, result.html_path = tr.write_reports()
    return result


def run_agent_sync(question: str, provider: Provider, **kwargs: Any) -> RunResult:
    """:func:`run_agent` for code that is not async."""
    return asyncio.run(run_agent(question, provider, **kwargs))
