"""Test helpers for the host and for plugin authors.

The pytest plugin (``automodel_plugins.testing.pytest_plugin``, loaded through the ``pytest11`` entry point)
provides the fixtures ``isolated_registry``, ``fake_distribution``, ``run_cli`` and ``write_model_config``.
Nothing here imports torch at import time.
"""
