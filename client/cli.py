"""``cytoagent ask`` (one question) and ``cytoagent chat`` (interactive) over the MCP servers."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="data root: the folder tool paths are relative to (default: configured)")
    p.add_argument("--workspace", help="workspace folder for artifacts (default: configured)")
    p.add_argument("--provider", default="anthropic", choices=["anthropic", "openai", "openai-compatible", "scripted"])
    p.add_argument("--model", help="model name (defaults: claude-sonnet-4-5, gpt-4.1)")
    p.add_argument("--base-url", help="API base URL (required for openai-compatible, e.g. http://localhost:8000/v1)")
    p.add_argument("--api-key-env", help="environment variable holding the API key (default per provider)")
    p.add_argument("--plan", help="scripted provider: a JSON/YAML plan file")
    p.add_argument("--mode", choices=["tools", "code", "llm"], default="tools",
                   help="tools: function calling over MCP tools; code: Python code actions in the sandbox; "
                        "llm: no tools (baseline)")
    p.add_argument("--servers", help="comma-separated server names (default: all in tools mode, sandbox in code mode)")
    p.add_argument("--server-dir", action="append", default=[], help="extra folder of drop-in servers")
    p.add_argument("--mcp-config", help="Claude-Desktop-style JSON with extra (external) mcpServers")
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--step-timeout", type=float, default=600, help="seconds per tool call / code execution")
    p.add_argument("--json", dest="json_answer", action="store_true", default=None,
                   help="parse the final answer as JSON (default: when the question mentions JSON)")
    p.add_argument("--out", help="output folder (default: runs/<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.add_argument("--no-images", action="store_true", help="do not send tool images to the model")


def add_parser(subparsers: Any) -> None:
    a = subparsers.add_parser("ask", help="answer one question with a model (or a scripted plan) over the servers")
    a.add_argument("question", nargs="?", help="the question (paths in it are relative to --data)")
    _common(a)
    a.add_argument("--list-tools", action="store_true", help="start the servers, list their tools, exit")
    a.add_argument("--result-json", action="store_true", help="print the whole run result as JSON on stdout")
    a.set_defaults(func=cmd_ask)
    c = subparsers.add_parser("chat", help="interactive session with a model over the servers")
    _common(c)
    c.set_defaults(func=cmd_chat)


# -- live progress ------------------------------------------------------------------------------
class LiveView:
    """Prints steps, tool calls and results as they happen (Rich, on stderr) with a spinner."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.status = None

    def __enter__(self) -> LiveView:
        if not self.quiet:
            self.status = self.console.status("starting servers …")
            self.status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)
            self.status = None

    def _spin(self, text: str) -> None:
        if self.status is not None:
            self.status.update(text)

    def __call__(self, kind: str, e: dict[str, Any]) -> None:
        if self.quiet:
            return
        from rich.markup import escape

        p = self.console.print
        if kind == "tools":
            p(f"[dim]{len(e['names'])} tools available[/dim]")
        elif kind == "step":
            self._spin(f"step {e['step']}: waiting for the model …")
        elif kind == "model":
            u = e.get("usage") or {}
            text = (e.get("text") or "").strip()
            if text and not e.get("tool_calls"):
                p(f"[bold cyan]assistant[/bold cyan] {escape(text[:800])}")
            elif text:
                p(f"[cyan]assistant[/cyan] {escape(text[:300])}")
            if u.get("input_tokens"):
                p(f"[dim]  tokens {u['input_tokens']} in / {u['output_tokens']} out[/dim]")
        elif kind == "tool_call":
            args = e.get("arguments")
            s = json.dumps(args, default=str) if not isinstance(args, str) else args
            p(f"[yellow]→ {escape(e['name'])}[/yellow] {escape(s[:200])}")
            self._spin(f"running {e['name']} …")
        elif kind == "code":
            p(f"[magenta]code[/magenta] {escape(e['code'][:400])}")
        elif kind == "progress":
            total = e.get("total")
            frac = f"{e['progress']:g}/{total:g}" if total else f"{e['progress']:g}"
            self._spin(f"{e['name']}: {frac} {e.get('message') or ''}")
        elif kind == "tool_result":
            mark = "[red]✗[/red]" if e.get("is_error") else "[green]✓[/green]"
            figs = f" · {len(e['figures'])} figure(s)" if e.get("figures") else ""
            first = (e.get("text") or "").strip().splitlines()[:1]
            p(f"  {mark} {escape(e['name'])} {e.get('duration_s', 0):.2f} s{figs} [dim]"
              f"{escape(first[0][:160]) if first else ''}[/dim]")
            self._spin("waiting for the model …")
        elif kind in ("notice", "error"):
            p(f"[{'red' if kind == 'error' else 'yellow'}]{escape(e['text'])}[/]")


