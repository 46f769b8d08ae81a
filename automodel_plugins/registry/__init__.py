"""Plugins: the hook specs they implement, how they are found and isolated, and which one serves a config.

* ``markers``: the pluggy project name and the ``hookspec`` / ``hookimpl`` decorators;
* ``hookspecs``: the four hooks, each a documented spec function;
* ``claims``: a plugin's answer (``Claim`` / ``Decline``), the recorded verdict, and who wins;
* ``manager``: the :class:`Registry` (entry-point discovery, per-plugin isolation, per-plugin hook calls).

Nothing here imports torch or transformers, so ``automodel-plugins list`` stays fast.
"""

from __future__ import annotations

from automodel_plugins.registry.claims import Claim, ClaimVerdict, Decline, pick_winner
from automodel_plugins.registry.manager import (
    ENTRY_POINT_GROUP,
    SELECTION_ENV,
    PluginRecord,
    Registry,
    get_registry,
    parse_selection,
    set_registry,
)
from automodel_plugins.registry.markers import PROJECT_NAME, hookimpl, hookspec

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROJECT_NAME",
    "SELECTION_ENV",
    "Claim",
    "ClaimVerdict",
    "Decline",
    "PluginRecord",
    "Registry",
    "get_registry",
    "hookimpl",
    "hookspec",
    "parse_selection",
    "pick_winner",
    "set_registry",
]
