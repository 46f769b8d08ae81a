"""Test helpers for the host and for plugin authors.

The pytest plugin (``automodel_plugins.testing.pytest_plugin``, loaded through the ``pytest11`` entry point)
provides the fixtures ``isolated_registry``, ``fake_distribution``, ``run_cli`` and ``write_model_config``.
``compare`` checks a plugin's load against stock transformers; ``tiny_models`` builds tiny stock configs and
batches (import it where it is used: nothing here imports it).
Nothing here imports torch at import time.
"""
