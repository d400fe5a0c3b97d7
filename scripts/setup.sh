#!/usr/bin/env bash
# Idempotent installer: system packages (bubblewrap for the sandbox) and a local .venv with the
# project and its pinned dependencies. Safe to run again: it skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*" >&2; }

# -- system packages ---------------------------------------------------------------------------
if ! command -v bwrap >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing bubblewrap (sandbox isolation)"
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
  else
    log "WARNING: bubblewrap not found and cannot apt-get it; the sandbox will run without isolation"
  fi
fi

# -- Python environment ------------------------------------------------------------------------
PY="${CYTOAGENT_PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      PY="$cand"; break
    fi
  done
fi
[ -n "$PY" ] || { log "need Python >= 3.11"; exit 1; }
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $PY"
  "$PY" -m venv .venv
fi

EXTRAS="${CYTOAGENT_EXTRAS:-all}"
STAMP_SRC="$(cat pyproject.toml requirements/constraints.txt 2>/dev/null; echo "$EXTRAS")"
STAMP="$(printf '%s' "$STAMP_SRC" | sha256sum | cut -c1-16)"
if [ "$(cat .venv/.cytoagent-stamp 2>/dev/null)" != "$STAMP" ] || ! .venv/bin/python -c 'import cytoagent' 2>/dev/null; then
  log "installing cytoagent[$EXTRAS] into .venv (pinned by requirements/constraints.txt)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # torch: the CPU build pinned in the `unet` extra (CUDA builds are several GB; see README)
  .venv/bin/python -m pip install -q -c requirements/constraints.txt -e ".[$EXTRAS]"
  echo "$STAMP" > .venv/.cytoagent-stamp
else
  log ".venv is up to date"
fi
