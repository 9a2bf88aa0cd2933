#!/usr/bin/env bash
# Serve a base model with vLLM's OpenAI-compatible server and runtime LoRA loading, on loopback, from
# the vLLM venv (make vllm-venv). A run with generation.backend=vllm generation.vllm.url=http://127.0.0.1:PORT
# then samples there: it loads its policy adapter each step and samples the reference from the base.
#
#   scripts/vllm_server.sh MODEL [PORT] [more vllm arguments, e.g. --dtype bfloat16 --gpu-memory-utilization 0.3]
#
# MODEL is what the run's model.name_or_path loads (a hub id or a directory; SmolLM2's converted copy is
# .cache/models/smollm2-135m). The run checks every step that the server's log-probs are its own.
set -euo pipefail
MODEL=${1:?usage: scripts/vllm_server.sh MODEL [PORT] [vllm arguments...]}
PORT=${2:-8000}
shift $(( $# < 2 ? $# : 2 ))
VENV=${VLLM_VENV:-.venv-vllm}
[ -x "$VENV/bin/python" ] || { echo "error: no $VENV; run make vllm-venv" >&2; exit 2; }
# the backend loads and unloads adapters while serving
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
DEVICE_ARGS=()
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # the CPU build: GiB of KV cache (its default takes a large share of the memory), and every core for
  # the model (by default it keeps one back, which halves the speed on a 2-core machine)
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
  export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-0-$(( $(nproc) - 1 ))}
  export VLLM_CPU_NUM_OF_RESERVED_CPU=${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
  # vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a seeded request's prompt
  # is prefilled in chunks, and every request here is seeded: prefill whole prompts
  DEVICE_ARGS=(--no-enable-chunked-prefill --max-num-batched-tokens 16384)
fi
# `python -m` rather than `vllm serve`: the CLI of the vllm-cpu package looks up a distribution named
# vllm and stops. --generation-config vllm: ignore the model's generation_config.json; requests say all.
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" --host 127.0.0.1 --port "$PORT" \
  --enable-lora --max-lora-rank "${MAX_LORA_RANK:-64}" --max-loras 2 --seed 0 --generation-config vllm \
  "${DEVICE_ARGS[@]}" "$@"
