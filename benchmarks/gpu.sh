#!/usr/bin/env bash
# GPU figures for the sampler and the PPO step on one NVIDIA GPU, a ~1B Llama-shaped model in bf16.
#
#   OUT=runs/gpu-bench bash benchmarks/gpu.sh
#
# Runs from the repository root with whatever python3 holds a CUDA jax (no install step: a GPU
# image usually has jax, optax and a flax; FLAX_WHEEL points at a flax wheel to use instead).
# Each benchmark runs in its own process under a time limit, prints its JSON line, and keeps its
# whole log under $OUT, so one failure (say, an unsupported cuDNN attention shape) loses nothing else.
#   ppo_*      `cairl bench ppo`: PPO update of policy + value, MFU against the measured bf16 matmul
#              peak and the datasheet peak (issue #4 asks for >= 40% on an H100).
#   sampler_*  `cairl bench sampler`: decode tokens/s at batch 1 and 64 against the bandwidth
#              roofline measured on the same GPU (issue #3).
set -u
out=${OUT:-runs/gpu-bench}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

if [[ -n "${FLAX_WHEEL:-}" ]]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/cairl-site "$FLAX_WHEEL" \
    && export PYTHONPATH=/tmp/cairl-site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  "$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$out/device.txt"

bench() {  # NAME SECONDS ARGS...: one benchmark in its own process, under a time limit
  local name=$1 limit=$2
  shift 2
  echo "== $name: cairl bench $*"
  timeout "$limit" "$py" -m trainer.cli bench "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 1 "$out/$name.log"
  [[ $rc == 0 ]] || { echo "$name exited $rc; last lines:"; tail -n 15 "$out/$name.log"; }
}

ppo=(ppo --model llama-3.2-1b --dtype bfloat16 --batch "${PPO_BATCH:-4}" --seq-len 1024 --response-len 512 --runs 3)
sampler=(sampler --model random:llama-3.2-1b --dtype bfloat16 --prompt-len 128 --new-tokens 128 --runs 3)
bench ppo_xla "${PPO_LIMIT:-150}" "${ppo[@]}" --attention xla
bench sampler_b1 "${SAMPLER_LIMIT:-80}" "${sampler[@]}" --batch 1
bench sampler_b64 "${SAMPLER_LIMIT:-80}" "${sampler[@]}" --batch 64
bench ppo_cudnn "${PPO_LIMIT:-150}" "${ppo[@]}" --attention cudnn
