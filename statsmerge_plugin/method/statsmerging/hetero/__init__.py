# flake8: noqa F401
"""Heterogeneous architectures (StatsMerging §4): distil other-architecture teachers into the
target architecture (``_pretrained_``), then merge.

One concept per module: :mod:`.teachers` (what a teacher is, its own head and logits),
:mod:`.losses` (label-free KL, the paper's alpha-CE + KL), :mod:`.augment` (flips/crops on
tensors), :mod:`.distill` (the training loop), :mod:`.cache` (student cache key, atomic store),
:mod:`.report` (student vs teacher accuracy), :mod:`.distill_to_base` and
:mod:`.hetero_statsmerging` (the FusionBench methods). The mixed-architecture mini benchmark and
its comparison live in :mod:`statsmerge_plugin.mini.hetero`.
"""

from .distill_to_base import DistillToBaseForCLIP
from .hetero_statsmerging import HeteroStatsMergingForCLIP