# -- commands -----------------------------------------------------------------------------------
def _provider(args: argparse.Namespace, view: LiveView | None = None):
    from client.providers import get_provider

    kw: dict[str, Any] = {}
    if args.provider != "scripted":
        if view is not None:
            kw["on_retry"] = lambda n, e, d: view.console.print(
                f"[yellow]retry {n} after {type(e).__name__}; waiting {d:.1f} s[/yellow]")
        if args.no_images and args.provider.startswith("openai"):
            kw["send_images"] = False
    return get_provider(args.provider, model=args.model, base_url=args.base_url, plan=args.plan,
                        api_key_env=args.api_key_env, **kw)


def _servers(args: argparse.Namespace) -> list[str] | None:
    return [s.strip() for s in args.servers.split(",") if s.strip()] if args.servers else None


def _out_dir(args: argparse.Namespace, prefix: str) -> Path:
    if args.out:
        return Path(args.out)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{prefix}-{stamp}"


def _list_tools(args: argparse.Namespace) -> int:
    import asyncio

    from client.agent import _resolve_servers
    from client.servers import ServerPool

    async def go() -> list:
        configs = _resolve_servers(_servers(args), args.mcp_config, args.mode, args.data, args.workspace,
                                   args.server_dir)
        async with ServerPool(configs) as pool:
            return pool.tools()

    for t in asyncio.run(go()):
        first = (t.description.splitlines() or [""])[0]
        print(f"{t.name}\t{first}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    import asyncio

    from client.agent import run_agent

    if args.list_tools:
        return _list_tools(args)
    if not args.question:
        print("ask: give a question (or --list-tools).", file=sys.stderr)
        return 2
    from client.providers.base import ProviderError

    with LiveView(args.quiet) as view:
        try:
            provider = _provider(args, view)
        except ProviderError as e:
            view.__exit__(None, None, None)
            print(f"error: {e}", file=sys.stderr)
            return 2
        res = asyncio.run(run_agent(
            args.question, provider, servers=_servers(args), mcp_config=args.mcp_config, mode=args.mode,
            max_steps=args.max_steps, step_timeout_s=args.step_timeout, out_dir=_out_dir(args, "ask"),
            data_root=args.data, workspace=args.workspace, json_answer=args.json_answer, on_event=view,
            server_dirs=args.server_dir))
    if args.result_json:
        print(json.dumps(res.to_dict(), default=str))
    elif res.answer is not None:
        print(res.answer if isinstance(res.answer, str) else json.dumps(res.answer))
    u = res.usage
    cost = f"${u.cost_usd:.4f}" if u.cost_usd is not None else "unknown"
    view.console.print(f"[dim]{res.stop_reason} · {res.steps} steps · {res.tool_calls} tool calls · "
                       f"{u.input_tokens} in / {u.output_tokens} out tokens · cost {cost}[/dim]")
    view.console.print(f"[dim]transcript {res.transcript_path}\nreport {res.report_path} · {res.html_path}[/dim]")
    if res.error:
        view.console.print(f"[red]{res.error}[/red]")
    return 0 if res.ok else 1


def cmd_chat(args: argparse.Namespace) -> int:
    import asyncio
    import uuid

    from client.agent import _resolve_servers, run_agent
    from client.providers.base import Message, ProviderError, Usage
    from client.servers import ServerPool

    view = LiveView(args.quiet)
    try:
        provider = _provider(args, view)
    except ProviderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = _out_dir(args, "chat")
    history: list[Message] = []
    total = Usage()

    async def go() -> None:
        configs = _resolve_servers(_servers(args), args.mcp_config, args.mode, args.data, args.workspace,
                                   args.server_dir)
        with view.console.status("starting servers …"):
            pool = ServerPool(configs, log_dir=out / "server-logs")
            await pool.start()
        session = f"chat-{uuid.uuid4().hex[:8]}"
        view.console.print(f"[bold]cytoagent chat[/bold] — {len(pool.tools())} tools from {', '.join(configs)}; "
                           "empty line or Ctrl-D to quit.")
        try:
            turn = 0
            while True:
                try:
                    q = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    break
                if not q.strip() or q.strip() in {"exit", "quit", ":q"}:
                    break
                turn += 1
                with view:
                    res = await run_agent(q, provider, pool=pool, mode=args.mode, max_steps=args.max_steps,
                                          step_timeout_s=args.step_timeout, out_dir=out / f"turn-{turn:03d}",
                                          data_root=args.data, workspace=args.workspace,
                                          json_answer=args.json_answer, on_event=view, session=session,
                                          history=history)
                total.add(res.usage)
                if res.answer is not None:
                    ans = res.answer if isinstance(res.answer, str) else json.dumps(res.answer, indent=2)
                    view.console.print(f"[bold green]answer[/bold green] {ans}")
                if res.error:
                    view.console.print(f"[red]{res.error}[/red]")
                view.console.print(f"[dim]report {res.report_path}[/dim]")
        finally:
            await pool.close()

    asyncio.run(go())
    cost = f"${total.cost_usd:.4f}" if total.cost_usd is not None else "unknown"
    view.console.print(f"[dim]{total.input_tokens} in / {total.output_tokens} out tokens · cost {cost} · {out}[/dim]")
    return 0
