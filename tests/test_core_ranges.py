"""Values checked at parse time: every numeric config field of every component has a natural range
(or is declared unbounded), schedules are well formed, Lightning's trainer arguments are typed."""
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

import pytest

import it3d  # noqa: F401  (registers every component)
from it3d.core import registry
from it3d.core.config import ConfigError, ExperimentConfig, check, parse_structured, schedule, validate_experiment
from it3d.core.lightning_args import check_section
from it3d.core.ranges import Range, check_value, range_of, rule_for
from it3d.preprocess.config import PreprocessConfig

# numeric fields with no natural range, reviewed one by one
UNBOUNDED = {
    "bg_feature_init",  # a raw feature value of the learned background
    "isosurface_threshold",  # 'auto' or a density level of the field
}


def _numeric(tp) -> bool:
    """int / float / a list of them / Any (schedules) / Optional of those."""
    if tp in (int, float, Any):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return any(_numeric(a) for a in args if a is not type(None))
    if origin in (list, List):
        return bool(args) and args[0] in (int, float)
    return False


def _config_classes():
    seen = {}
    todo = [("root", ExperimentConfig), ("data.preprocess", PreprocessConfig)]
    for kind in registry.KINDS:
        for name in registry.names(kind):
            comp = registry.get(kind, name)
            if not getattr(comp, "__module__", "").startswith("it3d."):
                continue  # a test's own component (several tests register theirs for the session)
            cls = getattr(comp, "Config", None)
            if cls is not None and dataclasses.is_dataclass(cls):
                todo.append((f"{kind}:{name}", cls))
    while todo:
        where, cls = todo.pop()
        if cls in seen.values():
            continue
        seen[where] = cls
        for f, tp in typing.get_type_hints(cls).items():
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                todo.append((f"{where}.{f}", tp))
    return seen


def test_every_numeric_field_has_a_range():
    missing = []
    for where, cls in _config_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("opaque") or not _numeric(hints[f.name]) or f.metadata.get("kind"):
                continue
            if range_of(f) is None and f.name not in UNBOUNDED:
                missing.append(f"{where}.{f.name}")
    assert not missing, f"numeric fields without a natural range (add a rule, check(...) or unbounded(...)): {missing}"


@pytest.mark.parametrize("name,value,ok", [
    ("max_steps", 0, True), ("max_steps", -1, False), ("azimuth_warmup_steps", 2.5, False),
    ("ref_prob", 1.0, True), ("ref_prob", 1.01, False), ("random_prob", -0.1, False),
    ("border_ratio", 0.0, True), ("border_ratio", 1.0, False),
    ("heights", [64, 128], True), ("heights", [64, 0], False), ("height", 0, True),  # 0: the default size
    ("seed", 2 ** 32 - 1, True), ("seed", -1, False), ("seed", 0.5, False),
    ("fovy_range", [40.0, 80.0], True), ("fovy_range", [80.0, 40.0], False), ("fovy_range", [40.0], False),
    ("elevation_range", [-10.0, 95.0], False), ("azimuth_range", [-180.0, 180.0], True),
    ("camera_distance_range", [0.0, 1.0], False), ("ambient_light_color", [0.1, 0.1, 1.5], False),
    ("guidance_scale", 7.5, True), ("guidance_scale", -1.0, False), ("lr", 0.0, False),
    ("min_step_percent", [0, 0.98, 0.5, 5000], True),  # a schedule: its values are checked, not its steps
    ("min_step_percent", [5000, 0.98, 0.5, 0], False),  # end before start
    ("shading_probs", {"albedo": [[0, 1.0], [20, 0.0]], "normal": 1.5}, False),
    ("num_samples_per_ray", float("nan"), False),
])
def test_natural_ranges(name, value, ok):
    rng = rule_for(name)
    assert rng is not None
    if ok:
        check_value(value, rng, f"x.{name}", schedules=not name.endswith(("s", "range")))
    else:
        with pytest.raises(ConfigError, match=rf"x\.{name}"):
            check_value(value, rng, f"x.{name}", schedules=not name.endswith(("s", "range")))


