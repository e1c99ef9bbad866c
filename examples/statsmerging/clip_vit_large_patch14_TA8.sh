#!/usr/bin/env bash
# StatsMerging on FusionBench's CLIP ViT-L/14 eight-task pool (SUN397, Cars, RESISC45, EuroSAT, SVHN,
# GTSRB, MNIST, DTD), on a GPU. FusionBench downloads the checkpoints and datasets on first use.
# The `_val` model pool is FusionBench's pool plus its validation splits, where StatsMerging draws its
# unlabelled images (the test splits are only evaluated, by the task pool).
#
# Time and memory: Measured with 2 of the 8 tasks (docs/real-scale.md, CPU): peak host memory 6.74 GiB, 52 s per
# step at 8 images on one CPU core. Projection for 8 tasks: ~13.4 GB (theta_0 + 8 task vectors are
# 10.2 GiB; one task's activations at a time): a 24 GB GPU fits, 16 GB is tight.
#
# Usage: [SEED=N] [RUN_TAG=label] bash examples/statsmerging/clip_vit_large_patch14_TA8.sh \
#            [extra Hydra overrides, e.g. fabric.devices=1]
# Outputs: outputs/<method>/<run>/seed<N>[_<label>].json; another SEED or RUN_TAG never meets an
# earlier run's report (examples/run_tag.sh).
set -euo pipefail
source "$(dirname "$0")/../run_tag.sh" "$@"

fusion_bench \
    fabric.loggers.name=statsmerging/ViT-L-14_TA8/${TAG} \
    method=statsmerging \
    method.seed=${SEED} \
    modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8_val \
    taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14 \
    report_save_path=outputs/statsmerging/ViT-L-14_TA8/${TAG}.json \
    "$@"
