#!/usr/bin/env bash
# End-to-end check of every method on one GPU (or the CPU), offline, in a few minutes: Split Digits on a tiny
# randomly initialised ViT; each run is its own process with its own folder under OUTPUT_DIR. Prints a table of
# status, exit code, wall time, final accuracy and peak memory per run, also written to OUTPUT_DIR/gpu_check.md and
# gpu_check.json; exits non-zero when a run failed or the two --deterministic runs differ.
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [OUTPUT_DIR]   (default: cuda, ./output/gpu_check_<date-time>)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
