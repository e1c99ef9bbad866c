# flake8: noqa F401
"""ProDistill (Xu et al., ICML 2025) for FusionBench: ``fusion_bench method=prodistill/clip``.

Import-light: ``ProDistillForCLIP`` (and the torch-heavy modules behind it) are imported on first
attribute access.
"""

from typing import TYPE_CHECKING

__all__ = ["ProDistillForCLIP"]

if TYPE_CHECKING:
    from .prodistill import ProDistillForCLIP


def __getattr__(name):
    if name == "ProDistillForCLIP":
        from .prodistill import ProDistillForCLIP

        return ProDistillForCLIP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
