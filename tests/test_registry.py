"""Registry: discovery, isolation of broken plugins, AUTOMODEL_PLUGINS, claim resolution, per-plugin calls."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import fake_plugins.bad_arguments
import fake_plugins.declining_claimer
import fake_plugins.generic_claimer
import fake_plugins.greedy_claimer
import fake_plugins.misspelled_hook
import fake_plugins.mistral3_claimer
import fake_plugins.no_claim
import fake_plugins.raising_claimer
import fake_plugins.wrapper_hook
import fake_plugins.wrong_type_claimer
import pytest
from fake_plugins import source

from automodel_plugins import Claim, Decline, hookimpl
from automodel_plugins.errors import (
    AmbiguousClaimError,
    CheckpointError,
    NoPluginClaimError,
    PluginError,
    UnknownPluginError,
)
from automodel_plugins.registry import ClaimVerdict, Registry, get_registry, pick_winner, set_registry

MISTRAL3 = SimpleNamespace(model_type="mistral3", text_config=SimpleNamespace(model_type="ministral3"))
LLAMA = SimpleNamespace(model_type="llama")


def _registry(**plugins: object) -> Registry:
    registry = Registry()
    for name, plugin in plugins.items():
        registry.register(plugin, name)
    return registry


def _by_name(registry: Registry) -> dict[str, object]:
    return {record.name: record for record in registry.plugins()}


@pytest.fixture
def installed(fake_distribution):
    """Three fake distributions: two good plugins and one whose import fails."""
    fake_distribution(
        "automodel-plugins-fake-good",
        version="1.2.3",
        entry_points={"fake_good": "fake_good_mod"},
        modules={"fake_good_mod": source("mistral3_claimer")},
    )
    fake_distribution(
        "automodel-plugins-fake-other",
        version="0.0.1",
        entry_points={"fake_other": "fake_other_mod"},
        modules={"fake_other_mod": source("generic_claimer")},
    )
    return fake_distribution(
        "automodel-plugins-fake-broken",
        entry_points={"fake_broken": "fake_broken_mod"},
        modules={"fake_broken_mod": source("import_error")},
    )


# --- discovery --------------------------------------------------------------------------------------------


def test_entry_point_plugin_is_loaded_with_distribution_version_and_hooks(installed):
    registry = Registry.from_entry_points("fake_good")
    (record,) = registry.plugins()
    assert record.name == "fake_good"
    assert record.distribution == "automodel-plugins-fake-good"
    assert record.version == "1.2.3"
    assert record.hooks == ["claim_config", "post_materialize"]
    assert record.status == "loaded"
    assert record.error is None
    assert registry.version("fake_good") == "1.2.3"
    assert registry.distribution("fake_good") == "automodel-plugins-fake-good"


def test_import_error_is_recorded_and_other_plugins_still_load(installed):
    registry = Registry.from_entry_points("fake_broken,fake_good,fake_other")
    records = _by_name(registry)
    assert [r.name for r in registry.plugins()] == ["fake_broken", "fake_good", "fake_other"]
    broken = records["fake_broken"]
    assert broken.status == "error"
    assert broken.distribution == "automodel-plugins-fake-broken"
    assert "fake_broken" in broken.error
    assert "ImportError" in broken.error and "fancy_kernels" in broken.error
    assert records["fake_good"].status == records["fake_other"].status == "loaded"
    assert registry.resolve(MISTRAL3) == "fake_good"


def test_duplicate_entry_point_names_are_both_errors_naming_both_distributions(fake_distribution):
    for dist, module in [("dist-alpha", "dup_alpha_mod"), ("dist-beta", "dup_beta_mod")]:
        fake_distribution(dist, entry_points={"dup": module}, modules={module: source("greedy_claimer")})
    registry = Registry.from_entry_points("dup")
    records = registry.plugins()
    assert [(r.name, r.distribution, r.status) for r in records] == [
        ("dup", "dist-alpha", "error"),
        ("dup", "dist-beta", "error"),
    ]
    for record in records:
        assert "dist-alpha" in record.error and "dist-beta" in record.error
    assert "dup_alpha_mod" not in sys.modules and "dup_beta_mod" not in sys.modules
    assert registry.claims(LLAMA) == []


# --- validation -------------------------------------------------------------------------------------------


def test_misspelled_hook_puts_that_plugin_in_error_naming_plugin_and_hook():
    registry = _registry(typo=fake_plugins.misspelled_hook, good=fake_plugins.mistral3_claimer)
    records = _by_name(registry)
    typo = records["typo"]
    assert typo.status == "error"
    assert "'typo'" in typo.error and "claim_confg" in typo.error
    assert "claim_config" in typo.error  # the suggestion
    assert records["good"].status == "loaded"
    # Unregistered, so its valid post_materialize cannot half-work either.
    with pytest.raises(PluginError, match="not loaded"):
        registry.call("typo", "post_materialize", model=SimpleNamespace(calls=[]), config=LLAMA)
    assert [v.plugin for v in registry.claims(LLAMA)] == ["good"]


def test_misspelled_hook_through_entry_points(fake_distribution):
    fake_distribution(
        "dist-typo",
        entry_points={"typo_ep": "typo_ep_mod"},
        modules={"typo_ep_mod": source("misspelled_hook")},
    )
    (record,) = Registry.from_entry_points("typo_ep").plugins()
    assert record.status == "error"
    assert "typo_ep" in record.error and "claim_confg" in record.error


def test_argument_not_in_spec_is_an_error_record():
    record = Registry().register(fake_plugins.bad_arguments, "bad")
    assert record.status == "error"
    assert "'bad'" in record.error and "device" in record.error


def test_wrapper_hookimpl_is_an_error_record():
    record = Registry().register(fake_plugins.wrapper_hook, "wrapped")
    assert record.status == "error"
    assert "wrapper" in record.error


def test_same_module_under_a_second_name_is_an_error_and_the_first_stays_loaded():
    registry = _registry(first=fake_plugins.generic_claimer, second=fake_plugins.generic_claimer)
    records = _by_name(registry)
    assert records["first"].status == "loaded"
    assert records["second"].status == "error" and "already registered" in records["second"].error
    assert registry.resolve(LLAMA) == "first"


@pytest.mark.parametrize("plugin", [object(), None], ids=["no-hooks", "none"])
def test_plugin_without_hooks_is_an_error_record(plugin):
    registry = Registry()
    record = registry.register(plugin, "empty")
    assert record.status == "error" and "'empty'" in record.error
    assert registry.claims(LLAMA) == []


def test_register_returns_loaded_record_and_refuses_a_second_plugin_of_the_same_name():
    registry = Registry()
    record = registry.register(fake_plugins.no_claim, "x", distribution="d", version="1")
    assert (record.status, record.hooks, record.distribution, record.version) == (
        "loaded",
        ["post_materialize"],
        "d",
        "1",
    )
    with pytest.raises(PluginError, match="already registered"):
        registry.register(fake_plugins.generic_claimer, "x")
    assert registry.plugins() == [record]


def test_unregister_forgets_the_plugin():
    registry = _registry(a=fake_plugins.generic_claimer, b=fake_plugins.no_claim)
    registry.unregister("a")
    assert [r.name for r in registry.plugins()] == ["b"]
    assert registry.resolve(LLAMA) is None
    with pytest.raises(PluginError, match="no plugin of this name"):
        registry.unregister("a")


# --- AUTOMODEL_PLUGINS ------------------------------------------------------------------------------------


def test_unset_selection_loads_every_installed_plugin(installed, monkeypatch):
    monkeypatch.delenv("AUTOMODEL_PLUGINS", raising=False)
    names = {r.name for r in Registry.from_entry_points().plugins()}
    assert {"fake_good", "fake_other", "fake_broken"} <= names


@pytest.mark.parametrize("value", ["", "  ", " , "])
def test_empty_selection_loads_nothing(installed, monkeypatch, value):
    monkeypatch.setenv("AUTOMODEL_PLUGINS", value)
    assert Registry.from_entry_points().plugins() == []
    assert "fake_good_mod" not in sys.modules


def test_selection_loads_only_named_plugins_and_never_imports_the_others(installed, monkeypatch):
    monkeypatch.setenv("AUTOMODEL_PLUGINS", " fake_good , fake_other ")
    registry = Registry.from_entry_points()
    assert [r.name for r in registry.plugins()] == ["fake_good", "fake_other"]
    assert "fake_good_mod" in sys.modules
    assert "fake_broken_mod" not in sys.modules


def test_unknown_selected_name_raises_naming_it(installed, monkeypatch):
    monkeypatch.setenv("AUTOMODEL_PLUGINS", "fake_good,fake_nope")
    with pytest.raises(UnknownPluginError, match="fake_nope") as info:
        Registry.from_entry_points()
    assert info.value.names == ["fake_nope"]
    assert "fake_good" in info.value.available
    assert "fake_good_mod" not in sys.modules


def test_explicit_selection_overrides_the_environment(installed, monkeypatch):
    monkeypatch.setenv("AUTOMODEL_PLUGINS", "")
    assert [r.name for r in Registry.from_entry_points("fake_other").plugins()] == ["fake_other"]


def test_get_registry_is_built_once_and_set_registry_replaces_it(installed, monkeypatch):
    monkeypatch.setenv("AUTOMODEL_PLUGINS", "fake_other")
    previous = set_registry(None)
    try:
        first = get_registry()
        assert get_registry() is first
        assert [r.name for r in first.plugins()] == ["fake_other"]
        mine = Registry()
        assert set_registry(mine) is first
        assert get_registry() is mine
    finally:
        set_registry(previous)


def test_isolated_registry_is_the_default_and_empty(isolated_registry):
    assert get_registry() is isolated_registry
    assert isolated_registry.plugins() == []


# --- claims -----------------------------------------------------------------------------------------------


def test_claims_asks_every_plugin_and_reports_each_answer():
    registry = _registry(
        specific=fake_plugins.mistral3_claimer,
        generic=fake_plugins.generic_claimer,
        silent=fake_plugins.no_claim,
    )
    assert registry.claims(LLAMA) == [
        ClaimVerdict(plugin="generic", claimed=True, reason="generic fallback", priority=0),
        ClaimVerdict(plugin="silent", claimed=False, reason="does not implement claim_config"),
        ClaimVerdict(plugin="specific", claimed=False),
    ]


def test_highest_priority_wins():
    registry = _registry(generic=fake_plugins.generic_claimer, specific=fake_plugins.mistral3_claimer)
    assert registry.resolve(MISTRAL3) == "specific"
    assert registry.resolve(LLAMA) == "generic"


@pytest.mark.parametrize("order", [("specific", "greedy"), ("greedy", "specific")])
def test_tie_at_top_priority_is_ambiguous_whatever_the_registration_order(order):
    plugins = {"specific": fake_plugins.mistral3_claimer, "greedy": fake_plugins.greedy_claimer}
    registry = _registry(generic=fake_plugins.generic_claimer, **{name: plugins[name] for name in order})
    with pytest.raises(AmbiguousClaimError) as info:
        registry.resolve(MISTRAL3)
    assert info.value.claimants == ["greedy", "specific"]
    assert info.value.priority == 10
    assert "'greedy'" in str(info.value) and "'specific'" in str(info.value)


def test_claim_that_raises_is_a_verdict_error_and_resolve_raises_plugin_error():
    registry = _registry(bad=fake_plugins.raising_claimer, generic=fake_plugins.generic_claimer)
    bad, generic = registry.claims(LLAMA)
    assert bad.error == "RuntimeError: boom while reading the config"
    assert not bad.claimed
    assert generic.claimed
    with pytest.raises(PluginError) as info:
        registry.resolve(LLAMA)
    assert (info.value.plugin, info.value.hook) == ("bad", "claim_config")
    assert "RuntimeError: boom" in str(info.value)


def test_claim_returning_a_non_claim_is_a_verdict_error():
    registry = _registry(odd=fake_plugins.wrong_type_claimer)
    (verdict,) = registry.claims(LLAMA)
    assert verdict.error is not None and "dict" in verdict.error and "Claim" in verdict.error
    with pytest.raises(PluginError, match="'odd' in hook 'claim_config'"):
        registry.resolve(LLAMA)


def test_no_claim_returns_none_or_raises_when_a_plugin_is_required():
    registry = _registry(specific=fake_plugins.mistral3_claimer, silent=fake_plugins.no_claim)
    assert registry.resolve(LLAMA) is None
    with pytest.raises(NoPluginClaimError, match="'llama'") as info:
        registry.resolve(LLAMA, require_plugin=True)
    assert "silent" in str(info.value) and "specific" in str(info.value)


def test_decline_keeps_its_reason_and_a_claim_beside_it_still_wins():
    registry = _registry(no=fake_plugins.declining_claimer, generic=fake_plugins.generic_claimer)
    assert registry.claims(LLAMA) == [
        ClaimVerdict(plugin="generic", claimed=True, reason="generic fallback", priority=0),
        ClaimVerdict(plugin="no", claimed=False, reason="llama is served by stock transformers"),
    ]
    assert registry.resolve(LLAMA) == "generic"


def test_no_claim_error_gives_each_declining_plugins_reason():
    registry = _registry(
        no=fake_plugins.declining_claimer,
        silent=fake_plugins.no_claim,
        specific=fake_plugins.mistral3_claimer,
    )
    with pytest.raises(NoPluginClaimError) as info:
        registry.resolve(LLAMA, require_plugin=True)
    assert str(info.value) == (
        "no plugin claims model_type 'llama'; asked: no (llama is served by stock transformers); "
        "silent (does not implement claim_config); specific"
    )


@pytest.mark.parametrize("reason", ["", None])
def test_decline_requires_a_reason(reason):
    with pytest.raises(ValueError, match="reason"):
        Decline(reason=reason)


def test_pick_winner_reports_the_first_error_by_plugin_order():
    verdicts = [
        ClaimVerdict(plugin="a", claimed=False, error="ValueError: x"),
        ClaimVerdict(plugin="b", claimed=True, reason="r", priority=99),
    ]
    with pytest.raises(PluginError, match="'a'"):
        pick_winner(verdicts)


def test_claim_impl_without_arguments_is_called():
    class NoArgs:
        @hookimpl
        def claim_config(self):
            return Claim(reason="always", priority=1)

    registry = _registry(noargs=NoArgs())
    assert registry.resolve(LLAMA) == "noargs"


# --- call -------------------------------------------------------------------------------------------------


def test_call_runs_only_the_named_plugin():
    registry = _registry(
        specific=fake_plugins.mistral3_claimer,
        generic=fake_plugins.generic_claimer,
        other=fake_plugins.no_claim,
    )
    model = SimpleNamespace(calls=[])
    assert registry.call("generic", "post_materialize", model=model, config=LLAMA) is None
    assert model.calls == ["generic_claimer"]


def test_call_returns_the_result_or_none_when_not_implemented():
    registry = _registry(specific=fake_plugins.mistral3_claimer, silent=fake_plugins.no_claim)
    claim = registry.call("specific", "claim_config", config=MISTRAL3)
    assert claim == Claim(reason="Mistral3 with a ministral3 text backbone", priority=10)
    assert registry.call("silent", "claim_config", config=MISTRAL3) is None


def test_call_wraps_exceptions_naming_plugin_and_hook():
    registry = _registry(bad=fake_plugins.raising_claimer)
    with pytest.raises(PluginError) as info:
        registry.call("bad", "forward_override", model=object(), config=LLAMA)
    assert (info.value.plugin, info.value.hook) == ("bad", "forward_override")
    assert "ValueError: no forward for you" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


class _TypedErrorPlugin:
    """Raises the host's own typed error from a hook, as a plugin using the host's helpers would."""

    @hookimpl
    def post_materialize(self, model, config):
        raise CheckpointError("scale is NaN", key="layers.0.q_proj.weight_scale_inv")


def test_call_lets_typed_host_errors_through_with_a_note_naming_plugin_and_hook():
    registry = _registry(typed=_TypedErrorPlugin())
    with pytest.raises(CheckpointError) as info:
        registry.call("typed", "post_materialize", model=object(), config=LLAMA)
    assert not isinstance(info.value, PluginError)
    assert "layers.0.q_proj.weight_scale_inv" in str(info.value)
    assert info.value.__notes__ == ["raised in hook 'post_materialize' of plugin 'typed'"]


def test_call_rejects_unknown_plugin_and_unknown_hook():
    registry = _registry(generic=fake_plugins.generic_claimer)
    with pytest.raises(PluginError, match="'nobody'"):
        registry.call("nobody", "claim_config", config=LLAMA)
    with pytest.raises(ValueError, match="claim_confg"):
        registry.call("generic", "claim_confg", config=LLAMA)
