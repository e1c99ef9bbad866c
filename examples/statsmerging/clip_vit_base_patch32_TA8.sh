#!/usr/bin/env bash
# StatsMerging on FusionBench's CLIP ViT-B/32 eight-task pool (SUN397, Cars, RESISC45, EuroSAT, SVHN,
# GTSRB, MNIST, DTD), on a GPU. FusionBench downloads the checkpoints and datasets on first use.
# The `_val` model pool is FusionBench's pool plus its validation splits, where StatsMerging draws its
# unlabelled images (the test splits are only evaluated, by the task pool).
#
# Time and memory: Measured (docs/real-scale.md, CPU, 8 tasks): peak host memory 4.40 GiB (1.5 x theta_0 +
# all task vectors); 12.9 s per training step at 32 images on one CPU core, 1.9 h projected for the default
# 500 steps on that core.
# GPU time and GPU memory: not measured (the real-scale page expects it to fit a 24 GB GPU).
#
# Usage: [SEED=N] [RUN_TAG=label] bash examples/statsmerging/clip_vit_base_patch32_TA8.sh \
#            [extra Hydra overrides, e.g. fabric.devices=1]
# Outputs: outputs/<method>/<run>/seed<N>[_<label>].json; another SEED or RUN_TAG never meets an
# earlier run's report (examples/run_tag.sh).
set -euo pipefail
source "$(dirname "$0")/../run_tag.sh" "$@"

fusion_bench \
    fabric.loggers.name=statsmerging/ViT-B-32_TA8/${TAG} \
    method=statsmerging \
    method.seed=${SEED} \
    modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_val \
    taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 \
    report_save_path=outputs/statsmerging/ViT-B-32_TA8/${TAG}.json \
    "$@"
