"""The run config: defaults agree with pyproject.toml, bad values name their key."""

import tomllib
from pathlib import Path

import pytest

from hydraai.config import RunConfig
from hydraai.errors import ConfigError

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


def declared_config() -> dict:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_pyproject_declares_every_key_with_the_code_defaults():
    declared = declared_config()
    assert declared == RunConfig().to_run_config()
    assert RunConfig.from_run_config(declared) == RunConfig()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("blend-rate", 0.0, "(0, 1]"),
        ("blend-rate", 1.5, "(0, 1]"),
        ("n-embd", 250, "multiple of n-head (8)"),
        ("partitioner", "round-robin", "iid, dirichlet, size-skewed"),
        ("num-server-rounds", 0, ">= 1"),
        ("local-steps", -3, ">= 1"),
        ("warmup-steps", -1, ">= 0"),
        ("server-learning-rate", 5.0, "[0, 2]"),
        ("vocab-size", 100, "[260, 65536]"),
        ("run-name", "../escape", "letters, digits"),
        ("val-fraction", 0.9, "(0, 0.5)"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(key, value, expected):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config({key: value})
    message = str(info.value)
    assert f"'{key}'" in message
    assert repr(value) in message
    assert expected in message


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="'local-steps' is 'ten'"):
        RunConfig.from_run_config({"local-steps": "ten"})


def test_unknown_key_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError, match="unknown run config key.*blend-ratio"):
        RunConfig.from_run_config({"blend-ratio": 0.1})


def test_integers_are_accepted_for_floats_and_whole_floats_for_integers():
    config = RunConfig.from_run_config({"blend-rate": 1, "local-steps": 4.0})
    assert config.blend_rate == 1.0 and isinstance(config.blend_rate, float)
    assert config.local_steps == 4 and isinstance(config.local_steps, int)
