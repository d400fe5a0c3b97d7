#!/usr/bin/env bash
# Install everything needed (idempotent), fetch the demo data, and run the main job:
# with ANTHROPIC_API_KEY / OPENAI_API_KEY set, the bundled agent answers questions through the
# MCP servers; without a key, a scripted analysis chain runs through the same servers. Either
# way a report with figures is written to ./report (override with CYTOAGENT_REPORT_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MIRROR="${CYTOAGENT_DATA_MIRROR:-}"
if [ -z "$MIRROR" ] && [ -d ../shared/data ]; then MIRROR="$(cd ../shared/data && pwd)"; fi
export CYTOAGENT_DATA_ROOT="${CYTOAGENT_DATA_ROOT:-$HOME/.cache/cytoagent/data}"
if [ -n "$MIRROR" ]; then
  .venv/bin/cytoagent data fetch --mirror "$MIRROR" >/dev/null
else
  .venv/bin/cytoagent data fetch >/dev/null || echo "[main] some datasets could not be fetched; the demo uses what is there" >&2
fi
exec .venv/bin/cytoagent demo --out "${CYTOAGENT_REPORT_DIR:-report}" "$@"
