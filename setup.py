"""Package discovery that pyproject.toml alone cannot express.

`config/` stays at the repository top level (FusionBench's own layout) but is installed as the package
`statsmerge_plugin.config`, so that no top-level `config` directory ever lands in site-packages (FusionBench
would take it as its main config directory for every working directory).
"""

from setuptools import find_namespace_packages, setup

packages = find_namespace_packages(
    include=["statsmerge_plugin", "statsmerge_plugin.*", "hydra_plugins", "hydra_plugins.*"]
)
config_packages = ["statsmerge_plugin.config"]

setup(
    packages=packages + config_packages,
    package_dir={"statsmerge_plugin.config": "config"},
)
