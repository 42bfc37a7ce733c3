#!/usr/bin/env bash
# The instruct model on the v4 default model (issue 26), on one CUDA GPU in about 5 minutes of wall time: a LoRA
# adapter (r=32) and a full fine-tune trained side by side for MINUTES (default 3.5) each, on TinyStories-Instruct
# records of the two shared train files, then packed to come back (files of at most 16 MiB, bf16 weights).
#   scripts/gpu_instruct.sh OUT [--smoke]
# Inputs (git-ignored, travels with the repository; STORYGPT_GPU_INSTRUCT elsewhere), made on a machine with ../shared:
#   S=../shared/data/tinystories; mkdir -p gpu_instruct
#   storygpt data instruct --input $S/train.txt $S/train_extra.txt --out records.txt --seed 0 --copies 2
#   gzip -c records.txt > gpu_instruct/records.txt.gz
# The base model is the shipped default model (STORYGPT_INSTRUCT_BASE for another).
# Runs from the source tree (PYTHONPATH=src), nothing installed. --smoke: a few CPU steps (CI).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:?usage: scripts/gpu_instruct.sh OUT [--smoke]}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
IN="${STORYGPT_GPU_INSTRUCT:-$ROOT/gpu_instruct}"
PY="${PYTHON:-python3}"
BASE="${STORYGPT_INSTRUCT_BASE:-$ROOT/src/storygpt/default_model}"
W="$(dirname "$OUT")/$(basename "$OUT")_work"
mkdir -p "$OUT" "$W/lora" "$W/full"
gunzip -c "$IN/records.txt.gz" > "$W/records.txt"
"$PY" -m storygpt data prepare --input "$W/records.txt" --tokenizer "$BASE" --out "$W/data" --quiet
common=(--model "$BASE" --data "$W/data" --quiet --set model.dropout=0 --set eval_interval=200
        --set checkpoint_interval=100000 --set log_interval=20)
if [ "${2:-}" = "--smoke" ]; then
  common+=(--steps 4 --batch-size 2 --seq-len 128 --no-compile --set device=cpu --set eval_iters=1 --set eval_interval=2)
else
  common+=(--steps 1000000 --batch-size 64 --seq-len 512 --compile --set dtype=bf16 --set "max_time=${MINUTES:-3.5}")
fi
"$PY" -m storygpt finetune "${common[@]}" --lora 32 --out "$W/lora" > "$W/lora/stdout.txt" 2>&1 &
lora=$!
"$PY" -m storygpt finetune "${common[@]}" --lr 5e-4 --set min_lr=5e-5 --set model.dropout=0.1 --out "$W/full" > "$W/full/stdout.txt" 2>&1 &
full=$!
status=0
wait $lora || { status=1; echo "gpu_instruct: the LoRA run failed:"; tail -5 "$W/lora/stdout.txt"; }
wait $full || { status=1; echo "gpu_instruct: the full fine-tune failed:"; tail -5 "$W/full/stdout.txt"; }
tar czf "$OUT/lora.tar.gz" -C "$W/lora" $(cd "$W/lora" && ls -d adapter config.json log.jsonl summary.json stdout.txt 2>/dev/null)
tar czf "$OUT/full.tar.gz" -C "$W/full" $(cd "$W/full" && ls -d config.json log.jsonl summary.json stdout.txt 2>/dev/null)
if [ -f "$W/full/model/model.safetensors" ]; then
  "$PY" -c "import sys; sys.path.insert(0, '$ROOT/scripts'); from pathlib import Path; import gpu_default_model as g; print(g.pack_weights(Path('$W/full/model'), Path('$OUT'), 'full'))"
fi
exit $status