def test_range_messages():
    assert Range(ge=0, le=1).describe() == "in [0, 1]" and Range(ge=0, lt=1).describe() == "in [0, 1)"
    assert Range(gt=0).describe() == "> 0" and Range(ge=-1).describe() == ">= -1"
    with pytest.raises(ConfigError) as e:
        check_value(-5, rule_for("max_steps"), "stage.coarse.trainer.max_steps")
    assert str(e.value) == "stage.coarse.trainer.max_steps must be a whole number >= 0, got -5"


@dataclass
class _Inner:
    prob: float = 0.5


@dataclass
class _Cfg:
    n_views: int = 4
    ratio: float = check(0.2, ge=0, lt=0.5)
    mode: str = check("a", choices=("a", "b"))
    heights: List[int] = field(default_factory=lambda: [64])
    weight: Any = schedule(1.0)
    inner: _Inner = field(default_factory=_Inner)
    encoding: dict = field(default_factory=lambda: {"n_levels": 4, "base_resolution": 16})
    size: Optional[int] = None


@pytest.mark.parametrize("raw,error", [
    ({}, None),
    ({"n_views": -1}, "sys.n_views must be a whole number >= 0, got -1"),
    ({"ratio": 0.6}, "sys.ratio must be in [0, 0.5), got 0.6"),
    ({"mode": "c"}, "sys.mode must be one of a, b, got 'c'"),
    ({"heights": [64, [2]]}, "sys.heights.1 must be a whole number, got [2]"),
    ({"weight": [10, 1.0, 0.0, 5]}, "sys.weight: schedule [start, v0, v1, end] needs 0 <= start <= end"),
    ({"weight": [[-5, 1.0], [0, 2.0]]}, "sys.weight: schedule steps must be >= 0"),
    ({"inner": {"prob": 2.0}}, "sys.inner.prob must be in [0, 1], got 2.0"),
    ({"encoding": {"n_levels": -2}}, "sys.encoding.n_levels must be a whole number >= 0, got -2"),
    ({"encoding": {"base_resolution": 0}}, "sys.encoding.base_resolution must be > 0, got 0"),
    ({"size": 0}, "sys.size must be > 0, got 0"),
])
def test_parse_structured_checks_ranges(raw, error):
    if error is None:
        parse_structured(_Cfg, raw, "sys")
    else:
        with pytest.raises(ConfigError) as e:
            parse_structured(_Cfg, raw, "sys")
        assert str(e.value).startswith(error)


@pytest.mark.parametrize("section,values,error", [
    ("trainer", {"max_steps": 10, "val_check_interval": 0.5, "precision": "bf16-mixed", "devices": [0]}, None),
    ("trainer", {"max_steps": "abc"}, "trainer.max_steps: expected an int, got 'abc'"),
    ("trainer", {"max_steps": -5}, "trainer.max_steps must be >= 0, got -5"),
    ("trainer", {"max_steps": True}, "trainer.max_steps: expected an int, got True"),
    ("trainer", {"enable_progress_bar": "yes"}, "trainer.enable_progress_bar: expected true/false or null"),
    ("trainer", {"limit_val_batches": 1.5}, "trainer.limit_val_batches: a float is a fraction in [0, 1]"),
    ("trainer", {"callbacks": []}, "trainer.callbacks is set by it3d itself"),
    ("trainer", {"max_step": 3}, "unknown config key 'trainer.max_step'; did you mean 'max_steps'?"),
    ("checkpoint", {"every_n_train_steps": -1}, "checkpoint.every_n_train_steps must be >= 0"),
    ("checkpoint", {"dirpath": "/x"}, "checkpoint.dirpath is set by it3d itself"),
])
def test_lightning_sections(section, values, error):
    if error is None:
        check_section(section, values)
    else:
        with pytest.raises(ConfigError) as e:
            check_section(section, values)
        assert str(e.value).startswith(error), str(e.value)


def test_stage_trainer_keys_checked_before_work():
    with pytest.raises(ConfigError, match=r"^trainer.max_steps: expected an int, got 'abc'$"):
        validate_experiment({"data_type": "", "system_type": "", "trainer": {"max_steps": "abc"}})
    with pytest.raises(ConfigError, match=r"^after_train: unknown mode 'tset'"):
        validate_experiment({"data_type": "", "system_type": "", "after_train": ["tset"]})
