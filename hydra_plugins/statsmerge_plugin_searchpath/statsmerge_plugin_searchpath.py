"""Hydra search-path plugin: makes ``fusion_bench method=statsmerging/...`` find our configs.

Hydra imports every module of the top-level ``hydra_plugins`` namespace package on start-up, so this
module stays import-light (hydra and omegaconf only). It also registers the ``${mini_clip:}``
resolver used by the mini-TA8 configs and ``${mini_lm:}`` (the language miniature); each builds
its benchmark only when first resolved.

* ``pkg://statsmerge_plugin.config`` is our ``config/`` directory (shipped inside the wheel under that
  name; in an editable install the same name maps to the repository's ``config/``).
* ``pkg://fusion_bench_config`` is appended as well: FusionBench makes ``./config`` its *only* main config
  directory when one exists in the working directory (e.g. our repository root), which would otherwise
  hide ``fabric_model_fusion`` and every built-in method, pool and task pool.

It also gives Python < 3.12 the ``typing.override`` that FusionBench 0.2.33's OpenCLIP pools import
(:func:`statsmerge_plugin.method.compat.patch_typing_override`).
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from statsmerge_plugin.method.compat import patch_typing_override as _patch_typing_override
from statsmerge_plugin.mini.resolver import register_resolver as _register_mini_clip
from statsmerge_plugin.mini_lm.resolver import register_resolver as _register_mini_lm

_register_mini_clip()  # ${mini_clip:} in the mini-clip_TA8 configs (omegaconf only, no torch)
_register_mini_lm()  # ${mini_lm:} in the language miniature's configs (omegaconf only)
# FusionBench 0.2.33's OpenCLIP model and task pools import `typing.override` (Python >= 3.12); this
# runs before any pool is instantiated (typing only, no torch)
_patch_typing_override()


class StatsMergePluginSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="statsmerge-plugin", path="pkg://statsmerge_plugin.config")
        search_path.append(
            provider="statsmerge-plugin-fusion-bench", path="pkg://fusion_bench_config"
        )
