"""What a plugin answers when asked whether it serves a config: a :class:`Claim`, a :class:`Decline`, or ``None``."""

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


class Decline(BaseModel):
    """A plugin's statement that it does not serve a config, and why.

    Same effect as returning ``None``, but the reason is shown by ``list --config`` and in the
    :class:`~automodel_plugins.errors.NoPluginClaimError` of a load that requires a plugin, so a user whose
    checkpoint is near a plugin's family (another text model, another quantization method) learns what
    does not fit instead of guessing.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    reason: str = Field(min_length=1, description="Why the plugin does not serve this config.")
