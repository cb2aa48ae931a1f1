#!/usr/bin/env bash
# Set up (idempotent) and run the default job: recipes/tiny.yaml on a local Ray, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/zaya-rl run "${1:-recipes/tiny.yaml}" "${@:2}"
