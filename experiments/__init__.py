"""Experiments: one module per experiment, each deriving from base.get_config()."""
