"""Plugin discovery, isolation and claim resolution.

pluggy gives hook calls but no error isolation: one plugin's ImportError aborts
``load_setuptools_entrypoints`` and one raising hookimpl aborts the whole hook call. This module loads each entry
point on its own, validates it on its own, and calls hooks one plugin at a time, so a broken plugin shows up as a
record with status ``error`` instead of taking the host down. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import TYPE_CHECKING, Any, Literal

import pluggy
from pydantic import BaseModel, ConfigDict

from automodel_plugins.errors import (
    AutomodelPluginsError,
    NoPluginClaimError,
    PluginError,
    UnknownPluginError,
)
from automodel_plugins.registry import hookspecs
from automodel_plugins.registry.claims import ClaimVerdict, pick_winner, verdict_of
from automodel_plugins.registry.markers import PROJECT_NAME

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SELECTION_ENV = "AUTOMODEL_PLUGINS"
"""Comma-separated entry-point names to load; empty loads none; unset loads every installed plugin."""

ENTRY_POINT_GROUP = PROJECT_NAME


class PluginRecord(BaseModel):
    """What the host knows about one plugin, loaded or not; the rows of ``automodel-plugins list``."""

    model_config = ConfigDict(frozen=True)

    name: str
    distribution: str | None = None
    version: str | None = None
    hooks: list[str] = []
    status: Literal["loaded", "error"]
    error: str | None = None


class _Env(enum.Enum):
    """Sentinel: read the selection from ``AUTOMODEL_PLUGINS``."""

    READ = "read"


def parse_selection(value: str | None) -> frozenset[str] | None:
    """``None`` selects every plugin; ``""`` (or whitespace) selects none; ``"a,b"`` selects those names."""
    if value is None:
        return None
    return frozenset(part.strip() for part in value.split(",") if part.strip())


class Registry:
    """The plugins of one process: their records, their hook implementations, and claim resolution."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._records: list[PluginRecord] = []

    # --- building ---------------------------------------------------------------------------------------

    @classmethod
    def from_entry_points(cls, selection: str | Literal[_Env.READ] | None = _Env.READ) -> Registry:
        """Load the installed plugins (entry-point group ``automodel_plugins``), sorted by name.

        ``selection`` defaults to ``$AUTOMODEL_PLUGINS``; plugins it does not select are never imported.
        Raises :class:`UnknownPluginError` for a selected name that no distribution provides.
        """
        if selection is _Env.READ:
            selection = os.environ.get(SELECTION_ENV)
        wanted = parse_selection(selection)
        by_name = _group_by_name(metadata.entry_points(group=ENTRY_POINT_GROUP))
        if wanted is not None:
            unknown = wanted - by_name.keys()
            if unknown:
                raise UnknownPluginError(unknown, by_name)
            by_name = {name: eps for name, eps in by_name.items() if name in wanted}
        registry = cls()
        for name in sorted(by_name):
            registry._load_entry_points(name, by_name[name])
        return registry

    def _load_entry_points(self, name: str, eps: list[metadata.EntryPoint]) -> None:
        if len(eps) > 1:
            self._records.extend(_duplicate_records(name, eps))
            return
        (ep,) = eps
        dist, version = _dist_of(ep)
        try:
            plugin = ep.load()
        except (Exception, SystemExit) as exc:
            message = f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}"
            self._records.append(_error_record(name, dist, version, message))
            return
        self._admit(plugin, name, dist, version)

    def register(
        self, plugin: object, name: str, *, distribution: str | None = None, version: str | None = None
    ) -> PluginRecord:
        """Register ``plugin`` under ``name`` with the same validation as an entry point.

        A plugin that fails validation is recorded with status ``error`` and is not registered. A name already
        in use raises :class:`PluginError`: a second plugin never silently replaces the first.
        """
        existing = [r for r in self._records if r.name == name]
        if existing:
            owners = ", ".join(r.distribution or "(no distribution)" for r in existing)
            raise PluginError(name, None, f"a plugin of this name is already registered (from {owners})")
        return self._admit(plugin, name, distribution, version)

    def _admit(self, plugin: object, name: str, dist: str | None, version: str | None) -> PluginRecord:
        """Register, validate, and record; on any validation problem leave the plugin manager untouched."""
        try:
            if self._pm.register(plugin, name) is None:
                raise ValueError(f"cannot register {plugin!r}")
        except Exception as exc:
            if self._pm.get_plugin(name) is plugin:  # half-registered by an older pluggy
                self._pm.unregister(name=name)
            record = _error_record(name, dist, version, f"invalid plugin: {type(exc).__name__}: {exc}")
        else:
            hooks = self._hooks_of(name)
            problem = self._validate(name)
            if problem is not None:
                self._pm.unregister(name=name)
                record = _error_record(name, dist, version, str(problem), hooks)
            else:
                record = PluginRecord(
                    name=name, distribution=dist, version=version, hooks=hooks, status="loaded"
                )
        self._records.append(record)
        return record

    def _validate(self, name: str) -> PluginError | None:
        """Why plugin ``name`` (just registered) cannot be used, or ``None``."""
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError:
            unknown = [h for h in self._hooks_of(name) if h not in self._spec_names()]
            return PluginError(name, ", ".join(unknown), _unknown_hook_message(unknown, self._spec_names()))
        impls = self._impls_of(name)
        if not impls:
            hint = "does the entry point name the module holding the @hookimpl functions?"
            return PluginError(name, None, f"implements no hooks; {hint}")
        seen: set[str] = set()
        for hook_name, impl in impls:
            if impl.wrapper or impl.hookwrapper:
                return PluginError(name, hook_name, "hook wrappers are not supported: hooks run per plugin")
            if hook_name in seen:
                return PluginError(name, hook_name, "implemented more than once (specname)")
            seen.add(hook_name)
        return None

    def unregister(self, name: str) -> PluginRecord:
        """Forget plugin ``name`` (loaded or not) and return its record."""
        record = self._record(name)
        if record.status == "loaded":
            self._pm.unregister(name=name)
        self._records.remove(record)
        return record

    # --- reading ----------------------------------------------------------------------------------------

    def plugins(self) -> list[PluginRecord]:
        """Every record, sorted by name (then distribution), loaded or not."""
        return sorted(self._records, key=lambda r: (r.name, r.distribution or ""))

    def version(self, plugin: str) -> str | None:
        """The version of the distribution that provides ``plugin`` (``None`` when registered by hand)."""
        return self._record(plugin).version

    def distribution(self, plugin: str) -> str | None:
        """The distribution that provides ``plugin`` (``None`` when registered by hand)."""
        return self._record(plugin).distribution

    def _record(self, name: str) -> PluginRecord:
        matches = [r for r in self._records if r.name == name]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise PluginError(name, None, matches[0].error or "provided by several distributions")
        known = ", ".join(sorted(r.name for r in self._records)) or "(none)"
        raise PluginError(name, None, f"no plugin of this name is registered; registered: {known}")

    def _loaded(self) -> list[str]:
        return sorted(r.name for r in self._records if r.status == "loaded")

    # --- calling ----------------------------------------------------------------------------------------

    def claims(self, config: PretrainedConfig) -> list[ClaimVerdict]:
        """Ask every loaded plugin, one at a time, whether it serves ``config``; sorted by plugin name."""
        impls = dict(self._impls_for("claim_config"))
        return [verdict_of(name, _asker(impls.get(name), config)) for name in self._loaded()]

    def resolve(self, config: PretrainedConfig, *, require_plugin: bool = False) -> str | None:
        """The name of the plugin that serves ``config``, or ``None`` (stock transformers) when none claims it.

        Raises :class:`PluginError` when a claim raised, :class:`AmbiguousClaimError` on a tie at the top
        priority, and :class:`NoPluginClaimError` when nobody claims and ``require_plugin`` is set.
        """
        claim = self.winning_claim(config, require_plugin=require_plugin)
        return None if claim is None else claim.plugin

    def winning_claim(self, config: PretrainedConfig, *, require_plugin: bool = False) -> ClaimVerdict | None:
        """Like :meth:`resolve`, but the winner's whole verdict (its reason and priority), asking each plugin once."""
        verdicts = self.claims(config)
        winner = pick_winner(verdicts)
        if winner is None:
            if require_plugin:
                asked = "; ".join(v.asked() for v in verdicts) or "(no plugins loaded)"
                model_type = getattr(config, "model_type", None)
                raise NoPluginClaimError(f"no plugin claims model_type {model_type!r}; asked: {asked}")
            return None
        return next(v for v in verdicts if v.plugin == winner)

    def call(self, plugin: str, hook: str, **kwargs: Any) -> Any:
        """Call ``plugin``'s implementation of ``hook`` only; ``None`` when it does not implement it.

        An unexpected exception inside the hook is raised as :class:`PluginError` naming the plugin and the
        hook. The host's own typed errors (a :class:`CheckpointError` naming the key at fault, say) pass through
        unwrapped, so callers can catch them by type; they carry a note naming the plugin and the hook.
        """
        record = self._record(plugin)
        if record.status != "loaded":
            raise PluginError(plugin, hook, f"not loaded: {record.error}")
        if hook not in self._spec_names():
            raise ValueError(f"unknown hook {hook!r}; hooks: {', '.join(sorted(self._spec_names()))}")
        impl = dict(self._impls_for(hook)).get(plugin)
        if impl is None:
            return None
        missing = [a for a in impl.argnames if a not in kwargs]
        if missing:
            raise TypeError(f"hook {hook!r} of plugin {plugin!r} needs argument(s) {', '.join(missing)}")
        try:
            return impl.function(**{a: kwargs[a] for a in impl.argnames})
        except AutomodelPluginsError as exc:
            if not isinstance(exc, PluginError) and hasattr(exc, "add_note"):
                exc.add_note(f"raised in hook {hook!r} of plugin {plugin!r}")
            raise
        except Exception as exc:
            raise PluginError(plugin, hook, f"{type(exc).__name__}: {exc}") from exc

    # --- pluggy plumbing --------------------------------------------------------------------------------

    def _spec_names(self) -> set[str]:
        return {name for name, caller in vars(self._pm.hook).items() if caller.has_spec()}

    def _impls_of(self, name: str) -> list[tuple[str, pluggy.HookImpl]]:
        """(hook name, impl) for every hookimpl of one registered plugin."""
        callers = self._pm.get_hookcallers(self._pm.get_plugin(name)) or []
        return [(c.name, impl) for c in callers for impl in c.get_hookimpls() if impl.plugin_name == name]

    def _hooks_of(self, name: str) -> list[str]:
        return sorted({hook for hook, _ in self._impls_of(name)})

    def _impls_for(self, hook: str) -> list[tuple[str, pluggy.HookImpl]]:
        caller = getattr(self._pm.hook, hook)
        return [(impl.plugin_name, impl) for impl in caller.get_hookimpls()]


