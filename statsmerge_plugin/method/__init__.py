"""Merging algorithms, one sub-package each (FusionBench's `fusion_bench/method/<name>/` layout)."""
