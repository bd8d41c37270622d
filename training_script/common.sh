# shellcheck shell=bash
# Shared by every script in training_script/ (sourced, not run, once the script is in the repository root): the dry
# run and the report at the end.
# Dry run: DRY_RUN=1 in the environment, or --dry-run as the script's first argument, prints every command the
# script would launch, one line each, quoted so that it can be pasted into a shell, and runs nothing: no folder, no
# file. Only the commands are printed (the output is a script), not the environment the script exports.
# Every launch goes through run_or_print; launch_run (or record_run) keeps the run's folder, and report_runs ends
# the script with `python report.py` over the runs it produced. REFERENCE_MODE=1 adds --reference_mode to every
# launch.
DRY_RUN=${DRY_RUN:-0}
if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  shift  # the script's own arguments: a file sourced without arguments shares them with its caller
fi
case "$DRY_RUN" in
  0 | '') DRY_RUN=0 ;;
  1) ;;
  *) echo "error: DRY_RUN='$DRY_RUN': use DRY_RUN=1 to print the commands without running them, or 0 to run" \
          "them" >&2; exit 2 ;;
esac
# REFERENCE_MODE=1: every launch gets --reference_mode (the reference's own behaviour, to reproduce its numbers)
REFERENCE_MODE=${REFERENCE_MODE:-0}
case "$REFERENCE_MODE" in
  0 | '') REFERENCE_FLAG=() ;;
  1) REFERENCE_FLAG=(--reference_mode) ;;
  *) echo "error: REFERENCE_MODE='$REFERENCE_MODE': use REFERENCE_MODE=1 to reproduce the reference's behaviour, or" \
          "0 for this suite's defaults" >&2; exit 2 ;;
esac
RUNS=()

# run_or_print COMMAND [ARG...]: run the command, or under the dry run print it
run_or_print() {
  if ((DRY_RUN)); then
    local line
    printf -v line '%q ' "$@"
    echo "${line% }"
  else
    "$@"
  fi
}

# record_run DIR: a run folder for report_runs, each once
record_run() {
  local run
  for run in "${RUNS[@]}"; do
    [[ $run == "$1" ]] && return 0
  done
  RUNS+=("$1")
}

# launch_run COMMAND [ARG...]: run_or_print, then record the command's run folder: its --output_dir, the last one
# given as argparse takes the last (a script's extra arguments come after its own)
launch_run() {
  run_or_print "$@" "${REFERENCE_FLAG[@]}"
  local arg previous='' out=''
  for arg in "$@"; do
    case "$previous" in --output_dir | --output-dir) out=$arg ;; esac
    case "$arg" in --output_dir=* | --output-dir=*) out=${arg#*=} ;; esac
    previous=$arg
  done
  if [[ -n $out ]]; then
    record_run "$out"
  fi
}

# report_runs: `python report.py` over the recorded runs, one row per configuration with mean +- std over its
# seeds. The training is done by then, so a report that fails warns, with the command to rerun, and does not turn
# finished runs into a failed script.
report_runs() {
  ((${#RUNS[@]})) || return 0
  if ! run_or_print python report.py "${RUNS[@]}"; then
    local again
    printf -v again ' %q' "${RUNS[@]}"
    echo "warning: the report failed; the runs are in place, rerun it with: python report.py${again}" >&2
  fi
}

# slurm_head_node: HEAD_NODE= the allocation's first node, where the processes meet. A dry run outside an allocation
# (on a login node) has no nodes to ask for: it prints HEAD_NODE, NNODES and JOB_ID where SLURM's values would be.
slurm_head_node() {
  if ((DRY_RUN)) && [[ -z ${SLURM_JOB_NODELIST:-} ]]; then
    echo "dry run outside a SLURM allocation: HEAD_NODE, NNODES and JOB_ID stand for the allocation's values" >&2
    HEAD_NODE=HEAD_NODE SLURM_NNODES=${SLURM_NNODES:-NNODES} SLURM_JOB_ID=${SLURM_JOB_ID:-JOB_ID}
  else
    # shellcheck disable=SC2034 # read by the sbatch scripts
    HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
}
