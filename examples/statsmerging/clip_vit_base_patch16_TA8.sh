#!/usr/bin/env bash
# StatsMerging on FusionBench's CLIP ViT-B/16 eight-task pool (SUN397, Cars, RESISC45, EuroSAT, SVHN,
# GTSRB, MNIST, DTD), on a GPU. FusionBench downloads the checkpoints and datasets on first use.
# The `_val` model pool is FusionBench's pool plus its validation splits, where StatsMerging draws its
# unlabelled images (the test splits are only evaluated, by the task pool).
#
# Time and memory: Not measured. Projection: ViT-B/16 has ViT-B/32's weights (86-87 M parameters) but 197 instead of
# 50 tokens per image, so the activations of one task's 4 images (one backward pass) grow about 4x
# (0.15 GiB -> ~0.6 GiB): roughly 5 GB peak host memory against B/32's 4.4 GiB (projection, not a
# measurement); time per step several times B/32's.
#
# Usage: [SEED=N] [RUN_TAG=label] bash examples/statsmerging/clip_vit_base_patch16_TA8.sh \
#            [extra Hydra overrides, e.g. fabric.devices=1]
# Outputs: outputs/<method>/<run>/seed<N>[_<label>].json; another SEED or RUN_TAG never meets an
# earlier run's report (examples/run_tag.sh).
set -euo pipefail
source "$(dirname "$0")/../run_tag.sh" "$@"

fusion_bench \
    fabric.loggers.name=statsmerging/ViT-B-16_TA8/${TAG} \
    method=statsmerging \
    method.seed=${SEED} \
    modelpool=CLIPVisionModelPool/clip-vit-base-patch16_TA8_val \
    taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_B16 \
    report_save_path=outputs/statsmerging/ViT-B-16_TA8/${TAG}.json \
    "$@"
