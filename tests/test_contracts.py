"""Contracts on the base classes (README "Components by kind"): every registered guidance, builder and
exporter implements its kind's methods with the base's parameters; the systems call only those."""
import inspect

import pytest

import it3d  # noqa: F401  (registers every component)
from it3d.core import registry
from it3d.core.base import BaseBuilder, BaseExporter, BaseGuidance, TrainedStage

CONTRACTS = {"guidance": (BaseGuidance, ("forward",)), "builder": (BaseBuilder, ("build",)),
             "exporter": (BaseExporter, ("export",))}


def _positional(fn):
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]


@pytest.mark.parametrize("kind", sorted(CONTRACTS))
def test_every_registered_component_implements_its_contract(kind):
    base, methods = CONTRACTS[kind]
    names = registry.names(kind)
    assert names, kind
    for name in names:
        cls = registry.get(kind, name)
        assert issubclass(cls, base), (kind, name)
        for m in methods:
            impl = getattr(cls, m)
            assert impl is not getattr(base, m), f"{kind} '{name}' does not implement {m}"
            # the base's positional parameters, in order (extra ones must have defaults)
            want = len(_positional(getattr(base, m)))
            got = inspect.signature(impl).parameters
            pos = [p for p in got.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
            assert len(pos) >= want, (kind, name, m, [p.name for p in pos])
            assert all(p.default is not p.empty for p in pos[want:]), (kind, name, m)


def test_base_guidance_methods_are_no_ops_and_forward_is_required():
    class Quiet(BaseGuidance):
        pass

    g = Quiet()
    assert g.set_prompt("a photo") is None and g.set_reference({"rgb": None}) is None
    with pytest.raises(NotImplementedError, match="Quiet must implement forward"):
        g(None, {})


def test_systems_are_trained_stages_for_builders_and_exporters():
    for name in ("coarse", "refine"):
        cls = registry.get("system", name)
        assert callable(getattr(cls, "render_view", None)), name
        params = list(inspect.signature(cls.render_view).parameters)[1:5]
        assert params == ["c2w", "fovy_deg", "height", "width"], (name, params)

    class Stub:
        geometry = object()
        device = None

        def render_view(self, c2w, fovy_deg, height, width, **kw):
            return {}

    assert isinstance(Stub(), TrainedStage)
    assert not isinstance(object(), TrainedStage)
