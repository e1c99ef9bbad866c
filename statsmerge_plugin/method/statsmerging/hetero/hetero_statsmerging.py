R"""
StatsMerging across architectures: distil other-architecture teachers, then StatsMerging.

Ranjith Merugu, Bryan Bo Cao, Shubham Jain. "StatsMerging: Statistics-Guided Model Merging via
Task-Specific Teacher Distillation", arXiv:2506.04567 (2025), Algorithm 1 line 1 and §4
(heterogeneous architectures, Table 3): every task model whose architecture differs from the target
(``_pretrained_``) is distilled into it (:class:`~.distill_to_base.DistillToBaseForCLIP`); the
students and the same-architecture models are then merged by layer-wise StatsMerging
(:class:`~statsmerge_plugin.method.statsmerging.StatsMergingForCLIP`, unchanged).

The run also writes ``<log_dir>/hetero/report.{json,md}``: test accuracy of each student against its
teacher (evaluation only; nothing is selected on it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

from fusion_bench import auto_register_config
from fusion_bench.modelpool import CLIPVisionModelPool

from statsmerge_plugin.method.statsmerging.outputs import fresh_dir
from statsmerge_plugin.method.statsmerging.statsmerging import StatsMergingForCLIP

from .distill_to_base import DistillToBaseForCLIP
from .pool_plan import plain
from .report import write_report

log = logging.getLogger(__name__)


@auto_register_config
class HeteroStatsMergingForCLIP(StatsMergingForCLIP):
    """Distil-then-merge: :class:`DistillToBaseForCLIP` followed by :class:`StatsMergingForCLIP`.

    Args:
        distillation: options of :class:`DistillToBaseForCLIP` (``temperature``, ``alpha``,
            ``use_labels``, ``max_steps``, ``lr``, ``batch_size``, ``augmentation``, ``seed``,
            ``cache_dir``, ``teachers``, ``num_workers``, ...); ``output_dir``, ``pool_name`` and
            ``overwrite`` belong to method=distill_to_base only.
        **kwargs: every option of :class:`StatsMergingForCLIP`.
    """

    def __init__(self, distillation: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(**kwargs)
        self.distillation = plain(distillation) or {}
        unused = {"output_dir", "pool_name", "overwrite"} & set(self.distillation)
        if unused:
            raise ValueError(
                f"options `distillation.{sorted(unused)}` are only for method=distill_to_base"
            )
        self.distiller = DistillToBaseForCLIP(**self.distillation)  # validates the options now

    def run(self, modelpool: CLIPVisionModelPool):
        self.distiller._fabric_instance = self.fabric  # one Fabric (device, ranks, logger) for both
        self.distiller._program = getattr(self, "_program", None)
        with self.profile("distil teachers"):
            student_pool, report = self.distiller.distill_pool(modelpool)
        self.hetero_report = report
        if self.fabric.is_global_zero and self.log_dir is not None:
            out = fresh_dir(Path(self.log_dir), "hetero")
            write_report(out, report, getattr(self.distiller, "_loss_curves", {}))
            log.info(f"student-vs-teacher report written to {out}")
        return super().run(student_pool)
