# flake8: noqa F401
"""StatsMerging (Merugu, Cao, Jain 2025): statistics-guided merging via task-specific teacher distillation."""

from .statsmerging import StatsMergingForCLIP
