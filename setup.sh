#!/usr/bin/env bash
# Creates .venv and installs ldm-train with its dev extra (torch 2.14.1 + torchvision 0.29.1 from the local wheel cache
# where present, else from PyPI). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import ldm_train, deepspeed, torchvision, diffusers, moto" >/dev/null 2>&1 || [ pyproject.toml -nt .venv/.installed ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e '.[dev]'
  touch .venv/.installed
fi
