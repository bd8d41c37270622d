#!/usr/bin/env bash
# HiDe-Prompt, Split CUB-200, Sup-21K ViT-B/16 (the reference's train_cub_vit.sh, whose trailing backslash before
# `done` made it a bash syntax error): 8 x 24, seed 42.
#   NPROC=8 DATA_PATH=./datasets SEEDS=42 bash training_script/train_cub_vit.sh [main.py flags...]
NPROC=${NPROC:-8}
SEEDS=${SEEDS:-42}
source "$(dirname "$0")/hideprompt_lib.sh"
# the paper's settings of both stages are the cub_hideprompt presets
hide_two_stage cub vit_base_patch16_224.orig_in21k cub_vit cub_vit "" "" "$@"
report_runs
