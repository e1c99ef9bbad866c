R"""Run records of ProDistill: per-block loss curves (CSV + PNG), timing and peak memory (JSON).

Everything written here is JSON-safe (plain floats, ints, strings and lists).
"""

from __future__ import annotations

import csv
import json
import logging
import resource
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def current_rss_mb() -> Optional[float]:
    """Current resident set size in MiB (``psutil``, ``None`` if unavailable)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil ships with lightning's dependencies
        return None
    return psutil.Process().memory_info().rss / (1024.0 * 1024.0)


def cuda_peak_mb(device) -> Optional[float]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device) / (1024.0 * 1024.0)


def reset_cuda_peak(device) -> None:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


class LossCurves:
    """Loss of every optimisation step of every block."""

    def __init__(self):
        self.rows: List[Dict] = []

    def add(self, block: int, step: int, epoch: int, loss: float) -> None:
        self.rows.append({"block": block, "step": step, "epoch": epoch, "loss": float(loss)})

    def of_block(self, block: int) -> List[Dict]:
        return [r for r in self.rows if r["block"] == block]

    def write_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["block", "step", "epoch", "loss"])
            writer.writeheader()
            writer.writerows(self.rows)

    def plot_block(self, block: int, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        rows = self.of_block(block)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
        ax.set_xlabel("Adam step")
        ax.set_ylabel("block loss")
        if rows and min(r["loss"] for r in rows) > 0:
            ax.set_yscale("log")
        ax.set_title(f"ProDistill block {block}")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)


def write_json(path: Path, payload: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False))


def json_safe(value):
    """``value`` with tensors as lists, non-finite floats as ``None`` and configs as containers."""
    import math

    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return json_safe(OmegaConf.to_container(value, resolve=True))
    except Exception:  # noqa: BLE001
        pass
    return str(value)


class ReportWriter:
    """``write_outputs`` of the engine: the run's JSON report and loss curves (rank 0 only)."""

    def write_outputs(self, tasks: List[str], setup_seconds: float, total_seconds: float) -> None:
        """Timing/memory JSON and loss curves into ``log_dir`` (rank 0 only), plus a log summary."""
        summary = {
            "algorithm": "prodistill",
            "architecture": self._layout.name,
            "tasks": tasks,
            "few_shot_samples": dict(self._data_info),
            "few_shot_data": dict(self._data_read),
            "weight_sources": dict(self._sources),
            "options": {k: getattr(self, k) for k in self._config_mapping if not k.startswith("_")},
            "activation_cache": dict(getattr(self, "_cache_info", {})),
            "setup_seconds": setup_seconds,
            "total_seconds": total_seconds,
            "peak_rss_mb": peak_rss_mb(),
            "blocks": self.block_records,
        }
        summary.update(self._report_extra())
        self.report = json_safe(summary)
        log.info(
            f"ProDistill: {len(self.block_records)} blocks in {total_seconds:.1f} s, "
            f"peak RSS {summary['peak_rss_mb']:.0f} MiB"
        )
        if self.log_dir is None or not self.fabric.is_global_zero:
            return
        out = Path(self.log_dir)
        write_json(out / "prodistill_report.json", self.report)
        if self.save_loss_curves:
            self.loss_curves.write_csv(out / "prodistill_loss_curves.csv")
            for record in self.block_records:
                b = record["block"]
                self.loss_curves.plot_block(
                    b, out / "prodistill_loss_curves" / f"block_{b:02d}.png"
                )

    def _report_extra(self) -> Dict:
        return {}
