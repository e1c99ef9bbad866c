"""The methods a leaderboard can run: their labels, ``fusion_bench`` overrides and notes, and
which of them are ours, seeded or adapt at test time."""

from __future__ import annotations

from typing import Dict, List, Sequence

# name -> (label, fusion_bench overrides, note). Our methods take `method.seed`; all take `seed`.
METHODS: Dict[str, tuple] = {
    "pretrained": ("Pretrained (zero-shot)", ["method=dummy"], ""),
    "individual": (
        "Individual (fine-tuned)",
        ["method=dummy"],
        "each task's own model on its own task",
    ),
    "simple_average": ("Simple Averaging", ["method=simple_average"], ""),
    "task_arithmetic": (
        "Task Arithmetic (λ=0.3)",
        ["method=task_arithmetic", "method.scaling_factor=0.3"],
        "",
    ),
    "ties": (
        "TIES-Merging (λ=0.3, k=20)",
        ["method=ties_merging", "method.scaling_factor=0.3", "method.threshold=20"],
        "",
    ),
    "fisher": (
        "Fisher Merging",
        ["method=fisher_merging/clip_fisher_merging"],
        "Fisher information on train images",
    ),
    "regmean": (
        "RegMean",
        ["method=regmean/clip_regmean"],
        "Gram matrices on train images",
    ),
    "adamerging_lw": (
        "Layer-wise AdaMerging",
        [
            "method=adamerging/clip",
            "method.name=clip_layer_wise_adamerging",
            "method.num_workers=0",
            "method.save_merging_weights=false",
        ],
        "FusionBench's test-time adaptation: entropy on unlabelled *test* images",
    ),
    "statsmerging_tw": (
        "StatsMerging task-wise (ours)",
        ["method=statsmerging/clip_task_wise"],
        "label-free, val images",
    ),
    "statsmerging_lw": (
        "StatsMerging layer-wise (ours)",
        ["method=statsmerging/clip_layer_wise"],
        "label-free, val images",
    ),
    "statsmerging_free": (
        "Free coefficients, same loss (control)",
        ["method=statsmerging/clip_layer_wise", "method.learner=free", "method.optim.lr=0.03"],
        "label-free, val images; free table's lr 3e-2 (chosen on val)",
    ),
    "prodistill": (
        "ProDistill (ours)",
        ["method=prodistill/clip"],
        "64 unlabelled val images per task",
    ),
}
OUR_METHODS = {"statsmerging_tw", "statsmerging_lw", "statsmerging_free", "prodistill"}
# methods whose result depends on the seed (learned coefficients, sampled images); the others are run
# once, with the first seed, since every seed gives the same model
SEEDED_METHODS = OUR_METHODS | {"adamerging_lw", "fisher", "regmean"}
# methods that adapt to the unlabelled test images of the model pool (test-time adaptation)
TEST_TIME_METHODS = {"adamerging_lw"}


def seeds_for(method: str, seeds: Sequence[int]) -> List[int]:
    """The seeds ``method`` is run with: all of them if it is seeded, else the first."""
    return list(seeds) if method in SEEDED_METHODS else list(seeds)[:1]


DEFAULT_METHODS = [
    "pretrained",
    "individual",
    "simple_average",
    "task_arithmetic",
    "ties",
    "regmean",
    "adamerging_lw",
    "statsmerging_tw",
    "statsmerging_lw",
    "statsmerging_free",
    "prodistill",
]
