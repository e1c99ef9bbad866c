"""Eight procedural image-classification tasks analogous to FusionBench's TA8.

Every task has ten classes, FusionBench-style prompt templates and a generator that draws one
32x32 RGB image of a class from a ``numpy.random.Generator``. Classes are ordered so that classes
``2k`` and ``2k+1`` form a visually close pair (the pairs the pretraining captions may blur, see
``build.py``). Nothing here imports torch.

One module per task family (:mod:`.scenes`, :mod:`.vehicles`, :mod:`.remote_sensing`,
:mod:`.digits`, :mod:`.signs`, :mod:`.textures`), each drawing with the shared helpers of
:mod:`.drawing` and declaring its :class:`~.spec.TaskSpec` (classes, FusionBench-style templates,
generator); this module collects them in TA8 order.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
from PIL import Image

from . import digits, remote_sensing, scenes, signs, textures, vehicles
from .digits import DIGIT_CLASSES, digit_source_indices, draw_handwritten  # noqa: F401
from .drawing import CANVAS, SIZE  # noqa: F401
from .spec import TASK_NAMES, TaskSpec

_SPECS = {
    **scenes.SPECS,
    **vehicles.SPECS,
    **remote_sensing.SPECS,
    **digits.SPECS,
    **signs.SPECS,
    **textures.SPECS,
}
TASKS: Dict[str, TaskSpec] = {name: _SPECS[name] for name in TASK_NAMES}


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of a mini task, with a helpful error for unknown names."""
    if name not in TASKS:
        raise KeyError(f"unknown mini task {name!r}; known: {', '.join(TASK_NAMES)}")
    return TASKS[name]


def draw(task: str, rng: np.random.Generator, label: int, part: str) -> Image.Image:
    """Draw one image; ``part`` picks disjoint source pools where a task has real sources."""
    if task == "mini_mnist":
        return draw_handwritten(rng, label, part)
    return get_task(task).draw(rng, label)


def caption_corpus() -> List[str]:
    """Every caption of every task (class names x templates), in a fixed order."""
    return [c for spec in TASKS.values() for lab in range(10) for c in spec.captions(lab)]
