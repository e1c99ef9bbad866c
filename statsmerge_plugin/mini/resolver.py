"""The ``mini_clip`` OmegaConf resolver: ``${mini_clip:}`` is the root of a (lazily built) build.

Usage in YAML: ``${mini_clip:}`` (preset from ``$STATSMERGE_MINI_PRESET`` or ``default``, seed from
``$STATSMERGE_MINI_SEED`` or 0, root from ``$STATSMERGE_MINI_ROOT`` or the user cache dir), or
explicit ``${mini_clip:smoke}`` / ``${mini_clip:default,1}``. The first call in a process builds
(or finds) the benchmark and registers the mini task names with FusionBench; later calls are
memoized. Importing this module only imports omegaconf.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from omegaconf import OmegaConf

NAME = "mini_clip"
ENV_PRESET = "STATSMERGE_MINI_PRESET"
ENV_SEED = "STATSMERGE_MINI_SEED"

_cache: Dict[Tuple[str, int, Optional[str]], str] = {}


def default_preset(preset: Optional[str] = None) -> str:
    """``preset``, else ``$STATSMERGE_MINI_PRESET``, else ``default`` (the resolver and the CLI)."""
    return str(preset or os.environ.get(ENV_PRESET) or "default")


def default_seed(seed=None) -> int:
    """``seed``, else ``$STATSMERGE_MINI_SEED``, else 0 (the resolver and the CLI)."""
    value = seed if seed not in (None, "") else os.environ.get(ENV_SEED, 0)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${ENV_SEED}={value!r}: expected an integer build seed") from None


def mini_clip_root(preset: Optional[str] = None, seed=None) -> str:
    """Resolver body: path of the complete build for ``preset`` / ``seed``."""
    preset, seed = default_preset(preset), default_seed(seed)
    key = (preset, seed, os.environ.get("STATSMERGE_MINI_ROOT"))
    if key not in _cache:
        from .build import ensure_built
        from .registry import register_tasks

        _cache[key] = str(ensure_built(seed=seed, preset=preset))
        register_tasks()
    return _cache[key]


def register_resolver() -> None:
    """Register ``mini_clip`` with OmegaConf (idempotent)."""
    OmegaConf.register_new_resolver(NAME, mini_clip_root, replace=True)
