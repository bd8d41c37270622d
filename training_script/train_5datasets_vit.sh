#!/usr/bin/env bash
# HiDe-Prompt, 5-datasets, Sup-21K ViT-B/16 (the reference's train_5datsets_vit.sh, fixed: its trailing backslash
# before `done` was a syntax error): 4 x 32, seeds 42 40 44; prompt length 40, pool 5 and MLP [4, 4] come from the
# five_datasets_hideprompt preset.
#   NPROC=4 DATA_PATH=./datasets SEEDS="42 40 44" bash training_script/train_5datasets_vit.sh [main.py flags...]
NPROC=${NPROC:-4}
SEEDS=${SEEDS:-"42 40 44"}
source "$(dirname "$0")/hideprompt_lib.sh"
# the paper's settings of both stages are the five_datasets_hideprompt presets
hide_two_stage five_datasets vit_base_patch16_224.orig_in21k 5datasets_vit 5datasets_vit "" "" "$@"
report_runs
