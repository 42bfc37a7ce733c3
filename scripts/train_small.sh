#!/usr/bin/env bash
# The 10-minute CPU recipe: tokenizer -> token shards -> train the `small` preset -> held-out eval.
#   bash scripts/train_small.sh [TINYSTORIES_DIR] [WORK_DIR] [MINUTES]
set -euo pipefail
DATA=${1:-../shared/data/tinystories}
WORK=${2:-runs/small}
MINUTES=${3:-10}
mkdir -p "$WORK"
storygpt tokenizer train --input "$DATA/train.txt" --vocab-size 4096 --type unigram --out "$WORK/tokenizer"
storygpt data prepare --input "$DATA/train.txt" --tokenizer "$WORK/tokenizer" --out "$WORK/data"
storygpt train --data "$WORK/data" --out "$WORK/run" --preset small --max-time "$MINUTES"
storygpt eval --model "$WORK/run" --text "$DATA/heldout.txt"
