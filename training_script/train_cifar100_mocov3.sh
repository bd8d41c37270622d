#!/usr/bin/env bash
# HiDe-Prompt, Split CIFAR-100, MoCo v3-1K ViT-B/16 (the reference's train_cifar100_mocov3.sh, with the settings of
# hideprompt_ssl_lib.sh): 8 x 24, seeds 42 40 44.
#   NPROC=8 DATA_PATH=./datasets SEEDS="42 40 44" bash training_script/train_cifar100_mocov3.sh [main.py flags...]
NPROC=${NPROC:-8}
SEEDS=${SEEDS:-"42 40 44"}
source "$(dirname "$0")/hideprompt_ssl_lib.sh"
hide_ssl_two_stage cifar100 mocov3 vit_base_patch16_224.mocov3_in1k "$@"
report_runs
