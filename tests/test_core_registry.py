import pytest

from it3d.core import registry
from it3d.core.base import BaseGeometry, BaseGuidance
from it3d.core.registry import RegistryError, register


def test_unknown_name_lists_known_and_suggests():
    @register("zero123-test-only", kind="guidance")
    class G(BaseGuidance):
        pass

    try:
        with pytest.raises(RegistryError) as e:
            registry.get("guidance", "zero-123-test-only")
        msg = str(e.value)
        assert msg.startswith("guidance 'zero-123-test-only' not found; did you mean 'zero123-test-only'?")
        assert "known:" in msg and "zero123-test-only" in msg.split("known:")[1]
    finally:
        registry.unregister("guidance", "zero123-test-only")


def test_wrong_kind_fails_at_registration():
    with pytest.raises(RegistryError, match="not a subclass of BaseGuidance"):
        @register("geo-as-guidance", kind="guidance")
        class NotGuidance(BaseGeometry):
            pass

    assert "geo-as-guidance" not in registry.names("guidance")


def test_duplicate_name_fails():
    @register("dup-test", kind="geometry")
    class A(BaseGeometry):
        pass

    try:
        with pytest.raises(RegistryError, match="duplicate geometry 'dup-test'"):
            @register("dup-test", kind="geometry")
            class B(BaseGeometry):
                pass
    finally:
        registry.unregister("geometry", "dup-test")


def test_unknown_kind():
    with pytest.raises(RegistryError, match="unknown component kind 'guidence'.*did you mean 'guidance'"):
        register("x", kind="guidence")


def test_every_kind_has_a_base_and_the_package_registers_components():
    import it3d  # noqa: F401  (imports every component module)

    for kind in registry.KINDS:
        assert registry.base_of(kind) is not None
