#!/usr/bin/env bash
# Honest baselines on Split CIFAR-100 (10 tasks) with the prompt methods' backbone (ImageNet-21k ViT-B/16):
# nearest class mean, linear probe, fix, sequential fine-tuning and the joint upper bound.
#   NPROC=8 DATA_PATH=./datasets bash training_script/train_cifar100_baselines.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source training_script/common.sh
NPROC=${NPROC:-8}
DATA_PATH=${DATA_PATH:-./datasets}
PORT=${MASTER_PORT:-29501}
SEEDS=${SEEDS:-"42 40 44"}

for seed in $SEEDS; do
  for method in ncm linear fix finetune joint; do
    launch_run torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "cifar100_${method}" \
      --model vit_base_patch16_224.orig_in21k --batch-size 24 --data-path "$DATA_PATH" --seed "$seed" \
      --output_dir "./output/cifar100_${method}_seed${seed}" "$@"
  done
done
report_runs
