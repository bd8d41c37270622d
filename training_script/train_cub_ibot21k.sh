#!/usr/bin/env bash
# HiDe-Prompt, Split CUB-200, iBOT-21K ViT-B/16 (the reference's train_cub_ibot21k.sh, with the settings of
# hideprompt_ssl_lib.sh): 8 x 24, seeds 42.
#   NPROC=8 DATA_PATH=./datasets SEEDS=42 bash training_script/train_cub_ibot21k.sh [main.py flags...]
NPROC=${NPROC:-8}
SEEDS=${SEEDS:-42}
source "$(dirname "$0")/hideprompt_ssl_lib.sh"
hide_ssl_two_stage cub ibot21k vit_base_patch16_224.ibot_in22k "$@"
report_runs
