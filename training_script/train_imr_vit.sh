#!/usr/bin/env bash
# HiDe-Prompt, Split ImageNet-R, Sup-21K ViT-B/16 (the reference's train_imr_vit.sh): 8 x 24, seeds 42 40 44.
#   NPROC=8 DATA_PATH=./datasets SEEDS="42 40 44" bash training_script/train_imr_vit.sh [main.py flags...]
NPROC=${NPROC:-8}
SEEDS=${SEEDS:-"42 40 44"}
source "$(dirname "$0")/hideprompt_lib.sh"
# the paper's settings of both stages are the imr_hideprompt presets
hide_two_stage imr vit_base_patch16_224.orig_in21k imr_vit imr_vit "" "" "$@"
report_runs
