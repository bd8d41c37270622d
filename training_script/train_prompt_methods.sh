#!/usr/bin/env bash
# L2P, DualPrompt and S-Prompt++ on one benchmark with the reference's settings: ImageNet-21k ViT-B/16 as prompted
# and query model, 8 processes x batch 24 (5-datasets: 16, its configs' default), seed 42; the epochs and everything
# else come from the subcommand's preset (CIFAR-100: L2P 5, S-Prompt++ 40, DualPrompt 40, as the reference README;
# ImageNet-R 50 with lr 0.005, CUB-200 and 5-datasets 5, as its per-dataset configs).
#   bash training_script/train_prompt_methods.sh [--dry-run] {cifar100|imr|cub|five_datasets} [extra main.py flags...]
#   NPROC=4 DATA_PATH=/data SEEDS="42 40 44" METHODS="l2p dualprompt" bash training_script/train_prompt_methods.sh imr
set -euo pipefail
cd "$(dirname "$0")/.."
source training_script/common.sh
DATASET=${1:-}
shift || true
NPROC=${NPROC:-8}
DATA_PATH=${DATA_PATH:-./datasets}
PORT=${MASTER_PORT:-29503}
SEEDS=${SEEDS:-42}
METHODS=${METHODS:-"l2p sprompt dualprompt"}
MODEL=${MODEL:-vit_base_patch16_224.orig_in21k}

case "$DATASET" in
  cifar100|imr|cub|five_datasets) ;;
  *) echo "usage: train_prompt_methods.sh [--dry-run] DATASET [main.py flags...]; DATASET is cifar100, imr, cub or" \
          "five_datasets (got '$DATASET')" >&2; exit 2 ;;
esac

for seed in $SEEDS; do
  for method in $METHODS; do
    launch_run torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "${DATASET}_${method}" \
      --model "$MODEL" --original_model "$MODEL" --data-path "$DATA_PATH" --seed "$seed" \
      --output_dir "./output/${DATASET}_vit_${method}_seed${seed}" "$@"
  done
done
report_runs
