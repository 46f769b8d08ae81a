"""The hub options as one value: what the public entry points take under transformers' keyword names and pass on
whole, so that no inner layer spells them out again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["HubOptions"]


@dataclass(frozen=True)
class HubOptions:
    """How a hub repo id is fetched; ignored for a local path.

    ``revision``, ``cache_dir``, ``token`` and ``local_files_only`` mean what they mean to transformers (the
    ``HF_HUB_OFFLINE`` / ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_ENDPOINT`` / ``HF_TOKEN`` environment applies too);
    ``progress`` switches download bars (see :mod:`automodel_plugins.progress`); ``collective``:
    under ``torch.distributed``, downloads are made once per machine while the other ranks wait (every rank must
    then make the same calls). The token never shows in the ``repr``.
    """

    revision: str | None = None
    cache_dir: str | Path | None = None
    token: str | bool | None = field(default=None, repr=False)
    local_files_only: bool | None = None
    progress: bool | None = None
    collective: bool = False
