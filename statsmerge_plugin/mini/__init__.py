"""Offline miniature of FusionBench's eight-task CLIP benchmark ("mini-TA8").

Importing this package only registers the ``mini_clip`` OmegaConf resolver (omegaconf only);
the builder is imported lazily::

    from statsmerge_plugin.mini import build_mini_benchmark, ensure_built
"""

from .resolver import register_resolver

register_resolver()

_LAZY = {
    "build_mini_benchmark": ".build",
    "ensure_built": ".build",
    "default_root": ".build",
    "Recipe": ".recipe",
    "PRESETS": ".recipe",
    "TASK_NAMES": ".tasks",
    "register_tasks": ".registry",
}

__all__ = ["register_resolver", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
