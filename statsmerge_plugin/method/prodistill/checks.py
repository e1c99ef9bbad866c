R"""Checks of ProDistill's engine, run before any long work: options, output locations and the
pool's structure and values (spec §6). Mixed into :class:`~.engine.ProDistillEngine`."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from ...model_io import WeightReader
from ...precision import check_compute_dtype
from ...validation import (
    check_bool,
    check_choice,
    check_finite_number,
    check_int,
    check_model_weights,
    check_output_locations,
    check_positive,
    check_same_groups,
)
from .activations import CACHE_PLACEMENTS
from .merge import LOSS_REDUCTIONS

PRETRAINED = "_pretrained_"
#: What a run writes into its log dir; an earlier run's copies are never overwritten silently.
OUTPUT_FILES = ("prodistill_report.json", "prodistill_loss_curves.csv", "prodistill_loss_curves")


class EngineChecks:
    """``check_options``, ``check_outputs`` and ``validate_pool`` of the engine (uses its options,
    ``_layout``, ``_program``, ``fabric`` and ``log_dir``)."""

    def check_options(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""
        check_int("shots_per_task", self.shots_per_task, 1)
        check_int("seed", self.seed, 0)
        check_positive("lr", self.lr)
        check_finite_number("lr", self.lr)
        check_int("epochs_per_block", self.epochs_per_block, 1)
        check_int("batch_size", self.batch_size, 1)
        check_finite_number("init_lambda", self.init_lambda)
        check_finite_number("ta_lambda", self.ta_lambda)
        check_choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS)
        check_choice("activation_cache", self.activation_cache, CACHE_PLACEMENTS)
        check_compute_dtype("compute_dtype", self.compute_dtype)
        if self.scratch_dir is not None and not isinstance(self.scratch_dir, (str, Path)):
            raise ValueError(
                f"invalid value {self.scratch_dir!r} for option `scratch_dir`: expected a path or null"
            )
        for flag in ("allow_single_task", "save_loss_curves", "overwrite", "optimizer_in_backward"):
            check_bool(flag, getattr(self, flag))

    def check_outputs(self) -> None:
        """Before any work: the log dir, ``merged_model_save_path`` and the program's report path are
        writable, and no earlier output would be overwritten (unless ``overwrite``)."""
        program = self._program
        check_output_locations(
            log_dir=self.log_dir if self.fabric.is_global_zero else None,
            merged_model_save_path=getattr(program, "merged_model_save_path", None),
            report_save_path=getattr(program, "report_save_path", None),
            overwrite=self.overwrite,
            artefacts=OUTPUT_FILES,
        )

    def validate_pool(
        self, reference: Dict[str, tuple], readers: Dict[str, WeightReader]
    ) -> Dict[int, List[str]]:
        """Structure and value checks on every model, before any training (spec §6).

        Returns ``{block index: [local parameter names]}`` of the pretrained model.

        Raises:
            ValueError: naming the model and block when a block's parameter names differ, the model
                and parameter for a missing/unexpected parameter or a shape mismatch, and the model
                and parameter for NaN/inf values.
        """
        layout = self._layout
        ref_blocks, _ = layout.group_names(reference)
        if not ref_blocks:
            raise ValueError(
                f"model {PRETRAINED!r} has no `{layout.block_prefix('<l>')}*` parameters: not a "
                f"{layout.name}?"
            )
        for name, reader in readers.items():
            blocks, _ = layout.group_names(reader.shapes())
            check_same_groups(PRETRAINED, ref_blocks, name, blocks, what="block")
        # shapes, then NaN/inf: stream every model block by block (never a whole model at once).
        groups = layout.weight_groups(reference)
        for name, reader in readers.items():
            check_model_weights(PRETRAINED, reference, name, reader, groups)
        return ref_blocks
