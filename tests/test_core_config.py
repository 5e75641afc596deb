from dataclasses import dataclass, field
from typing import Any

import pytest
from omegaconf import OmegaConf

from it3d.core import registry
from it3d.core.base import BaseGuidance, BaseModule
from it3d.core.config import (C, ConfigError, component, load_config, parse_structured, schedule, terms,
                              validate_dataclass, validate_experiment)


@dataclass
class Inner:
    guidance_scale: float = 7.5
    model: str = "???"


@dataclass
class Outer:
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    weight: Any = schedule(1.0)


def test_unknown_key_names_dotted_path_and_suggestion():
    with pytest.raises(ConfigError) as e:
        parse_structured(Outer, {"inner": {"guidance_scle": 3.0, "model": "m"}}, "system.guidance.sd")
    assert str(e.value) == "unknown config key 'system.guidance.sd.inner.guidance_scle'; did you mean 'guidance_scale'?"


def test_missing_required_value_names_key():
    with pytest.raises(ConfigError, match=r"missing required value 'system.inner.model'"):
        parse_structured(Outer, {}, "system")


def test_bad_type_names_key():
    with pytest.raises(ConfigError, match=r"bad value for 'system.steps'"):
        parse_structured(Outer, {"steps": "many", "inner": {"model": "m"}}, "system")


def test_bad_schedule_names_key():
    with pytest.raises(ConfigError, match=r"system.weight: not a schedule"):
        parse_structured(Outer, {"weight": [1, 2], "inner": {"model": "m"}}, "system")


@pytest.mark.parametrize("step,expected", [(0, 1.0), (10, 1.0), (15, 1.5), (20, 2.0), (100, 2.0)])
def test_linear_schedule(step, expected):
    assert C([10, 1.0, 2.0, 20], step) == pytest.approx(expected)


@pytest.mark.parametrize("step,expected", [(0, 0.0), (50, 0.5), (100, 1.0), (150, 0.5), (200, 0.0), (300, 0.0)])
def test_piecewise_schedule(step, expected):
    assert C([[0, 0.0], [100, 1.0], [200, 0.0]], step) == pytest.approx(expected)


def test_step_function_schedule():
    # normal shading only for steps 2000..3000 (Customize-It-3D style)
    sched = [[2000, 0.0], [2000, 1.0], [3000, 1.0], [3000, 0.0]]
    assert [C(sched, s) for s in (0, 1999, 2000, 2500, 2999, 3001)] == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]


def test_constant_schedule():
    assert C(3.5, 1234) == 3.5


def test_resolvers():
    cfg = OmegaConf.create({"a": 4, "b": "${mul:${a},2}", "c": "${idiv:${a},3}", "p": "${stem:/x/photo.png}",
                            "d": "${dirname:/x/photo.png}", "s": "${rmspace:a cat}"})
    assert (cfg.b, cfg.c, cfg.p, cfg.d, cfg.s) == (8, 1, "photo", "/x", "a_cat")


def test_merge_order_and_cli_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("name: first\nsystem:\n  x: 1\n  y: 1\n  keep: 5\n")
    b.write_text("name: second\nsystem:\n  y: 2\n")
    cfg = load_config(str(a), str(b), cli_args=["system.x=10", "~system.keep", "+system.new=3"])
    assert cfg.name == "second"
    assert cfg.system.x == 10 and cfg.system.y == 2 and cfg.system.new == 3
    assert "keep" not in cfg.system


def test_extends(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ntag: t\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert cfg.name == "child" and cfg.tag == "t"


def test_delete_unknown_key_fails():
    with pytest.raises(ConfigError, match="cannot delete 'system.nope'"):
        load_config(cli_args=["system.a=1", "~system.nope"])


class _Sub(BaseGuidance):
    @dataclass
    class Config:
        guidance_scale: float = 10.0


class _Parent(BaseModule):
    @dataclass
    class Config:
        geometry_type: str = component("guidance", "cfg-test-sub", "geometry")
        geometry: dict = field(default_factory=dict)
        guidance: dict = terms("guidance")


def test_validation_follows_components_and_terms():
    registry.register("cfg-test-sub", kind="guidance")(_Sub)
    try:
        validate_dataclass(_Parent.Config, {"geometry": {"guidance_scale": 3}}, "system")
        with pytest.raises(ConfigError, match=r"unknown config key 'system.geometry.guidance_scle'"):
            validate_dataclass(_Parent.Config, {"geometry": {"guidance_scle": 3}}, "system")
        with pytest.raises(ConfigError, match=r"unknown config key 'system.guidance.sd.guidance_scle'; did you mean 'guidance_scale'"):
            validate_dataclass(_Parent.Config, {"guidance": {"sd": {"type": "cfg-test-sub", "weight": 1.0,
                                                                    "guidance_scle": 2}}}, "system")
        with pytest.raises(ConfigError, match=r"system.guidance.z: guidance 'cfg-test-su' not found; did you mean 'cfg-test-sub'"):
            validate_dataclass(_Parent.Config, {"guidance": {"z": {"type": "cfg-test-su"}}}, "system")
        with pytest.raises(ConfigError, match=r"system.guidance.sd.weight: not a schedule"):
            validate_dataclass(_Parent.Config, {"guidance": {"sd": {"type": "cfg-test-sub", "weight": [1, 2]}}},
                               "system")
    finally:
        registry.unregister("guidance", "cfg-test-sub")


def test_trainer_keys_are_checked():
    import it3d  # noqa: F401

    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.max_step'; did you mean 'max_steps'"):
        validate_experiment({"data_type": "", "system_type": "", "trainer": {"max_step": 3}})
