"""A FusionBench task pool scoring causal LMs by exact match of greedy answers (issue 17)."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Union

from fusion_bench.taskpool.base_pool import BaseTaskPool
from omegaconf import DictConfig

from .train import exact_match

log = logging.getLogger(__name__)


def _load_dataset(task: str, spec: Any):
    """A test set from a config with ``_target_`` (e.g. ``datasets.load_from_disk``), a
    ``load_from_disk`` path, or an already loaded dataset."""
    from datasets import load_from_disk
    from hydra.utils import instantiate

    if isinstance(spec, (DictConfig, dict)):
        return instantiate(spec)
    if isinstance(spec, str):
        return load_from_disk(spec)
    if spec is None:
        raise ValueError(f"ExactMatchTaskPool: test_datasets.{task} is empty")
    return spec


class ExactMatchTaskPool(BaseTaskPool):
    """Exact match of greedy continuations of each task's test prompts.

    A row counts as solved when greedy decoding of ``prompt`` reproduces ``answer`` up to and
    including its end marker (the answer's last character, ``"."`` in the language miniature),
    scored teacher-forced in one forward pass (see :mod:`statsmerge_plugin.mini_lm.train`).

    Args:
        test_datasets: task name -> dataset config (``_target_: datasets.load_from_disk``), path or
            dataset, with the ``prompt_field`` and ``answer_field`` columns.
        tokenizer: tokenizer path (``AutoTokenizer.from_pretrained``).
        prompt_field, answer_field: column names.
        batch_size: prompts per forward pass.
    Returns from :meth:`evaluate`: ``{task: {"accuracy": exact match in [0, 1], "n": rows},
    "average": {"accuracy": mean over tasks}}`` (FusionBench's report shape).
    """

    def __init__(
        self,
        test_datasets: Union[DictConfig, Dict[str, Any]],
        tokenizer: str,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        batch_size: int = 256,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not test_datasets:
            raise ValueError("ExactMatchTaskPool: `test_datasets` names no task")
        self._test_datasets = test_datasets
        self.tokenizer_path = tokenizer
        self.prompt_field, self.answer_field = prompt_field, answer_field
        self.batch_size = int(batch_size)
        self._tokenizer: Optional[Any] = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_path))
        return self._tokenizer

    def load_test_set(self, task: str):
        data = _load_dataset(task, self._test_datasets[task])
        missing = {self.prompt_field, self.answer_field} - set(data.column_names)
        if missing:
            raise ValueError(
                f"ExactMatchTaskPool: the test set of task {task!r} has no column(s) "
                f"{sorted(missing)} (columns: {data.column_names})"
            )
        return list(zip(data[self.prompt_field], data[self.answer_field]))

    def evaluate(self, model, *args, **kwargs) -> Dict[str, Any]:
        from tqdm.auto import tqdm

        report: Dict[str, Any] = {}
        for task in tqdm(list(self._test_datasets), desc="exact match", leave=False):
            rows = self.load_test_set(task)
            hits = exact_match(model, self.tokenizer, rows, self.batch_size)
            report[task] = {"accuracy": sum(hits) / len(hits), "n": len(hits)}
            log.info(
                "%s: exact match %.2f%% of %d", task, 100 * report[task]["accuracy"], len(hits)
            )
        scores = [report[t]["accuracy"] for t in self._test_datasets]
        report["average"] = {"accuracy": sum(scores) / len(scores)}
        return report
