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

# Headless Chromium renders the HTML report in its test (the test skips without it). Installed
# once when missing and we may (root or passwordless sudo, apt-get); a failed try leaves a marker
# in the venv so later runs stay quiet and fast. Never fails the set-up.
ensure_chromium() {
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    return 0
  fi
  local marker="$VENV/.potstill-no-chromium" as=""
  [[ -f "$marker" ]] && return 0
  if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then as="sudo -n"; else as="-"; fi
  fi
  if [[ "$as" != "-" ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[potstill] installing chromium (for the HTML report's browser test) ..." >&2
    if $as env DEBIAN_FRONTEND=noninteractive timeout 600 apt-get update -qq >/dev/null 2>&1 &&
      $as env DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq \
        --no-install-recommends chromium >/dev/null 2>&1; then
      return 0
    fi
  fi
  echo "[potstill] note: chromium not installed (apt-get install chromium); the report's browser test will skip" >&2
  if [[ -d "$VENV" ]]; then touch "$marker"; fi
  return 0
}

setup() {
  ensure_chromium
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
    # Two workers by default (pytest-xdist): most tests wait on a subprocess or on imports, so
    # two share two cores well. POTSTILL_TEST_WORKERS=0 runs in one process.
    exec "$PY" -m pytest -n "${POTSTILL_TEST_WORKERS:-2}" "$@"
    ;;
  quickstart)
    setup
    # Part of the set-up: the kit's teacher and student, fetched and converted once (a few
    # minutes the first time, instant after).
    for model in qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct; do
      "$VENV/bin/potstill" models prepare "$model" > /dev/null
    done
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
