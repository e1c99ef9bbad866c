#!/usr/bin/env bash
# ProDistill on FusionBench's CLIP ViT-B/32 eight-task pool (SUN397, Cars, RESISC45, EuroSAT, SVHN,
# GTSRB, MNIST, DTD), on a GPU. FusionBench downloads the checkpoints and datasets on first use.
# The `_val` model pool is FusionBench's pool plus its validation splits, where ProDistill draws its
# unlabelled images (the test splits are only evaluated, by the task pool).
#
# Time and memory: Measured (docs/real-scale.md, CPU, 8 tasks): peak host memory 2.84 GiB (one block at a time);
# 4.3 s per step of 128 samples on one CPU core, 5.8 h projected for the default run on that core.
# GPU time and GPU memory: not measured (fits a 24 GB GPU by the real-scale page's figures).
#
# Usage: [SEED=N] [RUN_TAG=label] bash examples/prodistill/clip_vit_base_patch32_TA8.sh \
#            [extra Hydra overrides, e.g. fabric.devices=1]
# Outputs: outputs/<method>/<run>/seed<N>[_<label>].json; another SEED or RUN_TAG never meets an
# earlier run's report (examples/run_tag.sh).
set -euo pipefail
source "$(dirname "$0")/../run_tag.sh" "$@"

fusion_bench \
    fabric.loggers.name=prodistill/ViT-B-32_TA8/${TAG} \
    method=prodistill \
    method.seed=${SEED} \
    modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_val \
    taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 \
    report_save_path=outputs/prodistill/ViT-B-32_TA8/${TAG}.json \
    "$@"