def _asker(impl: pluggy.HookImpl | None, config: PretrainedConfig) -> Callable[[], Any] | None:
    """``impl``'s ``claim_config`` bound to ``config`` (a hookimpl may take no argument at all)."""
    if impl is None:
        return None
    kwargs = {"config": config} if "config" in impl.argnames else {}
    return lambda: impl.function(**kwargs)


def _group_by_name(eps: Iterable[metadata.EntryPoint]) -> dict[str, list[metadata.EntryPoint]]:
    grouped: dict[str, list[metadata.EntryPoint]] = {}
    for ep in eps:
        grouped.setdefault(ep.name, []).append(ep)
    return grouped


def _dist_of(ep: metadata.EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.name, dist.version


def _error_record(
    name: str, dist: str | None, version: str | None, message: str, hooks: list[str] | None = None
) -> PluginRecord:
    if not message.startswith(f"plugin {name!r}"):
        message = str(PluginError(name, None, message))
    message = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    return PluginRecord(
        name=name, distribution=dist, version=version, hooks=hooks or [], status="error", error=message
    )


def _duplicate_records(name: str, eps: list[metadata.EntryPoint]) -> list[PluginRecord]:
    """Two distributions claiming one entry-point name: record both as errors and import neither."""
    owners = [(*_dist_of(ep), ep.value) for ep in eps]
    listed = "; ".join(f"{dist or '?'} {version or '?'} ({value})" for dist, version, value in owners)
    message = f"entry point name provided by {len(eps)} distributions: {listed}; uninstall all but one"
    return [_error_record(name, dist, version, message) for dist, version, _ in owners]


def _unknown_hook_message(unknown: list[str], known: Iterable[str]) -> str:
    import difflib  # only on this error path: keeps `list` start-up lean

    known = sorted(known)
    hints = [m[0] for h in unknown if (m := difflib.get_close_matches(h, known, n=1))]
    hint = f"; did you mean {', '.join(map(repr, hints))}?" if hints else ""
    return f"no such hook spec (known: {', '.join(known)}){hint}"


# --- the process-wide default -----------------------------------------------------------------------------

_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built from entry points on first use and cached."""
    global _default
    if _default is None:
        _default = Registry.from_entry_points()
    return _default


def set_registry(registry: Registry | None) -> Registry | None:
    """Replace the process-wide registry (``None`` rebuilds it on next use); returns the previous one."""
    global _default
    previous, _default = _default, registry
    return previous
