"""What a plugin answers when asked whether it serves a config, and how the answers are resolved.

A plugin answers with a :class:`Claim`, a :class:`Decline`, or ``None``; the host records each answer as a
:class:`ClaimVerdict` (an exception or a wrong return type is kept as the verdict's error, never read as a
silent "no") and :func:`pick_winner` decides. Nothing here imports torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from automodel_plugins.errors import AmbiguousClaimError, PluginError

__all__ = ["Claim", "ClaimVerdict", "Decline", "pick_winner", "verdict_of"]


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


class ClaimVerdict(BaseModel):
    """One plugin's answer to ``claim_config``; an exception or a wrong return type is kept, never a silent no."""

    model_config = ConfigDict(frozen=True)

    plugin: str
    claimed: bool
    reason: str | None = None
    priority: int | None = None
    error: str | None = None

    def asked(self) -> str:
        """``plugin`` or ``plugin (reason)``: one declined plugin in a no-claim error."""
        return f"{self.plugin} ({self.reason})" if self.reason else self.plugin


def verdict_of(plugin: str, ask: Callable[[], Any] | None) -> ClaimVerdict:
    """Call ``ask`` (the plugin's ``claim_config`` bound to the config; ``None`` when it has none) and record
    the answer. Any exception, ``SystemExit`` included (a plugin must not end the host), becomes the verdict's
    error; only ``KeyboardInterrupt`` goes through."""
    if ask is None:
        return ClaimVerdict(plugin=plugin, claimed=False, reason="does not implement claim_config")
    try:
        answer = ask()
    except (Exception, SystemExit) as exc:
        return ClaimVerdict(plugin=plugin, claimed=False, error=f"{type(exc).__name__}: {exc}")
    if answer is None:
        return ClaimVerdict(plugin=plugin, claimed=False)
    if isinstance(answer, Decline):
        return ClaimVerdict(plugin=plugin, claimed=False, reason=answer.reason)
    if not isinstance(answer, Claim):
        return ClaimVerdict(
            plugin=plugin,
            claimed=False,
            error=f"returned {type(answer).__name__}, expected Claim, Decline or None",
        )
    return ClaimVerdict(plugin=plugin, claimed=True, reason=answer.reason, priority=answer.priority)


def pick_winner(verdicts: Sequence[ClaimVerdict]) -> str | None:
    """The plugin whose claim wins, or ``None`` when nobody claims.

    A claim that errored makes the answer unknowable, so it raises rather than letting another plugin win by
    default; equal top priorities raise too, since picking one would depend on install order.
    """
    for verdict in verdicts:
        if verdict.error is not None:
            raise PluginError(verdict.plugin, "claim_config", verdict.error)
    claimed = [v for v in verdicts if v.claimed]
    if not claimed:
        return None
    top = max(v.priority or 0 for v in claimed)
    winners = [v.plugin for v in claimed if (v.priority or 0) == top]
    if len(winners) > 1:
        raise AmbiguousClaimError(winners, top)
    return winners[0]
