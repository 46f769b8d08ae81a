"""What a plugin answers when asked whether it serves a config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Claim(BaseModel):
    """A plugin's statement that it can load a config.

    The highest ``priority`` wins; two claims at the same highest priority are a conflict the user must
    resolve (``AUTOMODEL_PLUGINS``), never a silent pick.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: str = Field(
        min_length=1, description="Why the plugin serves this config, shown by `list --config`."
    )
    priority: int = Field(default=0, description="Higher wins; equal highest priorities are ambiguous.")
