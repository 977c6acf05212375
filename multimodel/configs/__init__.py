"""Configs: Python files with `get_config()` returning a locked `ml_collections.ConfigDict`.

Variants are small files over `common.make`; override any field on the command line with
`--config.model.d_model=256`. An unknown key is an error.
"""
