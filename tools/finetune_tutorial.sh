#!/usr/bin/env bash
# The fine-tuning tutorial of docs/finetune.md, every step: teach the demo model a color it never saw ("teal") with
# LoRA adapters, on the CPU. Run from the repository root after `make demo` (which trains runs/demo/fusedit):
#
#   bash tools/finetune_tutorial.sh
#
# The variables below size it (their defaults are the recipe measured in docs/finetune.md);
# tests/finetune/test_tutorial.py runs this script at a tiny size. Extra arguments are key=value overrides for
# `fusedit train`. Each step's wall time is printed (bash's `time`: real, user, sys).
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
BASE=${BASE:-runs/demo/fusedit}        # the model to adapt: a run, an exported folder or a reference folder
DATA=${DATA:-data/teal}                # the image folder written in step 1
RUN=${RUN:-runs/teal}                  # the LoRA run
OUT=${OUT:-$RUN/scores}                # grids and scores
COUNT=${COUNT:-300}                    # teal images
PRIOR=${PRIOR:-200}                    # and the shapes world's own images with their captions (prior preservation)
RESOLUTION=${RESOLUTION:-32}           # their side (the base model's data.resolution)
STEPS=${STEPS:-900}                    # LoRA training steps
BATCH=${BATCH:-32}
LR=${LR:-3e-3}
RANK=${RANK:-4}
TARGETS=${TARGETS:-[attention, mlp]}   # the DiT projections that get adapters
CAPTION_DROPOUT=${CAPTION_DROPOUT:-0}  # 0: the empty caption (the unconditional side of CFG) never sees teal
PER_PROMPT=${PER_PROMPT:-4}            # scored samples per prompt
SAMPLE_STEPS=${SAMPLE_STEPS:-25}

fusedit() { "$PYTHON" -m fusedit.cli "$@"; }

echo "== 1. the data: $COUNT images of teal objects and $PRIOR of the shapes world, with captions (captions.jsonl)"
time "$PYTHON" tools/teal_tutorial.py data "$DATA" --count "$COUNT" --prior "$PRIOR" --resolution "$RESOLUTION"

echo "== 2. LoRA fine-tuning of $BASE (rank $RANK on $TARGETS, $STEPS steps of $BATCH images, lr $LR)"
time fusedit train "$BASE/config.yaml" \
  name=teal data.source=folder data.path="$DATA" data.resolution="$RESOLUTION" \
  finetune.lora.rank="$RANK" finetune.lora.alpha="$RANK" "finetune.lora.target_modules=$TARGETS" \
  train.max_steps="$STEPS" train.batch_size="$BATCH" train.lr="$LR" train.lr_schedule=constant \
  train.warmup_steps=0 train.ema_every=0 train.sample_every=0 train.checkpoint_every="$STEPS" \
  train.log_every=50 train.caption_dropout="$CAPTION_DROPOUT" "$@" \
  --init-from "$BASE" --run-dir "$RUN" --no-resume

echo "== 3. before / after / ground truth: the same prompts and seeds, the base model, then with the adapters loaded"
time "$PYTHON" tools/teal_tutorial.py score "$BASE" --lora "$RUN/final/adapter" --out "$OUT" \
  --per-prompt "$PER_PROMPT" --steps "$SAMPLE_STEPS"

echo "== 4. the adapters from the command line, at full and at half weight"
fusedit sample "$BASE" --lora "$RUN/final/adapter" --prompt "a teal circle" --out "$OUT/teal-circle.png" \
  --steps "$SAMPLE_STEPS"
fusedit sample "$BASE" --lora "$RUN/final/adapter:0.5" --prompt "a teal circle" --out "$OUT/teal-circle-half.png" \
  --steps "$SAMPLE_STEPS"
