"""Configuration: YAML, environment overrides, and errors that name the bad key."""

from __future__ import annotations

import pytest

from selftune.settings import DEFAULT_CONFIG, ConfigError, load_settings


def test_default_config_file_is_valid():
    settings = load_settings(DEFAULT_CONFIG)
    assert settings.model.name == "qwen2.5-coder-0.5b-instruct"
    assert settings.tuning.method == "lora"


def test_env_overrides_yaml(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFTUNE_AGENT__MAX_STEPS", "3")
    monkeypatch.setenv("SELFTUNE_DATA_DIR", str(tmp_path / "data"))
    settings = load_settings()
    assert settings.agent.max_steps == 3
    assert settings.db_path == tmp_path / "data" / "episodes.sqlite3"


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("agent:\n  max_stepz: 3\n", "agent.max_stepz"),
        ("modle:\n  name: x\n", "modle"),
        ("agent:\n  max_steps: -1\n", "agent.max_steps"),
        ("tuning:\n  method: dpo\n", "tuning.method"),
        ("rewards:\n  weights: {vibes: 1.0}\n", "rewards.weights.vibes"),
    ],
)
def test_bad_key_or_value_is_named(tmp_path, yaml_text, named):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    assert named in str(error.value)


def test_bad_env_value_is_named(monkeypatch):
    monkeypatch.setenv("SELFTUNE_AGENT__MAX_STEPS", "many")
    with pytest.raises(ConfigError, match="agent.max_steps"):
        load_settings()


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
