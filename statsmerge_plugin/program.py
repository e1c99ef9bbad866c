"""FusionBench's model-fusion program, plus a per-task accuracy table at the end of the run; and the
Hydra callback that keeps a run from clobbering an earlier one.

``TableReportProgram`` is used by the top-level configs of this package (e.g. ``fusion_bench
--config-name statsmerging_mini``): the run is exactly ``FabricModelFusionProgram``'s; afterwards the
report is also printed as a table and written to ``<log_dir>/report_table.md``.

``OutputGuard`` is installed by the method configs of this package (``config/statsmerge/
output_guard.yaml``). Hydra writes ``config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` into the run
directory before any program code runs, so only a callback can protect an earlier run's files there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from fusion_bench.programs import FabricModelFusionProgram
from hydra.experimental.callback import Callback
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from statsmerge_plugin.validation import check_output_locations

log = logging.getLogger(__name__)


def accuracy_table(report: dict, title: str = "") -> str:
    """A markdown table of the per-task accuracies (%) of a FusionBench task-pool report."""
    tasks = [
        k for k, v in report.items() if isinstance(v, dict) and "accuracy" in v and k != "average"
    ]
    lines = [f"### {title}", ""] if title else []
    lines += ["| task | accuracy (%) |", "|---|---|"]
    lines += [f"| {t} | {100 * report[t]['accuracy']:.1f} |" for t in tasks]
    if "average" in report:
        lines.append(f"| **average** | **{100 * report['average']['accuracy']:.1f}** |")
    return "\n".join(lines) + "\n"


class TableReportProgram(FabricModelFusionProgram):
    """``FabricModelFusionProgram`` that also prints and saves the per-task accuracy table."""

    def run(self):
        result = super().run()
        report: Optional[dict] = result.get("report") if isinstance(result, dict) else None
        if isinstance(report, dict) and rank_zero_only.rank == 0:
            method = type(self.method).__name__
            table = accuracy_table(report, title=f"{method} on {len(report) - 2} tasks")
            print("\n" + table, flush=True)
            if self.log_dir is not None:
                path = Path(self.log_dir) / "report_table.md"
                path.write_text(table)
                log.info(f"per-task table written to {path}")
        return result


def _launched_rank() -> int:
    """The rank of a process started by a DDP launcher (Lightning, torchrun); 0 otherwise."""
    return max(int(os.environ.get(k, "0") or 0) for k in ("LOCAL_RANK", "NODE_RANK", "RANK"))


def guard_outputs(config: DictConfig) -> None:
    """Refuse a run that would overwrite an earlier run's outputs or write where it cannot.

    Checks the log dir (``path.log_dir``) and Hydra's run dir (``hydra.run.dir``): writable, and no
    earlier run's files in them (:data:`~statsmerge_plugin.validation.RUN_ARTEFACTS`);
    ``merged_model_save_path`` (not a file, writable, not an existing non-empty directory) and
    ``report_save_path``. ``method.overwrite=true`` allows replacing earlier outputs.

    Raises:
        ValueError: naming the location and the files.
    """
    overwrite = OmegaConf.select(config, "method.overwrite", default=False) is True
    log_dir = OmegaConf.select(config, "path.log_dir", default=None)
    run_dir = OmegaConf.select(config, "hydra.run.dir", default=None)
    check_output_locations(
        log_dir=log_dir,
        merged_model_save_path=OmegaConf.select(config, "merged_model_save_path", default=None),
        report_save_path=OmegaConf.select(config, "report_save_path", default=None),
        overwrite=overwrite,
    )
    if run_dir is not None and (
        log_dir is None or Path(run_dir).absolute() != Path(log_dir).absolute()
    ):
        check_output_locations(log_dir=run_dir, overwrite=overwrite)


class OutputGuard(Callback):
    """Hydra callback: :func:`guard_outputs` before Hydra or FusionBench writes anything.

    A failed check ends the process with exit status 1 and the message (Hydra turns exceptions
    raised by callbacks into warnings, so the callback exits itself). Processes started by a DDP
    launcher for ranks other than 0 skip the check: they share rank 0's run directory.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if _launched_rank() != 0:
            return
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # resolves ${hydra:...} in the default log dir
        try:
            guard_outputs(config)
        except ValueError as err:
            raise SystemExit(f"Error: {err}") from None
