"""The pluggy markers of the project; plugins decorate their hook functions with ``hookimpl``."""

from __future__ import annotations

import pluggy

PROJECT_NAME = "automodel_plugins"
"""pluggy project name; also the entry-point group plugins register under."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
