#!/usr/bin/env bash
# Install, check the limits (function length, import cycles), then run the whole test suite offline (real data
# from ../shared/data when present); any of them failing fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
if [ -z "${DELTATUNE_DATA:-}" ] && [ -d ../shared/data ]; then export DELTATUNE_DATA="$(cd ../shared/data && pwd)"; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# the limits the code is held to (STYLE.md): no function in deltatune/ over 80 lines, no import cycle
python scripts/longest_functions.py deltatune 10 --max 80
python scripts/import_cycles.py
python -m pytest -q "$@"
