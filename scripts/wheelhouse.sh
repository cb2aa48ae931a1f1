#!/usr/bin/env bash
# An offline bundle of every package a GPU install of zaya-rl adds to a CUDA PyTorch 2.11 image,
# for machines that reach no package index (air-gapped clusters).
#   usage: bash scripts/wheelhouse.sh [OUT_DIR=wheelhouse]
# Downloads the wheels of scripts/gpu-wheels.txt for CPython 3.12 on x86-64 Linux (ZAYA_PYTHON_VERSION
# changes the version), builds a wheel from the sdist of the few packages that publish none (with
# python3.12 when this machine has it: one of them, pycosat, is compiled), and adds DeepSpeed's
# sdist, which setup.sh builds on the target. About 480 MB.
# On the target, with torch 2.11.0 installed:  ZAYA_WHEELHOUSE=OUT_DIR bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-wheelhouse}
py=${ZAYA_PYTHON_VERSION:-3.12}
mkdir -p "$out"
platform=(--python-version "$py" --implementation cp)
for tag in manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 \
           manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 \
           manylinux1_x86_64 any; do
    platform+=(--platform "$tag")
done
pip=(python3 -m pip --disable-pip-version-check)
# Wheels built here from sdists must be built by the target's Python version (ZAYA_BUILD_PYTHON
# names it when python$py is not on PATH, e.g. under pyenv).
build_python=${ZAYA_BUILD_PYTHON:-python$py}
"$build_python" -c "" 2>/dev/null || build_python=python3
builder=("$build_python" -m pip --disable-pip-version-check)
built=()
fetch() {  # fetch LIST DIR: a wheel for the target of every requirement in LIST, into DIR
    mkdir -p "$2"
    for requirement in $(grep -v '^#' "$1"); do
        if ! "${pip[@]}" download --quiet --no-deps --only-binary=:all: "${platform[@]}" -d "$2" "$requirement" 2>/dev/null; then
            # No wheel for the target: build one from the sdist (with Python $py where this machine has it).
            "${builder[@]}" wheel --quiet --no-deps --no-binary=:all: -w "$2" "$requirement"
            built+=("$requirement")
        fi
    done
}
fetch scripts/gpu-wheels.txt "$out"
# TRL for benchmarks.vs_trl (the `bench` extra), in a folder of its own that setup.sh installs
# when it is there: leave it out of a bundle for training only.
fetch scripts/bench-wheels.txt "$out/bench"
"${pip[@]}" download --quiet --no-deps --no-binary=:all: -d "$out" "deepspeed==0.19.8"
for wheel in "$out"/*.whl "$out"/bench/*.whl; do
    case "$wheel" in *-py2.py3-none-*|*-py3*-none-*|*-cp3*-abi3-*|*-cp${py/./}-*) ;;
        *) echo "wheelhouse: $wheel does not run on CPython $py" >&2; exit 1 ;;
    esac
done
echo "wheelhouse: $(find "$out" -type f | wc -l) files, $(du -sh "$out" | cut -f1), in $out${built:+ (built from sdists: ${built[*]})}"
