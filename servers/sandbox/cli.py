"""CLI plugin: ``cytoagent sandbox check`` (what isolation is in force here) and
``cytoagent sandbox run CODE`` (run code in a fresh sandboxed kernel).

Top-level imports stay light (argparse only).
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> None:
    sp = subparsers.add_parser("sandbox", help="sandboxed Python kernels: check isolation, run code")
    ssub = sp.add_subparsers(dest="sandbox_cmd", metavar="ACTION")
    ck = ssub.add_parser("check", help="report bubblewrap, process cap, file tracking; run containment probes")
    ck.add_argument("--json", action="store_true", help="print the report as JSON")
    ck.set_defaults(func=cmd_check)
    rn = ssub.add_parser("run", help="run Python code in a fresh sandboxed kernel and print the result")
    rn.add_argument("code", nargs="?", help="code to run (default: read from --file or stdin)")
    rn.add_argument("-f", "--file", help="file with the code")
    rn.add_argument("--timeout", type=float, default=60.0, help="wall-clock seconds")
    rn.add_argument("--json", action="store_true", help="print the whole result as JSON")
    rn.set_defaults(func=cmd_run)


PROBES = {
    "read /etc/passwd": "open('/etc/passwd').read()",
    "read /root": "import os; os.listdir('/root/.ssh')",
    "write /usr": "open('/usr/cytoagent-probe', 'w')",
    "network 127.0.0.1:22": "import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)",
    "network 1.1.1.1:53": "import socket; socket.create_connection(('1.1.1.1', 53), timeout=1)",
}


def check_report() -> dict:
    """Isolation in force here, and whether each containment probe was blocked."""
    from servers.sandbox.filewatch import FileTracker
    from servers.sandbox.isolation import PidsCgroup, bwrap_path, probe_bwrap
    from servers.sandbox.kernel import Kernel

    ok, reason = probe_bwrap()
    cg = PidsCgroup(64)
    cgroup = cg.path is not None
    cg.remove()
    rep: dict = {"bwrap": bwrap_path(), "bwrap_works": ok, "bwrap_reason": reason, "pids_cgroup": cgroup}
    with Kernel() as k:
        rep["isolation"] = k.isolation
        rep["warnings"] = k.warnings
        rep["file_tracking"] = FileTracker(k.workspace).mode
        probes = {}
        for name, code in PROBES.items():
            r = k.execute(code, timeout_s=10)
            probes[name] = "blocked" if not r.ok else "ALLOWED"
        rep["probes"] = probes
        rep["uid_inside"] = k.uid_inside
        rep["seccomp"] = k.seccomp_active
    return rep


def cmd_check(args: argparse.Namespace) -> int:
    rep = check_report()
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        for k, v in rep.items():
            print(f"{k:>14}: {v}")
    return 0 if rep["isolation"] == "bubblewrap" and all(v == "blocked" for v in rep["probes"].values()) else 1


def cmd_run(args: argparse.Namespace) -> int:
    from servers.common.errors import ToolError
    from servers.sandbox.kernel import Kernel

    code = args.code
    if code is None:
        code = open(args.file).read() if args.file else sys.stdin.read()
    try:
        with Kernel() as k:
            r = k.execute(code, timeout_s=args.timeout)
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r.to_dict(figures=False)))
    else:
        for w in r.warnings:
            print(f"WARNING: {w}", file=sys.stderr)
        if r.stdout:
            sys.stdout.write(r.stdout)
        if r.stderr:
            sys.stderr.write(r.stderr)
        if r.value is not None:
            print(r.value)
        if r.error:
            print(r.error, file=sys.stderr)
        if r.files:
            print(f"files written: {', '.join(r.files)}", file=sys.stderr)
    return 0 if r.ok else 1
