"""The offline language miniature (issue 17): a tiny Llama pretrained on procedural text and
fine-tuned into one model per skill (arithmetic, reverse, instruct), scored by exact match,
loaded through FusionBench's ``CausalLMPool`` and evaluated by :class:`ExactMatchTaskPool`.

Importing the package stays light (the Hydra plugin imports the resolver on every start-up):
``ExactMatchTaskPool`` (FusionBench, torch) is imported on first access.
"""

__all__ = ["ExactMatchTaskPool"]


def __getattr__(name):
    if name == "ExactMatchTaskPool":
        from .taskpool import ExactMatchTaskPool

        return ExactMatchTaskPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
