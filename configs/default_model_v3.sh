#!/usr/bin/env bash
# The recipe of the shipped default model v3 (issue 13): the v2 model (configs/default_model_v2.toml) after one
# round of rejection-sampling fine-tuning on its own stories that pass the story-quality suite's checks.
# Reproducible by step count; run from the repository root with the v2 model directory as $V2 (git history:
# src/storygpt/default_model before this recipe) and a work folder $W outside git.
#
#   1. the v2 data again (same tokenizer, same train/val split; the val split is the dev set of names_probe)
#   2. 1,200 beginnings of the train split (first 20% of the words), 8 completions each at the suite's sampling
#      (temperature 1.0, top-p 1.0, 256 new tokens), the first 2 that pass every check kept:
#      9,600 completions, 2,381 passed (failed first: 737 no ending, 3,895 names, 2,563 spelling, 24 loops),
#      1,614 stories kept (35 min on 2 cores, fp32)
#   3. 128 steps of 8 x 512 tokens on them (about 2 passes), lr 3e-4 -> 3e-5, all weights (3 min, bf16)
#   4. the step-128 weights in fp16 (`average` of the one kept snapshot; the run's "best" is step 0, because the
#      loss on held-out samples rises a little while the model moves its mass off the tail)
set -euo pipefail
S=${S:-../shared/data/tinystories}
V2=${V2:?the v2 model directory}
W=${W:?a work folder outside git}

storygpt data prepare --input "$S/train.txt" "$S/train_extra.txt" --tokenizer "$V2" --out "$W/data"
storygpt data sample --model "$V2" --data "$W/data" --out "$W/samples.txt" --prompts 1200 --samples 8 --keep 2 \
    --cut 0.2 --seed 0
storygpt data prepare --input "$W/samples.txt" --tokenizer "$V2" --out "$W/samples-data" --val-fraction 0.05
storygpt finetune --model "$V2" --data "$W/samples-data" --out "$W/rft" --steps 128 --lr 3e-4 --batch-size 8 \
    --seq-len 512 --set min_lr=3e-5 --set warmup_steps=10 --set model.dropout=0 --set eval_interval=32 \
    --set snapshot_from=128
storygpt average "$W/rft" --from-step 128 --out "$W/model_v3" --dtype fp16
