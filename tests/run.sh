#!/usr/bin/env bash
# The test command: installs what the tests need (once), then runs the suite.
# Usage: tests/run.sh [pytest options]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
else
  "$ROOT/pipeline.sh" --setup-only
  py="$ROOT/.venv/bin/python"
  marker="$ROOT/.venv/.requirements-dev.sha256"
  want="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dask.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$marker" 2>/dev/null)" != "$want" ]; then
    echo "tests: installing requirements-dev.txt into .venv (once)" >&2
    "$py" -m pip install --disable-pip-version-check -q -r "$ROOT/requirements-dev.txt"
    echo "$want" > "$marker"
  fi
fi

cd "$ROOT"
"$py" -m ruff check .
exec "$py" -m pytest "$@"
