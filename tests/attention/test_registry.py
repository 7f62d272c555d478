"""The attention method registry: one entry per method, listed the same way everywhere."""

import pytest

from alaya_jax.attention import registry
from alaya_jax.attention.config import METHODS, AttentionConfig, CalibrationConfig
from alaya_jax.cli import build_parser


def test_cli_and_config_list_the_registry():
    names = registry.names()
    assert names == ("full", "dipr", "topk", "topp", "quest", "infllm", "streaming")
    assert METHODS == names + ("auto",)
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["eval"]._actions
                  if a.dest == "attention")
    assert tuple(action.choices) == METHODS
    assert "dipr_calibrated" in registry.names(user_facing_only=False)


def test_config_picks_its_entry():
    assert AttentionConfig(method="dipr").registry_name == "dipr"
    calibrated = AttentionConfig(method="dipr", calibration=CalibrationConfig(dipr_keys=0.03))
    assert calibrated.registry_name == "dipr_calibrated"
    assert registry.get("dipr_calibrated").needs_calibration
    with pytest.raises(ValueError, match="resolve 'auto'"):
        AttentionConfig(method="auto").registry_name


def test_registry_errors():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.get("topk"))
    with pytest.raises(ValueError, match="unknown attention method 'nope'"):
        registry.get("nope")
