#!/usr/bin/env bash
# The offline demo: no download, no GPU. Split Digits (scikit-learn's bundled digits, 5 tasks of 2 classes) on a
# randomly initialised tiny ViT, every baseline plus L2P and DualPrompt under torchrun with 2 CPU processes (gloo),
# then one table.
#   bash training_script/demo.sh [OUTPUT_DIR] [extra main.py flags...]      (default OUTPUT_DIR: ./output/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR=${1:-./output/demo}
shift || true
NPROC=${NPROC:-2}
PORT=${MASTER_PORT:-29533}
METHODS=${METHODS:-"ncm linear fix finetune joint l2p dualprompt"}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # two processes share the cores; more threads only contend
runs=()
for method in $METHODS; do
  echo "################ digits_${method} (${NPROC} processes)"
  torchrun --nproc_per_node="$NPROC" --master_port="$PORT" main.py "digits_${method}" \
    --device cpu --output_dir "${OUTPUT_DIR}/${method}" "$@"
  runs+=("${OUTPUT_DIR}/${method}")
done
echo
echo "Split Digits, ${NPROC} processes, final metrics (%):"
python compare.py "${runs[@]}"
