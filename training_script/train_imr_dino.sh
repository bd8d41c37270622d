#!/usr/bin/env bash
# HiDe-Prompt, Split ImageNet-R, DINO-1K ViT-B/16 (the reference's train_imr_dino.sh, with the settings of
# hideprompt_ssl_lib.sh): 8 x 24, seeds 42 40 44.
#   NPROC=8 DATA_PATH=./datasets SEEDS="42 40 44" bash training_script/train_imr_dino.sh [main.py flags...]
NPROC=${NPROC:-8}
SEEDS=${SEEDS:-"42 40 44"}
source "$(dirname "$0")/hideprompt_ssl_lib.sh"
hide_ssl_two_stage imr dino vit_base_patch16_224.dino "$@"
report_runs
