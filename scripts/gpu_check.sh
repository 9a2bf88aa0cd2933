#!/usr/bin/env bash
# The CUDA paths in one run, for whoever has a GPU: QLoRA DPO steps, bf16 weights, offline AE and
# online Borda steps, torchrun with ddp and fsdp on the GPUs present, the benchmarks with
# --device cuda, and the vLLM backend against HF (greedy agreement, log-prob guard, tokens/s) when
# .venv-vllm exists. Under 8 minutes on one GPU; prints one summary block at the end (put its figures
# in the README). Data from the repository only (the tests' synthetic preference pairs, data/),
# models built from config (the tiny Llama at a GPU-sized width): no network, no model download.
#
#   bash scripts/gpu_check.sh                   # .venv/bin/python, else python3
#   PYTHON=python3 bash scripts/gpu_check.sh    # another interpreter; wheels in .whl/ are installed first
#
# Logs: $OUT (when set) or /tmp/gpu_check, one file per check. The torchrun checks run one rank per GPU
# (NCCL) where there are several, and 2 ranks sharing the GPU (distributed.backend=gloo: NCCL cannot put
# two ranks on one GPU) where there is one. scripts/dist_check.py checks figures there: the chosen pairs
# equal the one-process run's, the eval loss finite and falling, the weights (fp32) within 1e-4, for
# DDP/FSDP x LoRA/full fine-tune x bf16/fp32, each run killed at step 2 and resumed (FSDP: on the same
# ranks and alone).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
LOGS=${OUT:-/tmp/gpu_check}
RUNS=/tmp/gpu_check_runs
mkdir -p "$LOGS" && rm -rf "$RUNS" && mkdir -p "$RUNS"
"$PY" -c "import sys; sys.path.insert(0, 'tests'); from conftest import write_synthetic_pairs; write_synthetic_pairs('$RUNS/pairs.jsonl', 512)"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu (no GPU found)')" 2>/dev/null)
NPROC=$(( GPUS > 1 ? GPUS : 2 ))
BACKEND=()                                 # one GPU: two ranks share it through gloo
[ "$GPUS" -eq 1 ] && BACKEND=(distributed.backend=gloo)
SUMMARY=()

# A GPU-sized tiny Llama (about 25M parameters) on 512 synthetic pairs; 64 labels, 2 evals.
TINY=(model=tiny model.architecture.vocab_size=1024 model.architecture.hidden_size=512
      model.architecture.intermediate_size=1408 model.architecture.num_hidden_layers=6
      local_dirs=[$RUNS] cache_dir=$RUNS/cache wandb.enabled=false optimizer=AdamW lr=1e-4 warmup_steps=0
      max_length=256 max_prompt_length=192 eval_batch_size=16 n_eval_examples=32)
HH=(datasets=[$RUNS/pairs.jsonl] loss=dpo batch_size=16 n_examples=64 eval_every=32)
HAIKU=(datasets=[haikus] dataset_files.haikus=data/haiku_keywords.txt loss=dpo online=true oracle=haiku lora=true
       batch_size=8 n_examples=32 eval_every=16 generation.max_new_tokens=32 n_eval_model_samples=8)

check() {   # check NAME COMMAND...: run it, keep its log, add one summary line with its last figures
  local name=$1; shift
  local start=$SECONDS status
  if timeout "${LIMIT:-300}" "$@" >"$LOGS/$name.log" 2>&1; then status=ok; else status="FAILED (exit $?)"; fi
  local figures
  figures=$(grep -a -E "^steps [0-9]+|loss/eval |win_rate/win_rate |^\| [0-9]+ \||naive / ours =|selection reproducibility|greedy agreement|log-prob guard|tokens/s|^dist_check:" "$LOGS/$name.log" \
            | tr -s ' ' | tr '\n' ';' | cut -c1-400)
  SUMMARY+=("$(printf '%-22s %-16s %4d s  %s' "$name" "$status" $((SECONDS - start)) "$figures")")
  [ "$status" = ok ] || tail -n 5 "$LOGS/$name.log" | sed "s/^/    $name: /"
}

check qlora_dpo        "$PY" -u train.py "${TINY[@]}" "${HH[@]}" qlora=true exp_name=gpu_qlora
check bf16_dpo         "$PY" -u train.py "${TINY[@]}" "${HH[@]}" model.policy_dtype=bfloat16 model.reference_dtype=bfloat16 exp_name=gpu_bf16
check offline_ae       "$PY" -u train.py "${TINY[@]}" "${HH[@]}" lora=true active=true selection_strategy=ae exp_name=gpu_ae
check online_borda     "$PY" -u train.py "${TINY[@]}" "${HAIKU[@]}" selection_strategy=borda exp_name=gpu_borda
LIMIT=600 check torchrun_matrix "$PY" scripts/dist_check.py --nproc $NPROC --work "$RUNS/dist_check" -- \
                       "${TINY[@]}" "${HH[@]}" "${BACKEND[@]}"
check torchrun_borda   "$PY" -m torch.distributed.run --nproc_per_node=$NPROC train.py "${TINY[@]}" "${HAIKU[@]}" \
                       selection_strategy=borda distributed.strategy=fsdp "${BACKEND[@]}" exp_name=gpu_fsdp_borda
BENCH=(--model tiny --data tests/fixtures/hh.jsonl --cache-dir "$RUNS/cache")
if [ "$GPUS" -gt 0 ]; then
  check bench_selection "$PY" scripts/bench_selection.py --device cuda "${BENCH[@]}" --pairs 16 --prompt-len 64 --response-len 64
  PROCS=(1); for n in 2 4 8; do [ "$GPUS" -ge $n ] && PROCS+=($n); done
  check bench_scaling   "$PY" scripts/bench_scaling.py --device cuda "${BENCH[@]}" --pool 48 --pairs 16 \
                        --prompt-len 64 --response-len 64 --procs "${PROCS[@]}" --strategy fsdp
fi

if [ -x .venv-vllm/bin/python ]; then   # generation.backend=vllm: make vllm-venv first
  check vllm_agreement "$PY" scripts/vllm_agreement.py --device "$([ "$GPUS" -gt 0 ] && echo cuda || echo cpu)" --prompts 16
fi

echo
echo "==== gpu_check: $DEVICE, $GPUS GPU(s), torch $("$PY" -c 'import torch; print(torch.__version__)'), logs in $LOGS ===="
printf '%s\n' "${SUMMARY[@]}"
grep -a -E "^[a-z0-9_]+ \([0-9]+ ranks, killed" "$LOGS/torchrun_matrix.log" | sed 's/^/  /'
