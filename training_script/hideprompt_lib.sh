# Shared by the train_<dataset>_<backbone>.sh scripts (sourced, not run): HiDe-Prompt's two launches per seed, as
# the reference's scripts make them. Stage 1 (task-identity inference) for every seed into
# ./output/<stage-1 name>_multi_centroid_mlp_2_seed<seed>, then stage 2 for every seed into
# ./output/<stage-2 name>_pe_seed<seed>, reading stage 1 with --trained_original_model.
# Environment: NPROC (processes, default per script), DATA_PATH (default ./datasets), SEEDS, MASTER_PORT.
# Extra script arguments go to both stages (e.g. --resume after an interruption).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DATA_PATH=${DATA_PATH:-./datasets}
PORT=${MASTER_PORT:-29501}

# hide_two_stage DATASET MODEL STAGE1_NAME STAGE2_NAME "STAGE-1 FLAGS" "STAGE-2 FLAGS" [main.py flags...]
hide_two_stage() {
  local dataset=$1 model=$2 tii_name=$3 pe_name=$4 tii_flags=$5 pe_flags=$6
  shift 6
  local seed
  for seed in $SEEDS; do
    # shellcheck disable=SC2086 # the flag strings are meant to split into words
    torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "${dataset}_hideprompt" \
      --model "$model" --original_model "$model" --data-path "$DATA_PATH" --seed "$seed" \
      --train_inference_task_only --output_dir "./output/${tii_name}_multi_centroid_mlp_2_seed${seed}" \
      $tii_flags "$@"
  done
  for seed in $SEEDS; do
    # shellcheck disable=SC2086
    torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "${dataset}_hideprompt" \
      --model "$model" --original_model "$model" --data-path "$DATA_PATH" --seed "$seed" \
      --trained_original_model "./output/${tii_name}_multi_centroid_mlp_2_seed${seed}" \
      --output_dir "./output/${pe_name}_pe_seed${seed}" $pe_flags "$@"
  done
}
