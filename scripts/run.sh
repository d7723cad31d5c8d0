#!/usr/bin/env bash
# One entry point for a fresh clone: creates .venv, installs mmkit into it (again only
# when pyproject.toml changes), then runs what was asked.
#   bash scripts/run.sh quickstart [mmkit quickstart flags]   # the main job
#   bash scripts/run.sh test [pytest args]                    # the test suite
#   bash scripts/run.sh mmkit ARGS...                         # any mmkit command
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[mmkit] creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.mmkit-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[mmkit] installing mmkit and its dependencies into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  echo "$want" > "$stamp"
fi
cmd=${1:-help}
shift || true
case "$cmd" in
  quickstart) exec .venv/bin/mmkit quickstart "$@" ;;
  test) exec .venv/bin/python -m pytest -n 2 --dist loadfile "$@" ;;
  mmkit) exec .venv/bin/mmkit "$@" ;;
  *) echo "usage: bash scripts/run.sh {quickstart|test|mmkit} [args...]" >&2; exit 2 ;;
esac
