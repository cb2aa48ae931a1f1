#!/usr/bin/env bash
# Checks a GPU machine end to end and measures it: installs (offline when ZAYA_WHEELHOUSE names a
# scripts/wheelhouse.sh bundle), runs `pytest -m gpu`, the one-GPU default recipe and the GPU
# benchmarks, each step under a time limit and each logged on its own, going on past a failed step.
#   usage: bash scripts/gpu_suite.sh [STEP ...]   (default: setup tests recipe rollout sync)
# Other steps, run only when named:
# - rl_lr (after recipe): its RL stage again from the warmup at the learning rates in ZAYA_RL_LRS
#   (default "5.0e-6 5.0e-5");
# - rl_vs_sft: benchmarks.rl_vs_sft on recipes/gpu.yaml (the recipe, then its RL training seconds
#   spent on more SFT from its warmup, paired on the held-out set) for the seeds in ZAYA_SEEDS
#   (default 0), about 15 minutes a seed on an H100, less the recipe's run at seed 0 when the
#   recipe step made one;
# - trl: benchmarks.vs_trl on recipes/gpu.yaml, our RL stage against TRL's GRPOTrainer (vLLM colocate)
#   from the recipe step's warmup when it ran (else its own); needs the bundle's bench/ (TRL);
# - async: benchmarks.async_rl at staleness bounds 0-2, ZAYA_ASYNC_STEPS (default 30) steps each, from
#   the recipe step's warmup when it ran (else its own), the RL runs on the card split in halves; their
#   learner takes its batch in 4 passes, since the engine's half stays allocated while it trains and
#   a 256-prompt batch in one pass needed 49 GiB on an H100.
# Run checkpoints are deleted once a step has read them: a gpu.yaml checkpoint is about 10 GB.
# Logs, a `status` line per step and the recipe's run go to ZAYA_SUITE_DIR (default runs/gpu_suite);
# the benchmarks write their JSON under ZAYA_RESULTS/gpu/ (default benchmarks/results/gpu/).
# Exits non-zero when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${ZAYA_SUITE_DIR:-runs/gpu_suite}
mkdir -p "$dir"
results=${ZAYA_RESULTS:-benchmarks/results}
py=.venv/bin/python
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, log it, record how it ended
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "== $name: $* (limit ${limit} s)"
    timeout --signal=TERM --kill-after=30 "$limit" "$@" >"$dir/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" | tee -a "$dir/status"
    tail -n 25 "$dir/$name.log"
    return $rc
}

clean() {  # clean PATH...: delete what a step left behind, keeping the step's exit status
    local rc=$?
    rm -rf "$@"
    return $rc
}

failed=0
steps=("$@")
[ $# -gt 0 ] || steps=(setup tests recipe rollout sync)
for name in "${steps[@]}"; do
    case $name in
        setup) step setup 900 bash scripts/setup.sh && step versions 60 bash -c \
            "nvidia-smi; $py -c 'import torch, vllm, ray, deepspeed, transformers; print(torch.__version__, vllm.__version__, ray.__version__, deepspeed.__version__, transformers.__version__, torch.cuda.get_device_name())'" ;;
        tests) step tests 1500 "$py" -m pytest -m gpu tests/gpu -v -p no:cacheprovider --timeout 1200 ;;
        recipe) step recipe 1500 .venv/bin/zaya-rl run recipes/gpu.yaml --run-dir "$dir/run" \
            && step recipe_phases 300 "$py" -m benchmarks.gpu_recipe --run-dir "$dir/run" --out "$results" \
            ; clean "$dir/run/checkpoints" ;;
        rl_lr) for lr in ${ZAYA_RL_LRS:-5.0e-6 5.0e-5}; do
                step "rl_lr_$lr" 600 .venv/bin/zaya-rl run recipes/gpu.yaml --stage rl --from "$dir/run/stages/warmup" \
                    --run-dir "$dir/rl_lr_$lr" --set "stages.rl.lr=$lr"
                clean "$dir/rl_lr_$lr/checkpoints" || failed=1
            done ;;
        async) warmup=()  # the recipe step's warmup when it ran, else the benchmark's own
            [ -d "$dir/run/stages/warmup" ] && warmup=(--warmup-from "$dir/run/stages/warmup")
            step async 1500 "$py" -m benchmarks.async_rl --recipe recipes/gpu.yaml --bounds 0 1 2 \
            --steps "${ZAYA_ASYNC_STEPS:-30}" "${warmup[@]}" --out "$results/gpu" \
            --rl-set resources.placement=split --rl-set resources.rollout_gpus=0.5 --rl-set resources.learner_gpus=0.5 \
            --rl-set deepspeed.length_buckets=4 ;;
        trl) warmup=()  # the recipe step's warmup when it ran, else the benchmark's own
            [ -d "$dir/run/stages/warmup" ] && warmup=(--warmup "$dir/run/stages/warmup")
            step trl 1500 "$py" -m benchmarks.vs_trl --recipe recipes/gpu.yaml "${warmup[@]}" --out "$results/gpu" ;;
        rl_vs_sft) seeds=(${ZAYA_SEEDS:-0}) reuse=()  # the recipe step's run is the first seed's when it is seed 0
            [ -f "$dir/run/summary.json" ] && [ "${seeds[0]}" = 0 ] && reuse=(--recipe-run "$dir/run")
            step rl_vs_sft 1800 "$py" -m benchmarks.rl_vs_sft --recipe recipes/gpu.yaml --seeds "${seeds[@]}" \
            "${reuse[@]}" --out "$results/gpu" ;;
        rollout) step rollout 900 "$py" -m benchmarks.rollout_throughput --gpu --out "$results" ;;
        sync) step sync 900 "$py" -m benchmarks.weight_sync --gpu --out "$results" ;;
        *) echo "gpu_suite: unknown step '$name' (setup tests recipe rl_lr rl_vs_sft rollout sync async trl)" >&2; exit 2 ;;
    esac || failed=1
done
echo "== done: $(tr '\n' ' ' <"$dir/status")"
exit $failed
