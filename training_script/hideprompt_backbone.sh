#!/usr/bin/env bash
# HiDe-Prompt on one benchmark with one self-supervised backbone, with the reference's per-benchmark settings
# (its training_scripts/train_<dataset>_<backbone>.sh): per seed, stage 1 trains the task-identity model
# (--train_inference_task_only) and stage 2 the prompts, reading stage 1 through --trained_original_model.
# The backbone's weight file must be in ./checkpoints (python main.py --list_backbones says which file and where
# it is published). The train_<dataset>_<backbone>.sh scripts call this one.
#   bash training_script/hideprompt_backbone.sh {cifar100|imr|cub|five_datasets} {ibot21k|ibot|dino|mocov3} [flags]
#   NPROC=4 DATA_PATH=/data SEEDS=42 bash training_script/train_cifar100_ibot21k.sh --num_workers 8
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${1:-}
BACKBONE=${2:-}
shift 2 || true
DATA_PATH=${DATA_PATH:-./datasets}
PORT=${MASTER_PORT:-29500}

usage() {
  echo "usage: hideprompt_backbone.sh DATASET BACKBONE [main.py flags...]; DATASET is cifar100, imr, cub or" \
       "five_datasets, BACKBONE is ibot21k, ibot, dino or mocov3 (got '$DATASET' '$BACKBONE')" >&2
  exit 2
}

case "$BACKBONE" in
  ibot21k) MODEL=vit_base_patch16_224.ibot_in22k ;;
  ibot) MODEL=vit_base_patch16_224.ibot_in1k ;;
  dino) MODEL=vit_base_patch16_224.dino ;;
  mocov3) MODEL=vit_base_patch16_224.mocov3_in1k ;;
  *) usage ;;
esac

# stage-1 and stage-2 flags of the reference scripts; both stages also get --model, --original_model, batch, seed
case "$DATASET" in
  cifar100)
    SEEDS=${SEEDS:-"42 40 44"}; NPROC=${NPROC:-8}; BATCH=24
    STAGE1=(--epochs 20 --lr 0.0005 --ca_lr 0.005 --crct_epochs 30)
    STAGE2=(--epochs 20 --ca_lr 0.005 --crct_epochs 30 --prompt_momentum 0.1 --reg 0.1 --length 5
            --larger_prompt_lr) ;;
  imr)
    SEEDS=${SEEDS:-"42 40 44"}; NPROC=${NPROC:-8}; BATCH=24
    STAGE1=(--epochs 20 --lr 0.0005 --ca_lr 0.005 --crct_epochs 30)
    STAGE2=(--epochs 50 --sched constant --ca_lr 0.005 --crct_epochs 30 --prompt_momentum 0.01 --reg 0.5
            --length 20 --larger_prompt_lr) ;;
  cub)
    SEEDS=${SEEDS:-42}; NPROC=${NPROC:-8}; BATCH=24
    STAGE1=(--epochs 20 --lr 0.0005 --ca_lr 0.005 --crct_epochs 30)
    STAGE2=(--epochs 50 --ca_lr 0.005 --crct_epochs 30 --prompt_momentum 0.01 --reg 0.01 --length 20
            --larger_prompt_lr) ;;
  five_datasets)
    SEEDS=${SEEDS:-"42 40 44"}; NPROC=${NPROC:-4}; BATCH=32
    STAGE1=(--epochs 20 --sched constant --lr 0.001)
    STAGE2=(--epochs 20 --sched constant --lr 0.03 --clip-grad 2 --reg 0.1 --prompt_momentum 0.01
            --larger_prompt_lr) ;;
  *) usage ;;
esac

for seed in $SEEDS; do
  common=(--model "$MODEL" --original_model "$MODEL" --batch-size "$BATCH" --data-path "$DATA_PATH" --seed "$seed")
  stage1_dir="./output/${DATASET}_${BACKBONE}_multi_centroid_mlp_2_seed${seed}"
  torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "${DATASET}_hideprompt" "${common[@]}" \
    "${STAGE1[@]}" --train_inference_task_only --output_dir "$stage1_dir" "$@"
  torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "${DATASET}_hideprompt" "${common[@]}" \
    "${STAGE2[@]}" --trained_original_model "$stage1_dir" \
    --output_dir "./output/${DATASET}_${BACKBONE}_pe_seed${seed}" "$@"
done
