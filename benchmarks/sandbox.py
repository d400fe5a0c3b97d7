"""Sandbox kernel latency: warm ``execute`` (p50/p95) and cold start, next to the floors.

Floors measured in the same run: a bare ``python -c pass`` subprocess (what any fresh process
costs) and an in-process ``exec`` of the same code (no process boundary at all). Also a
numpy round trip through workspace files, as the preprocessing optimiser uses it.

    python benchmarks/sandbox.py [--quick]

The last line of output is one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from servers.sandbox.kernel import Kernel, SandboxPolicy  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def ms(x: float) -> float:
    return round(x * 1000, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (< 1 minute)")
    args = ap.parse_args()
    n_warm, n_cold = (200, 5) if args.quick else (2000, 20)

    tmp = Path(tempfile.mkdtemp(prefix="cytoagent-bench-"))
    ws, data = tmp / "ws", tmp / "data"
    ws.mkdir()
    data.mkdir()
    out: dict = {"benchmark": "sandbox", "quick": args.quick}

    # floors
    t = []
    for _ in range(n_cold):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        t.append(time.perf_counter() - t0)
    out["python_c_ms"] = ms(statistics.median(t))
    code = compile("1 + 1", "<bench>", "eval")
    ns: dict = {}
    t = []
    for _ in range(n_warm):
        t0 = time.perf_counter()
        exec(code, ns)
        t.append(time.perf_counter() - t0)
    out["inprocess_exec_p50_us"] = round(pct(t, 0.5) * 1e6, 3)

    for mode in ("auto", "none"):
        cold = []
        kern = None
        for _ in range(n_cold):
            t0 = time.perf_counter()
            kern = Kernel(policy=SandboxPolicy(isolation=mode, require_isolation=False), workspace=ws, data_root=data)
            r = kern.execute("1 + 1")
            cold.append(time.perf_counter() - t0)
            assert r.value == "2", r
            kern.close()
        key = "bwrap" if mode == "auto" else "noiso"
        out[f"cold_start_{key}_ms"] = ms(statistics.median(cold))
        out[f"isolation_{key}"] = kern.isolation

    for track in (True, False):
        kern = Kernel(policy=SandboxPolicy(), workspace=ws, data_root=data, track_files=track)
        for _ in range(20):
            kern.execute("1 + 1")
        t = []
        for _ in range(n_warm):
            t0 = time.perf_counter()
            r = kern.execute("1 + 1")
            t.append(time.perf_counter() - t0)
        key = "tracked" if track else "untracked"
        out[f"warm_{key}_p50_ms"] = ms(pct(t, 0.5))
        out[f"warm_{key}_p95_ms"] = ms(pct(t, 0.95))
        if not track:
            # numpy round trip: load a 256x256 float32 image from the workspace, process, save
            import numpy as np

            np.save(ws / "in.npy", np.random.default_rng(0).random((256, 256), dtype=np.float32))
            kern.execute("import numpy as np, scipy.ndimage as ndi")
            t = []
            for _ in range(max(20, n_warm // 10)):
                t0 = time.perf_counter()
                r = kern.execute("a = np.load('in.npy')\nnp.save('out.npy', ndi.gaussian_filter(a, 2))")
                t.append(time.perf_counter() - t0)
                assert r.ok, r.error
            out["numpy_roundtrip_256px_p50_ms"] = ms(pct(t, 0.5))
            out["numpy_roundtrip_evals_per_min"] = round(60 / pct(t, 0.5))
        kern.close()

    # the same warm call with a workspace of 1000 files (the per-call file walk grows with it)
    for i in range(1000):
        (ws / f"f{i // 100}").mkdir(exist_ok=True)
        (ws / f"f{i // 100}" / f"{i}.txt").write_text("x")
    kern = Kernel(policy=SandboxPolicy(), workspace=ws, data_root=data)
    t = []
    for _ in range(max(20, n_warm // 4)):
        t0 = time.perf_counter()
        kern.execute("1 + 1")
        t.append(time.perf_counter() - t0)
    kern.close()
    out["warm_tracked_1000files_p50_ms"] = ms(pct(t, 0.5))
    # the same trivial call through the MCP tool (in-memory client): what an agent sees
    import asyncio
    import os

    os.environ["CYTOAGENT_WORKSPACE"] = str(ws)
    os.environ["CYTOAGENT_DATA_ROOT"] = str(data)
    os.environ["CYTOAGENT_CONFIG"] = str(tmp / "none.toml")
    from servers.common.config import reset_config

    reset_config()

    async def mcp_latency() -> list[float]:
        from fastmcp import Client

        import servers.sandbox.server as srv

        times = []
        async with Client(srv.mcp) as c:
            await c.call_tool("execute", {"code": "1 + 1"})
            for _ in range(max(20, n_warm // 4)):
                t0 = time.perf_counter()
                r = await c.call_tool("execute", {"code": "1 + 1"})
                times.append(time.perf_counter() - t0)
                assert r.structured_content["value"] == "2"
        srv.get_manager().close_all()
        return times

    t = asyncio.run(mcp_latency())
    out["mcp_execute_p50_ms"] = ms(pct(t, 0.5))
    out["mcp_execute_p95_ms"] = ms(pct(t, 0.95))
    out["warm_p50_vs_inprocess_exec"] = round(out["warm_untracked_p50_ms"] * 1000 / max(out["inprocess_exec_p50_us"], 1e-3), 1)
    out["cold_start_vs_python_c"] = round(out["cold_start_bwrap_ms"] / out["python_c_ms"], 2)
    out["targets_met"] = {"warm_p50_lt_15ms": out["warm_tracked_p50_ms"] < 15,
                          "mcp_execute_p50_lt_15ms": out["mcp_execute_p50_ms"] < 15,
                          "cold_start_lt_1s": out["cold_start_bwrap_ms"] < 1000}
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    for k, v in out.items():
        print(f"{k:>36}: {v}", file=sys.stderr)
    sys.stderr.flush()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
