#!/usr/bin/env bash
# Few-shot LoRA on ImageNet-R with the reference's train_imr_ibot21k_few_shot.sh settings (iBOT-21K ViT-B/16, seed 42):
# upstream, 8 tasks over classes 0..159, 8 x 24, 50 epochs, lr 0.01, LoRA rank 8: the vanilla model (linear probe),
# then the shared model (one LoRA); then 50 episodes of 5-way 5-shot on the held-out classes 160..164, 50 epochs per
# episode's head, on the shared backbone. The reference ran its episodes on one GPU; here they are shared out among
# the NPROC processes with the same results. The iBOT weights go in checkpoints/ (see checkpoints/README.md).
#   NPROC=8 DATA_PATH=./datasets SEEDS=42 bash training_script/train_imr_ibot21k_few_shot.sh [main.py flags...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source training_script/common.sh
NPROC=${NPROC:-8}
SEEDS=${SEEDS:-42}
DATA_PATH=${DATA_PATH:-./datasets}
PORT=${MASTER_PORT:-29501}
MODEL=vit_base_patch16_224_21k_ibot
for seed in $SEEDS; do
  out="./output/imr_ibot21k_few_shot_seed${seed}"
  vanilla="./output/imr_ibot21k_vanilla_model_seed${seed}"
  shared="./output/imr_ibot21k_shared_model_seed${seed}"
  # the paper's settings (50 epochs at lr 0.01, rank 8; 50 episodes of 5-way 5-shot) are the preset's
  common=(imr_few_shot_lora --model "$MODEL" --data-path "$DATA_PATH" --seed "$seed" --output_dir "$out"
          --vanilla_model_output_dir "$vanilla" --shared_model_output_dir "$shared")
  for part in --train_vanilla --train_shared; do
    run_or_print torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "${common[@]}" "$part" "$@" \
      "${REFERENCE_FLAG[@]}"
  done
  run_or_print torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "${common[@]}" --train_few_shot "$@" \
    "${REFERENCE_FLAG[@]}"
  # the runs (results.json) are the two upstream ones; the episodes' few_shot_*.json in $out are no run
  record_run "$vanilla"
  record_run "$shared"
done
report_runs
