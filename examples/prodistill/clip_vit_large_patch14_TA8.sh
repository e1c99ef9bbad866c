#!/usr/bin/env bash
# ProDistill on FusionBench's CLIP ViT-L/14 eight-task pool (SUN397, Cars, RESISC45, EuroSAT, SVHN,
# GTSRB, MNIST, DTD), on a GPU. FusionBench downloads the checkpoints and datasets on first use.
# The `_val` model pool is FusionBench's pool plus its validation splits, where ProDistill draws its
# unlabelled images (the test splits are only evaluated, by the task pool).
#
# Time and memory: Measured with 2 of the 8 tasks (docs/real-scale.md, CPU): peak host memory 5.45 GiB, 34 s per
# step of 128 samples on one CPU core. Projection for 8 tasks: ~7 GB (set by one block, not by full models).
#
# Usage: [SEED=N] [RUN_TAG=label] bash examples/prodistill/clip_vit_large_patch14_TA8.sh \
#            [extra Hydra overrides, e.g. fabric.devices=1]
# Outputs: outputs/<method>/<run>/seed<N>[_<label>].json; another SEED or RUN_TAG never meets an
# earlier run's report (examples/run_tag.sh).
set -euo pipefail
source "$(dirname "$0")/../run_tag.sh" "$@"

fusion_bench \
    fabric.loggers.name=prodistill/ViT-L-14_TA8/${TAG} \
    method=prodistill \
    method.seed=${SEED} \
    modelpool=CLIPVisionModelPool/clip-vit-large-patch14_TA8_val \
    taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14 \
    report_save_path=outputs/prodistill/ViT-L-14_TA8/${TAG}.json \
    "$@"
