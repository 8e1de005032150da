#!/usr/bin/env bash
# Install, then run the whole test suite offline (real data from ../shared/data when present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
if [ -z "${DELTATUNE_DATA:-}" ] && [ -d ../shared/data ]; then export DELTATUNE_DATA="$(cd ../shared/data && pwd)"; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m pytest -q "$@"
