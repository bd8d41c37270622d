#!/usr/bin/env bash
# The offline demo: no download, no GPU. Split Digits (scikit-learn's bundled digits, 5 tasks of 2 classes) on a
# randomly initialised tiny ViT under torchrun with 2 CPU processes (gloo): HiDe-Prompt in the reference's two
# launches (stage 1: task-identity inference; stage 2: prompts + task-adaptive prediction, reading stage 1), then
# baselines and prompt methods for comparison, per seed, then the report: one row per method, mean +- std over the
# seeds, with the task-identity accuracy. Each run goes to OUTPUT_DIR/<name>_seed<seed>.
#   bash training_script/demo.sh [OUTPUT_DIR] [extra main.py flags...]      (default OUTPUT_DIR: ./output/demo)
#   METHODS="ncm linear fix finetune joint l2p dualprompt sprompt" bash training_script/demo.sh   (all of them)
#   SEEDS="1 2 3" bash training_script/demo.sh                                 (default: one seed, 42)
#   DRY_RUN=1 bash training_script/demo.sh, or demo.sh --dry-run [...]: print the commands, run nothing
set -euo pipefail
cd "$(dirname "$0")/.."
source training_script/common.sh
OUTPUT_DIR=${1:-./output/demo}
shift || true
NPROC=${NPROC:-2}
PORT=${MASTER_PORT:-29533}
METHODS=${METHODS:-"ncm linear dualprompt"}
SEEDS=${SEEDS:-42}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # two processes share the cores; more threads only contend
say() {  # the headings would break a dry run's output, which is a script
  ((DRY_RUN)) || echo "$@"
}
launch() {  # launch NAME SEED SUBCOMMAND [main.py flags...]
  local name=$1 seed=$2 subcommand=$3
  shift 3
  say "################ ${name}, seed ${seed} (${NPROC} processes)"
  launch_run torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "$subcommand" --device cpu \
    --seed "$seed" --output_dir "${OUTPUT_DIR}/${name}_seed${seed}" "$@"
}

for seed in $SEEDS; do
  launch hideprompt_stage1 "$seed" digits_hideprompt --train_inference_task_only --lr 0.01 "$@"  # as the scripts
  launch hideprompt "$seed" digits_hideprompt \
    --trained_original_model "${OUTPUT_DIR}/hideprompt_stage1_seed${seed}" "$@"
  for method in $METHODS; do
    launch "$method" "$seed" "digits_${method}" "$@"
  done
done
say
say "Split Digits, ${NPROC} processes, final metrics (%):"
report_runs
