"""The ``mini_lm`` OmegaConf resolver: ``${mini_lm:}`` is the root of a (lazily built) build.

``${mini_lm:}`` takes the preset from ``$STATSMERGE_MINI_LM_PRESET`` (default ``default``), the seed
from ``$STATSMERGE_MINI_SEED`` (default 0) and the root from ``$STATSMERGE_MINI_ROOT`` (or the user
cache dir), as mini-TA8 does; ``${mini_lm:smoke}`` / ``${mini_lm:default,1}`` name them. The first
call in a process builds (or finds) the build; later calls are memoized. Importing this module
only imports omegaconf.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

from omegaconf import OmegaConf

NAME = "mini_lm"
ENV_PRESET = "STATSMERGE_MINI_LM_PRESET"
ENV_SEED = "STATSMERGE_MINI_SEED"

_cache: Dict[Tuple[str, int, Optional[str]], str] = {}


def mini_lm_root(preset: Optional[str] = None, seed=None) -> str:
    """Resolver body: path of the complete build for ``preset`` / ``seed``."""
    preset = str(preset or os.environ.get(ENV_PRESET) or "default")
    seed = int(seed if seed not in (None, "") else os.environ.get(ENV_SEED, 0))
    key = (preset, seed, os.environ.get("STATSMERGE_MINI_ROOT"))
    if key not in _cache:
        from .build import ensure_built

        _cache[key] = str(ensure_built(seed=seed, preset=preset))
    return _cache[key]


def register_resolver() -> None:
    """Register ``mini_lm`` with OmegaConf (idempotent)."""
    OmegaConf.register_new_resolver(NAME, mini_lm_root, replace=True)
