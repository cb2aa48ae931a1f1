#!/usr/bin/env bash
# Set up (idempotent) and run the default job on a local Ray: recipes/tiny.yaml on CPU,
# recipes/gpu.yaml on a machine with an NVIDIA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
default=recipes/tiny.yaml
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && default=recipes/gpu.yaml
exec .venv/bin/zaya-rl run "${1:-$default}" "${@:2}"
