"""`statsmerge-leaderboard`: FusionBench's methods and ours, side by side on one model pool.

Every method runs as its own ``fusion_bench`` process on the same model pool and task pool, so that each
gets FusionBench's exact evaluation and its own wall time and peak memory (``ru_maxrss`` of that process,
from ``os.wait4``). A method that fails is reported as failed; the others still run. The result is a
markdown table (per task, average, normalized accuracy = merged / individual, per task then averaged),
a JSON file and a bar chart PNG, written side by side.

Protocols with task groups are detected from the composed configs, and each group's average is reported
next to the per-task accuracies:

* generalization (FusionBench's ``clip-vit-base-patch32_generalization_exp1/2`` pools, the mini
  ``mini-clip_generalization_exp1/2`` pools and task pools): task-pool tasks with a model in the model
  pool are *seen*, the others *unseen* (evaluated with their zero-shot heads);
* robustness (the mini task pool ``mini-clip_robustness``): keys ``<task>__<corruption>`` are the test
  sets under that corruption; *clean*, one group per corruption, and *corrupted* (all corrupted sets).

"Individual" runs each task's own model on its own task pool keys (clean and corrupted); unseen tasks
have no model, so its average and the normalized accuracy are over the seen tasks. Methods that adapt to
the unlabelled test images of their model pool (layer-wise AdaMerging) follow FusionBench's robustness
protocol when the model pool is a ``*_robustness_clean`` pool: one run on the clean pool for the clean
keys, and one per corruption on its ``*_robustness_corrupted`` twin (``+corruption=<name>``) for that
corruption's keys, so each adapts to the images it is evaluated on.

Example::

    statsmerge-leaderboard --methods pretrained,individual,simple_average,task_arithmetic,ties,\\
        adamerging_lw,statsmerging_lw --seeds 0 --out docs/leaderboard
"""

# flake8: noqa F401
from .cli import OUTPUT_SUFFIXES, check_outputs, main, parse_args
from .methods import (
    DEFAULT_METHODS,
    METHODS,
    OUR_METHODS,
    SEEDED_METHODS,
    TEST_TIME_METHODS,
    seeds_for,
)
from .render import GROUP_LABELS, bar_chart, group_markdown, markdown, pct, shape_markdown
from .runs import (
    Leaderboard,
    Part,
    RunResult,
    corrupted_modelpool,
    fusion_bench_command,
    last_error_line,
    run_process,
)
from .summary import (
    base_task,
    individual_runs,
    shape_figures,
    summarize,
    task_accuracies,
    task_groups,
)
