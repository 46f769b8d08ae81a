"""Mistral-native repos on a stand-in hub (``fake_hub``, 127.0.0.1): what a load downloads.

A native-only repo holding a single ``consolidated.safetensors`` (Ministral 3's native files, no index) downloads
``params.json`` and that file, nothing else (tokenizer, README, other weights formats stay on the hub); a repo
holding both forms loads the HF one and never fetches the native files. The sharded native index case is in
``test_mistral_native.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from mistral_native_checkpoints import write_native
from transformers import Mistral3ForConditionalGeneration

import automodel_plugins
from automodel_plugins.testing.compare import assert_same_logits
from automodel_plugins.testing.tiny_models import text_batch, tiny_mistral3_config

EXTRAS = {
    "tekken.json": b"{}",
    "README.md": b"# native",
    "consolidated.pth": b"a pickle: never fetched",
    "SYSTEM_PROMPT.txt": b"you are",
}


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Mistral3ForConditionalGeneration]:
    torch.manual_seed(5)
    reference = Mistral3ForConditionalGeneration(tiny_mistral3_config(vision={"hidden_act": "silu"})).eval()
    return write_native(tmp_path_factory.mktemp("hub") / "native", reference), reference


def served(fake_hub: Any, repo: str) -> set[str]:
    prefix = f"{repo}:"
    return {k[len(prefix) :] for k, n in fake_hub.bytes_served["files"].items() if k.startswith(prefix) and n}


def test_single_file_native_repo_downloads_params_and_consolidated_only(
    fake_hub: Any, native: tuple[Path, Any]
) -> None:
    directory, reference = native
    fake_hub.add_directory("mistralai/native-single", directory, extra=EXTRAS)
    fake_hub.reset_counters()
    model = automodel_plugins.from_pretrained("mistralai/native-single", dtype=torch.float32)
    assert served(fake_hub, "mistralai/native-single") == {"params.json", "consolidated.safetensors"}
    assert model.automodel_composition.adapter["layout"] == "native"
    assert_same_logits(model, reference, text_batch(reference.config.text_config, labels=False))


def test_a_repo_with_both_forms_never_fetches_the_native_files(
    fake_hub: Any, native: tuple[Path, Any], tmp_path: Path
) -> None:
    directory, reference = native
    hf = tmp_path / "hf"
    reference.save_pretrained(hf)
    native_files = {
        name: (directory / name).read_bytes() for name in ("params.json", "consolidated.safetensors")
    }
    fake_hub.add_directory("mistralai/both-forms", hf, extra={**native_files, **EXTRAS})
    fake_hub.reset_counters()
    model = automodel_plugins.from_pretrained("mistralai/both-forms", dtype=torch.float32)
    got = served(fake_hub, "mistralai/both-forms")
    assert "config.json" in got and not got & {"params.json", "consolidated.safetensors", *EXTRAS}
    assert model.automodel_composition.adapter["layout"] != "native"
    assert_same_logits(model, reference, text_batch(reference.config.text_config, labels=False))
