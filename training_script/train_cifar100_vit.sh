#!/usr/bin/env bash
# HiDe-Prompt, Split CIFAR-100, Sup-21K ViT-B/16 (the reference's train_cifar100_vit.sh): 8 x 24, seeds 42 40 44.
#   NPROC=8 DATA_PATH=./datasets SEEDS="42 40 44" bash training_script/train_cifar100_vit.sh [main.py flags...]
NPROC=${NPROC:-8}
SEEDS=${SEEDS:-"42 40 44"}
source "$(dirname "$0")/hideprompt_lib.sh"
# the paper's settings of both stages are the cifar100_hideprompt presets
hide_two_stage cifar100 vit_base_patch16_224.orig_in21k cifar100_sup21k cifar100_vit "" "" "$@"
report_runs
