# Shared by the train_<dataset>_<backbone>.sh scripts of the self-supervised backbones (sourced, not run): the
# reference's settings for these backbones, which depend on the dataset only, launched by hide_two_stage.
# The backbone's weight file must be in ./checkpoints (python main.py --list_backbones names it and its source).
source "$(dirname "${BASH_SOURCE[0]}")/hideprompt_lib.sh"

# hide_ssl_two_stage DATASET BACKBONE_KEY MODEL [main.py flags...]; output names <dataset>_<key> as the reference's
hide_ssl_two_stage() {
  local dataset=$1 key=$2 model=$3 pe
  local tii="--batch-size 24 --epochs 20 --lr 0.0005 --ca_lr 0.005 --crct_epochs 30"  # stage 1, but 5-datasets
  shift 3
  case "$dataset" in
    cifar100)
      pe="--batch-size 24 --epochs 20 --ca_lr 0.005 --crct_epochs 30 --prompt_momentum 0.1 --reg 0.1 --length 5
          --larger_prompt_lr" ;;
    imr)
      pe="--batch-size 24 --epochs 50 --sched constant --ca_lr 0.005 --crct_epochs 30 --prompt_momentum 0.01
          --reg 0.5 --length 20 --larger_prompt_lr" ;;
    cub)
      pe="--batch-size 24 --epochs 50 --ca_lr 0.005 --crct_epochs 30 --prompt_momentum 0.01 --reg 0.01 --length 20
          --larger_prompt_lr" ;;
    five_datasets)
      tii="--batch-size 32 --epochs 20 --sched constant --lr 0.001"
      pe="--batch-size 32 --epochs 20 --sched constant --lr 0.03 --clip-grad 2 --reg 0.1 --prompt_momentum 0.01
          --larger_prompt_lr" ;;
    *) echo "hide_ssl_two_stage: unknown dataset '$dataset'" >&2; return 2 ;;
  esac
  local name="${dataset/five_datasets/5datasets}_${key}"
  hide_two_stage "$dataset" "$model" "$name" "$name" "$tii" "$pe" "$@"
}
