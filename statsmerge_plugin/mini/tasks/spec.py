"""A mini task: class names, prompt templates and an image generator; the eight task names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np
from PIL import Image

TASK_NAMES: Tuple[str, ...] = (
    "mini_sun397",
    "mini_stanford_cars",
    "mini_resisc45",
    "mini_eurosat",
    "mini_svhn",
    "mini_gtsrb",
    "mini_mnist",
    "mini_dtd",
)


@dataclass(frozen=True)
class TaskSpec:
    """Class names, prompt templates (``str.format`` patterns) and image generator of a task."""

    name: str
    classnames: Tuple[str, ...]
    template_patterns: Tuple[str, ...]
    draw: Callable[[np.random.Generator, int], Image.Image]

    @property
    def templates(self) -> List[Callable[[str], str]]:
        """Templates as callables, the form FusionBench's ``CLIPTemplateFactory`` expects."""
        return [p.format for p in self.template_patterns]

    def captions(self, label: int) -> List[str]:
        return [p.format(self.classnames[label]) for p in self.template_patterns]
