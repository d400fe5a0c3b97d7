"""MCP round-trip overhead of cytoagent servers vs a bare FastMCP server (the floor).

For each server: time from spawning the stdio process to a completed ``list_tools`` (cold start),
and p50/p95 latency of a trivial tool call (``ping``) over stdio. The floor is a bare FastMCP
script with the same trivial tool, started by the same interpreter. Prints one JSON object last.

    python benchmarks/mcp_roundtrip.py [--quick] [--servers spatial,wsi] [--calls 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BARE = '''
from fastmcp import FastMCP
mcp = FastMCP("bare")

@mcp.tool
def ping() -> dict:
    """Health check."""
    return {"server": "bare", "version": "0"}

if __name__ == "__main__":
    mcp.run(show_banner=False)
'''


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "OPENBLAS_CORETYPE", "CYTOAGENT_SERVER_PATH")}
    env.update({"FASTMCP_SHOW_SERVER_BANNER": "false", "FASTMCP_CHECK_FOR_UPDATES": "off", "PYTHONPATH": str(REPO),
                "CYTOAGENT_WORKSPACE": tempfile.mkdtemp(prefix="cyto-bench-ws-"),
                "CYTOAGENT_DATA_ROOT": tempfile.mkdtemp(prefix="cyto-bench-data-")})
    return env


async def measure(args: list[str], calls: int, starts: int) -> dict:
    from fastmcp import Client
    from fastmcp.client.transports import StdioTransport

    start_times = []
    for _ in range(starts):
        t0 = time.perf_counter()
        async with Client(StdioTransport(command=sys.executable, args=args, env=_env(), keep_alive=False)) as c:
            tools = await c.list_tools()
            start_times.append(time.perf_counter() - t0)
    lat = []
    async with Client(StdioTransport(command=sys.executable, args=args, env=_env(), keep_alive=False)) as c:
        for _ in range(10):  # warm-up
            await c.call_tool("ping", {})
        for _ in range(calls):
            t0 = time.perf_counter()
            await c.call_tool("ping", {})
            lat.append(time.perf_counter() - t0)
    lat.sort()
    return {
        "tools": len(tools),
        "start_to_list_tools_s": round(statistics.median(start_times), 3),
        "p50_ms": round(1000 * lat[len(lat) // 2], 3),
        "p95_ms": round(1000 * lat[int(len(lat) * 0.95) - 1], 3),
    }


async def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--servers", default="")
    ap.add_argument("--calls", type=int, default=0)
    a = ap.parse_args()
    calls = a.calls or (100 if a.quick else 500)
    starts = 2 if a.quick else 5
    from cytoagent.discovery import discover

    names = [s for s in a.servers.split(",") if s] or sorted(discover())
    with tempfile.TemporaryDirectory() as d:
        bare = Path(d) / "bare_server.py"
        bare.write_text(BARE)
        floor = await measure([str(bare)], calls, starts)
    out: dict = {"benchmark": "mcp_roundtrip", "calls": calls, "floor_bare_fastmcp": floor, "servers": {}}
    for name in names:
        r = await measure(["-m", "cytoagent", "serve", name], calls, starts)
        r["p50_ratio_vs_floor"] = round(r["p50_ms"] / floor["p50_ms"], 3)
        r["p95_ratio_vs_floor"] = round(r["p95_ms"] / floor["p95_ms"], 3)
        r["start_ratio_vs_floor"] = round(r["start_to_list_tools_s"] / floor["start_to_list_tools_s"], 3)
        out["servers"][name] = r
        print(f"{name:12s} start {r['start_to_list_tools_s']:.2f}s  p50 {r['p50_ms']:.2f} ms "
              f"({r['p50_ratio_vs_floor']}x floor)  p95 {r['p95_ms']:.2f} ms", file=sys.stderr)
    print(f"{'floor':12s} start {floor['start_to_list_tools_s']:.2f}s  p50 {floor['p50_ms']:.2f} ms  "
          f"p95 {floor['p95_ms']:.2f} ms", file=sys.stderr)
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
