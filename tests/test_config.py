"""load_config: a directory or a config.json, local only, and errors that name the file and the field."""

from __future__ import annotations

import json

import pytest
from fake_plugins.configs import LLAMA, MISTRAL3

from automodel_plugins.errors import ConfigError
from automodel_plugins.sources import load_config


def test_directory_and_file_path_give_the_same_config(write_model_config):
    directory = write_model_config(MISTRAL3)
    from_dir = load_config(directory)
    from_file = load_config(directory / "config.json")
    assert type(from_dir).__name__ == "Mistral3Config"
    assert from_dir.text_config.model_type == "ministral3"
    assert from_dir.text_config.hidden_size == 64
    assert from_dir.to_dict() == from_file.to_dict()
    assert from_dir.name_or_path == str(directory)


def test_a_json_file_with_another_name_loads(tmp_path):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(LLAMA))
    config = load_config(str(path))
    assert config.model_type == "llama" and config.num_hidden_layers == 2


def test_remote_code_is_never_run(write_model_config):
    directory = write_model_config({**LLAMA, "auto_map": {"AutoConfig": "evil.EvilConfig"}})
    (directory / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    assert type(load_config(directory)).__name__ == "LlamaConfig"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"model_type": "llama",', "malformed JSON at line 1"),
        ("[1, 2]", "expected a JSON object, got a JSON array"),
        ('"llama"', "expected a JSON object, got a JSON string"),
        ('{"hidden_size": 8}', "missing field 'model_type'"),
        ('{"model_type": 3}', "field 'model_type' must be a string"),
        ('{"model_type": "lama"}', "unknown model_type 'lama' in field 'model_type'"),
        (
            '{"model_type": "mistral3", "text_config": {"model_type": "ministral9"}}',
            "unknown model_type 'ministral9' in field 'text_config.model_type'",
        ),
    ],
)
def test_bad_config_raises_config_error_naming_file_and_field(tmp_path, text, fragment):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.path == path
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_unknown_model_type_suggests_close_names(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "lama"}')
    with pytest.raises(ConfigError, match=r"did you mean.*'llama'"):
        load_config(tmp_path)


def test_directory_without_config_and_missing_path(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json in this directory") as info:
        load_config(tmp_path)
    assert info.value.path == tmp_path
    with pytest.raises(ConfigError, match="no such file or directory"):
        load_config(tmp_path / "missing")


def test_values_transformers_rejects_are_config_errors(write_model_config):
    directory = write_model_config({**LLAMA, "hidden_size": 65})  # not divisible by the head count
    with pytest.raises(ConfigError, match="transformers cannot build this config") as info:
        load_config(directory)
    assert info.value.path == directory / "config.json"
