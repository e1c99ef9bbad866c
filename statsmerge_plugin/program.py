"""FusionBench's model-fusion program, plus a per-task accuracy table at the end of the run.

Used by the top-level configs of this package (e.g. ``fusion_bench --config-name statsmerging_mini``): the
run is exactly ``FabricModelFusionProgram``'s; afterwards the report is also printed as a table and
written to ``<log_dir>/report_table.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from fusion_bench.programs import FabricModelFusionProgram
from lightning.fabric.utilities.rank_zero import rank_zero_only

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
