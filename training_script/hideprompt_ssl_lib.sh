# shellcheck shell=bash
# Shared by the train_<dataset>_<backbone>.sh scripts of the self-supervised backbones (sourced, not run): HiDe-Prompt's
# two launches with the reference's settings for these backbones, which are rows of the preset table (per dataset and
# backbone, per stage). The backbone's weight file must be in ./checkpoints (python main.py --list_backbones names it).
source "$(dirname "${BASH_SOURCE[0]}")/hideprompt_lib.sh"

# hide_ssl_two_stage DATASET BACKBONE_KEY MODEL [main.py flags...]; output names <dataset>_<key> as the reference's
hide_ssl_two_stage() {
  local dataset=$1 key=$2 model=$3
  shift 3
  case "$dataset" in
    cifar100|imr|cub|five_datasets) ;;
    *) echo "hide_ssl_two_stage: unknown dataset '$dataset'" >&2; return 2 ;;
  esac
  local name="${dataset/five_datasets/5datasets}_${key}"
  hide_two_stage "$dataset" "$model" "$name" "$name" "" "" "$@"
}
