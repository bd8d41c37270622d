#!/usr/bin/env bash
# HiDe-Prompt, 5-datasets, iBOT-21K ViT-B/16 (the reference's train_5datasets_ibot21k.sh, with the settings of
# hideprompt_ssl_lib.sh): 4 x 32, seeds 42 40 44.
#   NPROC=4 DATA_PATH=./datasets SEEDS="42 40 44" bash training_script/train_5datasets_ibot21k.sh [main.py flags...]
NPROC=${NPROC:-4}
SEEDS=${SEEDS:-"42 40 44"}
source "$(dirname "$0")/hideprompt_ssl_lib.sh"
hide_ssl_two_stage five_datasets ibot21k vit_base_patch16_224.ibot_in22k "$@"
report_runs
