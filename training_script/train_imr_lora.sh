#!/usr/bin/env bash
# Continual LoRA, then HiDe-LoRA, on Split ImageNet-R with the reference's train_imr_lora.sh settings: 8 x 24,
# seed 42; stage 1 (imr_hideprompt, Sup-21K ViT-B/16) 50 epochs at lr 0.0005; HiDe-LoRA 50 epochs, lr 0.03, cosine,
# rank 5, reg 0.001, LoRA momentum 0.1 (a flag the reference's parser rejected: its run could not start). Continual
# LoRA, absent from that script, runs with HiDe-LoRA's training settings. The LoRA code's `vit_base_patch16_224` was
# timm's AugReg in21k->in1k ViT-B/16 (its prompt code's was the Sup-21K one), so the LoRA model is named explicitly.
#   NPROC=8 DATA_PATH=./datasets SEEDS=42 bash training_script/train_imr_lora.sh [main.py flags...]
NPROC=${NPROC:-8}
SEEDS=${SEEDS:-42}
LORA_MODEL=vit_base_patch16_224.augreg_in21k_ft_in1k
source "$(dirname "$0")/hideprompt_lib.sh"
# the paper's settings are the imr_continual_lora and imr_hidelora presets; its stage 1 trains 50 epochs where
# HiDe-Prompt's trains 20
one_stage_per_seed imr_continual_lora "$LORA_MODEL" imr_continual_lora "" "$@"
hide_stages imr hidelora vit_base_patch16_224.orig_in21k "$LORA_MODEL" imr_vit_lora_tii_multi_centroid_mlp_2 \
  imr_hidelora "--epochs 50" "" "$@"
report_runs
