#!/usr/bin/env bash
# Refresh constraints.txt, the lock CI installs from: resolve pyproject.toml's ranges
# afresh (newest releases allowed) in a throwaway venv and pin what was installed.
# Then run .ci/run and commit the lock with the fixes it needs, like any other change.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q torch==2.13.0   # the CPU build on disk; any other release downloads GBs
pip install -q ".[test,dev]"
{
  echo "# The lock .ci/run installs from (pip constraints). Refresh: scripts/lock.sh"
  echo "# Users install with pyproject.toml's ranges; this only freezes CI."
  pip freeze --exclude atlinter_ray --exclude-editable | sed -E 's/^(torch==[^+]+)\+cpu$/\1/'
} > constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
