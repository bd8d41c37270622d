#!/usr/bin/env bash
# HiDe-Prompt, Split CIFAR-100, Sup-21K ViT-B/16 (the reference's train_cifar100_vit.sh): 8 x 24, seeds 42 40 44.
#   NPROC=8 DATA_PATH=./datasets SEEDS="42 40 44" bash training_script/train_cifar100_vit.sh [main.py flags...]
NPROC=${NPROC:-8}
SEEDS=${SEEDS:-"42 40 44"}
source "$(dirname "$0")/hideprompt_lib.sh"
hide_two_stage cifar100 vit_base_patch16_224.orig_in21k cifar100_sup21k cifar100_vit \
  "--batch-size 24 --epochs 20 --sched constant --lr 0.0005" \
  "--batch-size 24 --epochs 50 --ca_lr 0.005 --crct_epochs 30 --prompt_momentum 0.01 --reg 0.1 --length 5 \
   --sched step --larger_prompt_lr" "$@"
