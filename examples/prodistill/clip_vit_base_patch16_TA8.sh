#!/usr/bin/env bash
# ProDistill on FusionBench's CLIP ViT-B/16 eight-task pool (SUN397, Cars, RESISC45, EuroSAT, SVHN,
# GTSRB, MNIST, DTD), on a GPU. FusionBench downloads the checkpoints and datasets on first use.
# The `_val` model pool is FusionBench's pool plus its validation splits, where ProDistill draws its
# unlabelled images (the test splits are only evaluated, by the task pool).
#
# Time and memory: Not measured. Projection: the dual-input cache grows with the tokens per image (197 vs 50):
# ~0.6 GB instead of 157 MB for 512 samples; peak a few GB (projection, not a measurement).
#
# Usage: [SEED=N] [RUN_TAG=label] bash examples/prodistill/clip_vit_base_patch16_TA8.sh \
#            [extra Hydra overrides, e.g. fabric.devices=1]
# Outputs: outputs/<method>/<run>/seed<N>[_<label>].json; another SEED or RUN_TAG never meets an
# earlier run's report (examples/run_tag.sh).
set -euo pipefail
source "$(dirname "$0")/../run_tag.sh" "$@"

fusion_bench \
    fabric.loggers.name=prodistill/ViT-B-16_TA8/${TAG} \
    method=prodistill \
    method.seed=${SEED} \
    modelpool=CLIPVisionModelPool/clip-vit-base-patch16_TA8_val \
    taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_B16 \
    report_save_path=outputs/prodistill/ViT-B-16_TA8/${TAG}.json \
    "$@"
