#!/usr/bin/env bash
# Continual LoRA, then HiDe-LoRA, on Split CIFAR-100 with the reference README's settings: 8 x 24, seed 42, 20
# epochs, lr 0.01, rank 8. The LoRA code's `vit_base_patch16_224` was timm's AugReg in21k->in1k ViT-B/16, so
# the LoRA model is named explicitly; the task-identity model stays the Sup-21K ViT-B/16 of HiDe-Prompt's stage 1.
# The README pointed HiDe-LoRA's --trained_original_model at the continual-LoRA run, whose weights the reference
# then partly ignored (strict=False); here it reads a real stage 1 (train_cifar100_vit.sh's settings: 20 epochs,
# lr 0.0005, constant LR, MLP [2], so stage 2 takes --original_model_mlp_structure 2 over its config's []).
#   NPROC=8 DATA_PATH=./datasets SEEDS=42 bash training_script/train_cifar100_lora.sh [main.py flags...]
NPROC=${NPROC:-8}
SEEDS=${SEEDS:-42}
LORA_MODEL=vit_base_patch16_224.augreg_in21k_ft_in1k
source "$(dirname "$0")/hideprompt_lib.sh"
# the paper's settings are the cifar100_continual_lora, cifar100_hideprompt (stage 1) and cifar100_hidelora presets
one_stage_per_seed cifar100_continual_lora "$LORA_MODEL" cifar100_continual_lora "" "$@"
hide_stages cifar100 hidelora vit_base_patch16_224.orig_in21k "$LORA_MODEL" \
  cifar100_sup21k_lora_tii_multi_centroid_mlp_2 cifar100_hidelora "" "" "$@"
report_runs
