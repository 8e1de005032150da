#!/usr/bin/env bash
# The README's Quickstart as a new user runs it: a fresh clone with no ../shared beside it, no $DELTATUNE_DATA,
# a fresh .venv; times the install and `deltatune compare` (wall and CPU time, children included).
# Usage: bash benchmarks/quickstart_fresh_clone.sh [REPO (default: this checkout)] [BRANCH (default: its HEAD)]
# Results: docs/results/quickstart.md.
set -euo pipefail
repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
branch=${2:-$(git -C "$repo" rev-parse --abbrev-ref HEAD)}
dir=$(mktemp -d)
git clone -q -b "$branch" "$repo" "$dir/c"
cd "$dir/c"
unset DELTATUNE_DATA
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
echo "clone: $dir/c ($(git log --oneline -1)); ../shared beside it: $([ -e ../shared ] && echo yes || echo no)"
echo "cores: $(nproc), load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/time -f "install: wall %e s, CPU %U s user + %S s sys" bash scripts/install.sh
. .venv/bin/activate
/usr/bin/time -f "compare: wall %e s, CPU %U s user + %S s sys (all cells)" deltatune compare
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "report: $dir/c/runs/compare/report.md"
