# flake8: noqa F401
"""ProDistill (Xu et al., ICML 2025) for FusionBench: ``fusion_bench method=prodistill/clip``,
``method=prodistill/causal_lm`` and ``method=prodistill/gpt2_glue``.

Import-light: the algorithm classes (and the torch-heavy modules behind them) are imported on first
attribute access.
"""

from typing import TYPE_CHECKING

__all__ = ["ProDistillForCLIP", "ProDistillForCausalLM", "ProDistillForGPT2"]

if TYPE_CHECKING:
    from .language import ProDistillForCausalLM, ProDistillForGPT2
    from .prodistill import ProDistillForCLIP


def __getattr__(name):
    if name == "ProDistillForCLIP":
        from .prodistill import ProDistillForCLIP

        return ProDistillForCLIP
    if name in ("ProDistillForCausalLM", "ProDistillForGPT2"):
        from . import language

        return getattr(language, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
