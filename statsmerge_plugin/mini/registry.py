"""Register the mini task names with FusionBench's ``CLIPTemplateFactory``.

FusionBench 0.2.33's ``CLIPTemplateFactory.register_dataset`` is broken for its documented call
forms: with ``classnames=`` + ``templates=`` it stores the key ``"temolates"`` (so evaluation later
raises ``KeyError('templates')``), and ``dataset_info=`` alone trips an inverted assertion. We pass
both ``dataset_info`` and the two lists, which is the one form that stores a correct entry, and
check the result so that a future fix (or a new bug) upstream is noticed.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

from .corruptions import CORRUPTIONS, corrupted_key
from .tasks import TASK_NAMES, get_task


def register_task(name: str, alias: Optional[str] = None) -> None:
    """Make ``name`` (or ``alias``, with ``name``'s class names and templates) resolvable by
    ``fusion_bench.tasks.clip_classification``."""
    from fusion_bench.tasks.clip_classification import CLIPTemplateFactory

    spec = get_task(name)
    name = alias or name
    classnames, templates = list(spec.classnames), spec.templates
    info = {"classnames": classnames, "templates": templates}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "already registered, overwriting"
        CLIPTemplateFactory.register_dataset(
            name, dataset_info=info, classnames=classnames, templates=templates
        )
    stored = CLIPTemplateFactory._dataset_mapping.get(name)
    if not isinstance(stored, dict) or "templates" not in stored:
        CLIPTemplateFactory._dataset_mapping[name] = info


def register_tasks(names: Optional[Iterable[str]] = None) -> None:
    """Register every mini task (or only ``names``) in this process, and each task's corrupted
    test splits under ``<task>__<corruption>`` (the keys of the robustness task pool, which evaluates
    them next to the clean ones; see ``corruptions.py``)."""
    for name in names or TASK_NAMES:
        register_task(name)
        for corruption in CORRUPTIONS:
            register_task(name, alias=corrupted_key(name, corruption))
