# shellcheck shell=bash
# Shared by the train_<dataset>_<backbone>.sh and train_<dataset>_lora.sh scripts (sourced, not run): HiDe's two
# launches per seed, as the reference's scripts make them. Stage 1 (task-identity inference, always the hideprompt
# subcommand, as the reference) for every seed into ./output/<stage-1 dir>_seed<seed>, then stage 2 (hideprompt or
# hidelora) for every seed into ./output/<stage-2 dir>_seed<seed>, reading stage 1 with --trained_original_model.
# Environment: NPROC (processes, default per script), DATA_PATH (default ./datasets), SEEDS, MASTER_PORT.
# Extra script arguments go to every launch (e.g. --resume after an interruption); DRY_RUN=1 or --dry-run first
# prints the launches (common.sh). The script ends with report_runs: the report over stage 1's and stage 2's runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source training_script/common.sh
DATA_PATH=${DATA_PATH:-./datasets}
PORT=${MASTER_PORT:-29501}

# hide_stages DATASET STAGE2_METHOD ORIGINAL_MODEL MODEL STAGE1_DIR STAGE2_DIR "STAGE-1 FLAGS" "STAGE-2 FLAGS" \
#   [main.py flags...]
hide_stages() {
  local dataset=$1 method=$2 original=$3 model=$4 tii_dir=$5 wtp_dir=$6 tii_flags=$7 wtp_flags=$8
  shift 8
  local seed
  for seed in $SEEDS; do
    # shellcheck disable=SC2086 # the flag strings are meant to split into words
    launch_run torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "${dataset}_hideprompt" \
      --model "$original" --original_model "$original" --data-path "$DATA_PATH" --seed "$seed" \
      --train_inference_task_only --output_dir "./output/${tii_dir}_seed${seed}" $tii_flags "$@"
  done
  for seed in $SEEDS; do
    # shellcheck disable=SC2086
    launch_run torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "${dataset}_${method}" \
      --model "$model" --original_model "$original" --data-path "$DATA_PATH" --seed "$seed" \
      --trained_original_model "./output/${tii_dir}_seed${seed}" \
      --output_dir "./output/${wtp_dir}_seed${seed}" $wtp_flags "$@"
  done
}

# hide_two_stage DATASET MODEL STAGE1_NAME STAGE2_NAME "STAGE-1 FLAGS" "STAGE-2 FLAGS" [main.py flags...]
# HiDe-Prompt with the reference's directory names (<stage-1 name>_multi_centroid_mlp_2, <stage-2 name>_pe).
hide_two_stage() {
  local dataset=$1 model=$2 tii_name=$3 pe_name=$4 tii_flags=$5 pe_flags=$6
  shift 6
  hide_stages "$dataset" hideprompt "$model" "$model" "${tii_name}_multi_centroid_mlp_2" "${pe_name}_pe" \
    "$tii_flags" "$pe_flags" "$@"
}

# one_stage_per_seed SUBCOMMAND MODEL OUTPUT_DIR "FLAGS" [main.py flags...]: one launch per seed (no stage 1)
one_stage_per_seed() {
  local subcommand=$1 model=$2 out_dir=$3 flags=$4
  shift 4
  local seed
  for seed in $SEEDS; do
    # shellcheck disable=SC2086
    launch_run torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "$subcommand" --model "$model" \
      --data-path "$DATA_PATH" --seed "$seed" --output_dir "./output/${out_dir}_seed${seed}" $flags "$@"
  done
}
