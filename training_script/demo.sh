#!/usr/bin/env bash
# The offline demo: no download, no GPU. Split Digits (scikit-learn's bundled digits, 5 tasks of 2 classes) on a
# randomly initialised tiny ViT under torchrun with 2 CPU processes (gloo): HiDe-Prompt in the reference's two
# launches (stage 1: task-identity inference; stage 2: prompts + task-adaptive prediction, reading stage 1), then
# baselines and prompt methods for comparison, then one table with the task-identity accuracy.
#   bash training_script/demo.sh [OUTPUT_DIR] [extra main.py flags...]      (default OUTPUT_DIR: ./output/demo)
#   METHODS="ncm linear fix finetune joint l2p dualprompt sprompt" bash training_script/demo.sh   (all of them)
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR=${1:-./output/demo}
shift || true
NPROC=${NPROC:-2}
PORT=${MASTER_PORT:-29533}
METHODS=${METHODS:-"ncm linear dualprompt"}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # two processes share the cores; more threads only contend
launch() {  # launch NAME SUBCOMMAND [main.py flags...]
  local name=$1 subcommand=$2
  shift 2
  echo "################ ${name} (${NPROC} processes)"
  torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "$subcommand" --device cpu \
    --output_dir "${OUTPUT_DIR}/${name}" "$@"
  runs+=("${OUTPUT_DIR}/${name}")
}

runs=()
launch hideprompt_stage1 digits_hideprompt --train_inference_task_only --lr 0.01 "$@"  # stage 1 LR, as the scripts
launch hideprompt digits_hideprompt --trained_original_model "${OUTPUT_DIR}/hideprompt_stage1" "$@"
for method in $METHODS; do
  launch "$method" "digits_${method}" "$@"
done
echo
echo "Split Digits, ${NPROC} processes, final metrics (%):"
python compare.py "${runs[@]}"
