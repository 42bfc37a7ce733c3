#!/usr/bin/env bash
# The default model's GPU recipe (issue 26): one command on one CUDA GPU, under 9 minutes of wall time.
#   scripts/gpu_default_model.sh OUT [--smoke]
# Inputs: gpu_data/ (git-ignored; STORYGPT_GPU_DATA elsewhere) with data/ (the two shared train files prepared
# with the shipped tokenizer) or train.txt + train_extra.txt, and heldout.txt. Make it on a machine with ../shared:
#   S=../shared/data/tinystories; mkdir -p gpu_data && cp $S/heldout.txt gpu_data/ &&
#   storygpt data prepare --input $S/train.txt $S/train_extra.txt --tokenizer src/storygpt/default_model --out gpu_data/data
# Runs from the source tree (PYTHONPATH=src), nothing installed; scripts/gpu_default_model.py has the recipe.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" "$ROOT/scripts/gpu_default_model.py" "$@"
