#!/usr/bin/env bash
# One entry point for a bare machine: sets up .venv (idempotent: skipped when nothing changed),
# then runs what was asked.
#   bash scripts/run.sh quickstart   # set up, then the main job
#   bash scripts/run.sh test         # set up, then the whole test suite (what CI runs)
#   bash scripts/run.sh setup        # set up only
#   bash scripts/run.sh potstill ... # set up, then any potstill command
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.potstill-installed"

wanted_stamp() {
  cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1
}

setup() {
  if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$(wanted_stamp)" ]]; then
    return 0
  fi
  echo "[potstill] setting up $VENV (first run, or dependencies changed) ..." >&2
  local t0=$SECONDS
  if [[ ! -x "$PY" ]]; then
    python3 -m venv "$VENV"
  fi
  # torch first, from the pinned CPU wheel, so nothing later can choose a CUDA build for it.
  "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  "$PY" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
  wanted_stamp > "$STAMP"
  echo "[potstill] set-up done in $((SECONDS - t0)) s" >&2
}

cmd="${1:-quickstart}"
shift || true
case "$cmd" in
  setup)
    setup
    ;;
  test)
    setup
    # pytest exits 5 when it collected nothing: that must fail CI, as it means the suite is broken.
    exec "$PY" -m pytest "$@"
    ;;
  quickstart)
    setup
    exec "$VENV/bin/potstill" quickstart "$@"
    ;;
  potstill)
    setup
    exec "$VENV/bin/potstill" "$@"
    ;;
  *)
    echo "usage: bash scripts/run.sh {quickstart|test|setup|potstill ARGS...}" >&2
    exit 2
    ;;
esac
