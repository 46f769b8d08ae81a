"""What ``list --config`` and ``inspect`` import, in a fresh process: nothing their answer does not need.

Guards, not timings (those are ``benchmarks/bench_inspect.py``'s): ``list --config`` of a claimed config builds a
transformers config and asks the plugins, so it loads no modeling code and none of the loader; ``inspect`` of a
dense model builds that model on meta, so the only modeling modules it loads are that model's (the FP8-resident
experts check no longer imports Qwen3-VL-MoE's modeling module for a model without fused experts).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_plugins import installed

from automodel_plugins.cli import main
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.pytest_plugin import subprocess_env
from automodel_plugins.testing.tiny_models import tiny_mistral3_config

pytestmark = pytest.mark.skipif(
    not installed("automodel-plugins-mistral3-fp8"),
    reason="distribution automodel-plugins-mistral3-fp8 is not installed (pip install -e plugins/mistral3_fp8)",
)

RUN_AND_LIST_MODULES = """
import json, sys
from automodel_plugins.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    json.dump(sorted(sys.modules), out)
raise SystemExit(code)
"""

MISTRAL3_MODELING = {
    "transformers.models.mistral3.modeling_mistral3",
    "transformers.models.ministral3.modeling_ministral3",
    "transformers.models.pixtral.modeling_pixtral",
}


@pytest.fixture(scope="module")
def mistral3_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(tiny_mistral3_config())
    model.config.architectures = ["Mistral3ForConditionalGeneration"]
    return write_fp8_checkpoint(
        model,
        tmp_path_factory.mktemp("mistral3"),
        modules_to_not_convert=("model.vision_tower", "model.multi_modal_projector", "lm_head"),
    )


def modules_after(tmp_path: Path, *argv: str) -> set[str]:
    """The modules a fresh ``automodel-plugins ARGV`` process has imported when it is done (exit 0)."""
    listing = tmp_path / "modules.json"
    env = subprocess_env({"AUTOMODEL_PLUGINS": "mistral3_fp8", "AUTOMODEL_PLUGINS_PROGRESS": "0"})
    result = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST_MODULES, str(listing), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(listing.read_text()))


def model_modeling_modules(modules: set[str]) -> set[str]:
    """``transformers.models.<model>.modeling_<model>`` modules (the auto classes' mapping excepted)."""
    return {m for m in modules if m.startswith("transformers.models.") and ".modeling_" in m} - {
        "transformers.models.auto.modeling_auto"
    }


def test_list_config_of_a_claimed_config_loads_no_modeling_code_and_no_loader(
    mistral3_fp8: Path, tmp_path: Path
) -> None:
    modules = modules_after(tmp_path, "list", "--config", str(mistral3_fp8), "--json")
    assert "transformers.models.mistral3.configuration_mistral3" in modules  # the config was built
    assert model_modeling_modules(modules) == set()
    assert "transformers.modeling_utils" not in modules
    assert not {
        m for m in modules if m.startswith(("automodel_plugins.pipeline", "automodel_plugins.checkpoint"))
    }


def test_inspect_of_a_dense_model_loads_only_that_models_modeling_code(
    mistral3_fp8: Path, tmp_path: Path
) -> None:
    modules = modules_after(tmp_path, "inspect", str(mistral3_fp8), "--json")
    assert "automodel_plugins.pipeline.load.describe" in modules  # the model was built and planned
    assert model_modeling_modules(modules) == MISTRAL3_MODELING


def test_main_leaves_the_callers_gc_thresholds_as_they_were(capsys: pytest.CaptureFixture[str]) -> None:
    """``list`` / ``inspect`` raise the collector's thresholds for their own run only."""
    before = gc.get_threshold()
    assert main(["list", "--json"]) == 0
    assert gc.get_threshold() == before
    assert json.loads(capsys.readouterr().out)["claims"] == []
