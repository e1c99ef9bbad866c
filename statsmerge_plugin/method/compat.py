"""Compatibility shims for FusionBench 0.2.33. Torch-free: the Hydra search-path plugin imports this
module at start-up, before FusionBench instantiates any model pool.
"""

from __future__ import annotations

import typing


def patch_typing_override() -> None:
    """Give ``typing`` the ``override`` decorator on Python < 3.12.

    FusionBench 0.2.33 declares Python >= 3.10, but its OpenCLIP model pool
    (``fusion_bench/modelpool/openclip_vision/modelpool.py``, also imported by the OpenCLIP task pool)
    does ``from typing import override``, which only exists from Python 3.12 on, so on 3.10 and 3.11
    neither pool can be imported. ``typing_extensions.override`` is the same no-op decorator (it only
    sets ``__override__``). Idempotent; does nothing on Python >= 3.12.
    """
    if hasattr(typing, "override"):
        return
    try:
        from typing_extensions import override
    except ImportError:  # typing_extensions ships with torch; keep a fallback anyway

        def override(method):
            try:
                method.__override__ = True
            except (AttributeError, TypeError):
                pass
            return method

    typing.override = override
