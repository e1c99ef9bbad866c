"""statsmerge-plugin: StatsMerging and ProDistill for FusionBench.

Kept import-light: nothing here imports torch or transformers.
"""

__version__ = "0.1.0"
