#!/usr/bin/env bash
# StatsMerging under FusionBench's other two protocols on CLIP ViT-B/32, on a GPU:
#  * generalization (exp1, exp2): six merged tasks, two unseen tasks evaluated with their zero-shot
#    heads (FusionBench's clip-vit-base-patch32_generalization_exp1/2 pools plus validation splits);
#  * robustness: the clean test sets of Cars, EuroSAT, RESISC45, GTSRB, then each of FusionBench's
#    seven corrupted test sets (StatsMerging reads the clean val splits; only the evaluation changes).
# Time and memory per run: at most the eight-task run's (clip_vit_base_patch32_TA8.sh): six or four
# task models instead of eight.
#
# Usage: [SEED=N] [RUN_TAG=label] bash examples/statsmerging/clip_vit_base_patch32_protocols.sh \
#            [extra Hydra overrides, e.g. fabric.devices=1]
# Outputs: outputs/<method>/<run>/seed<N>[_<label>].json; another SEED or RUN_TAG never meets an
# earlier run's report (examples/run_tag.sh).
set -euo pipefail
source "$(dirname "$0")/../run_tag.sh" "$@"

for exp in exp1 exp2; do
    fusion_bench \
        fabric.loggers.name=statsmerging/ViT-B-32_generalization_${exp}/${TAG} \
        method=statsmerging \
        method.seed=${SEED} \
        modelpool=CLIPVisionModelPool/clip-vit-base-patch32_generalization_${exp}_val \
        taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8 \
        report_save_path=outputs/statsmerging/ViT-B-32_generalization_${exp}/${TAG}.json \
        "$@"
done

fusion_bench \
    fabric.loggers.name=statsmerging/ViT-B-32_robustness_clean/${TAG} \
    method=statsmerging \
    method.seed=${SEED} \
    modelpool=CLIPVisionModelPool/clip-vit-base-patch32_robustness_clean_val \
    taskpool=clip-vit-base-patch32_robustness_clean \
    report_save_path=outputs/statsmerging/ViT-B-32_robustness_clean/${TAG}.json \
    "$@"

for corruption in motion_blur impulse_noise gaussian_noise pixelate spatter contrast jpeg_compression; do
    fusion_bench --config-name clip-vit-base-patch32_robustness_corrupted \
        corruption=${corruption} \
        fabric.loggers.name=statsmerging/ViT-B-32_robustness_${corruption}/${TAG} \
        method=statsmerging \
        method.seed=${SEED} \
        modelpool=CLIPVisionModelPool/clip-vit-base-patch32_robustness_corrupted_val \
        report_save_path=outputs/statsmerging/ViT-B-32_robustness_${corruption}/${TAG}.json \
        "$@"
done
