"""The ``cytoagent`` command line.

Core commands live here; other packages add theirs by exposing ``add_parser(subparsers)`` in a
module listed in ``PLUGIN_MODULES`` (kept import-light so ``--help`` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

PLUGIN_MODULES = [
    "cytoagent.datasets",  # data list / data fetch
    "cytoagent.demo",  # demo (the main job)
    "client.cli",  # ask / chat
    "evals.cli",  # eval
    "evals.optimize.cli",  # optimize
    "servers.common.segmenters.cli",  # segmenters list / train
    "servers.sandbox.cli",  # sandbox check / run
    "servers.wsi.cli",  # wsi info / tissue / tiles / nuclei
]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# -- servers ----------------------------------------------------------------------------------
def cmd_servers_list(args: argparse.Namespace) -> int:
    import asyncio

    from cytoagent.discovery import discover, load_server

    specs = discover(args.server_dir)
    rows = []
    for name, spec in specs.items():
        try:
            server = load_server(spec)
            tools = asyncio.run(server.list_tools())
            rows.append({"name": name, "source": spec.source, "tools": len(tools),
                         "description": spec.description})
        except Exception as e:  # a broken server must not hide the others
            rows.append({"name": name, "source": spec.source, "tools": None, "description": f"ERROR: {e}"})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cytoagent MCP servers")
    for col in ("name", "tools", "source", "description"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], str(r["tools"]), r["source"], r["description"])
    Console().print(table)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("FASTMCP_SHOW_SERVER_BANNER", "false")
    os.environ.setdefault("FASTMCP_CHECK_FOR_UPDATES", "off")
    from cytoagent.discovery import build_hub, discover, get_spec, load_server

    if args.all:
        server = build_hub(discover(args.server_dir))
    elif args.name:
        server = load_server(get_spec(args.name, args.server_dir))
    else:
        _stderr("serve: give a server name or --all (see `cytoagent servers list`).")
        return 2
    if args.transport == "http":
        server.run(transport="http", host=args.host, port=args.port, path="/mcp", show_banner=False)
    else:
        server.run(show_banner=False)
    return 0


def cmd_config_claude(args: argparse.Namespace) -> int:
    from cytoagent.claude_config import claude_desktop_config, merge_into_file

    cfg = claude_desktop_config(data_root=args.data_root, workspace=args.workspace, python=args.python,
                                names=args.server or None, server_dirs=args.server_dir)
    if args.file:
        path = merge_into_file(args.file, cfg)
        _stderr(f"Merged {len(cfg['mcpServers'])} servers into {path}")
    else:
        print(json.dumps(cfg, indent=2))
    return 0


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cytoagent", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version="cytoagent 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sp = sub.add_parser("servers", help="list the discovered MCP servers")
    ssub = sp.add_subparsers(dest="servers_cmd", metavar="ACTION")
    sl = ssub.add_parser("list", help="name, description and tool count of every server")
    sl.add_argument("--json", action="store_true")
    sl.add_argument("--server-dir", action="append", default=[], help="extra folder of server folders")
    sl.set_defaults(func=cmd_servers_list)

    sv = sub.add_parser("serve", help="run one server (or all) over stdio or streamable HTTP")
    sv.add_argument("name", nargs="?")
    sv.add_argument("--all", action="store_true", help="all servers in one process, tools prefixed by server")
    sv.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--server-dir", action="append", default=[])
    sv.set_defaults(func=cmd_serve)

    cp = sub.add_parser("config", help="configuration snippets for MCP clients")
    csub = cp.add_subparsers(dest="config_cmd", metavar="CLIENT")
    cd = csub.add_parser("claude-desktop", help="print (or merge into --file) the mcpServers JSON")
    cd.add_argument("--file", help="claude_desktop_config.json to merge into (created if missing)")
    cd.add_argument("--data-root")
    cd.add_argument("--workspace")
    cd.add_argument("--python", help="interpreter to run the servers (default: this one)")
    cd.add_argument("--server", action="append", default=[], help="only these servers")
    cd.add_argument("--server-dir", action="append", default=[])
    cd.set_defaults(func=cmd_config_claude)

    for mod_name in PLUGIN_MODULES if plugins else []:
        try:
            mod = importlib.import_module(mod_name)
            mod.add_parser(sub)
        except ModuleNotFoundError as e:
            if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
                continue  # that part of the toolkit is not present
            _stderr(f"warning: commands from {mod_name} are unavailable: {e}")
        except Exception as e:  # one broken plugin must not take the whole CLI down
            _stderr(f"warning: commands from {mod_name} are unavailable: {type(e).__name__}: {e}")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # `serve` is how MCP clients start us: skip the plugin imports so startup stays fast
    parser = build_parser(plugins=not (argv and argv[0] in ("serve", "servers", "config")))
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    from servers.common.errors import ToolError

    try:
        return int(func(args) or 0)
    except ToolError as e:
        _stderr(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        _stderr("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
