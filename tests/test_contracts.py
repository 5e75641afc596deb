"""Contracts on the base classes (README "Components by kind"): every registered guidance, builder and
exporter implements its kind's methods with the base's parameters; the systems call only those. Exporters
get a stage's parts (:class:`ExportParts`), never its system: every registered exporter writes its files
from stand-in parts with no system in sight, and the systems hand over their parts."""
import dataclasses
import inspect
import os
import typing
from types import SimpleNamespace

import pytest
import torch

import it3d  # noqa: F401  (registers every component)
from it3d.core import registry
from it3d.core.base import BaseBuilder, BaseExporter, BaseGuidance, ExportParts, TrainedStage

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


def test_systems_are_trained_stages_for_builders():
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


# ----------------------------------------------------------------------------- exporters take parts, not a system
EXPORTERS = registry.names("exporter")
# small settings for whichever of them an exporter has (the stand-ins below are analytic and tiny)
SMALL = {"texture_size": 64, "render_size": 32, "elevations": [0.0], "azimuths": [0.0, 180.0], "fidelity_size": 24,
         "fidelity_elevations": [15.0], "fidelity_azimuths": [0.0, 180.0], "fidelity_ssaa": 1}


def test_export_takes_the_stages_parts():
    base = inspect.signature(BaseExporter.export)
    assert list(base.parameters)[1:] == ["parts", "stem"]
    for name in EXPORTERS:
        impl = registry.get("exporter", name).export
        first = [p for p in inspect.signature(impl).parameters.values()][1]
        assert typing.get_type_hints(impl).get(first.name) is ExportParts, (name, first)


class _Shape(torch.nn.Module):
    """Both kinds of geometry at once: an implicit field (``isosurface``, ``forward -> features``) and a point
    cloud (``positions``, ``colors()``), a sphere whose colour is ``p + 0.5``."""

    def __init__(self):
        import trimesh

        super().__init__()
        m = trimesh.creation.icosphere(2, radius=0.3)
        self.register_buffer("positions", torch.tensor(m.vertices, dtype=torch.float32))
        self.register_buffer("faces", torch.tensor(m.faces, dtype=torch.long))
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def isosurface(self, **kwargs):
        return self.positions, self.faces

    def forward(self, points, output_normal=False):
        return {"features": (points + 0.5).clamp(0, 1)}

    def colors(self):
        return (self.positions + 0.5).clamp(0, 1)


def _parts(shape: _Shape) -> ExportParts:
    from it3d.data.random_views import camera_batch
    from it3d.renderers.mesh_rasterizer import interpolate, rasterize_mesh

    def render_view(c2w, fovy_deg, height, width, **options):
        r = rasterize_mesh(shape.positions, shape.faces, c2w.float().cpu(), fovy_deg, height, width)
        col = interpolate(shape.colors(), shape.faces, r["face_id"], r["bary"])
        rgb = torch.where(r["mask"][..., None], col, torch.ones_like(col))
        depth = torch.where(r["mask"], r["depth"], torch.zeros_like(r["depth"]))
        return {"comp_rgb": rgb[None], "opacity": r["mask"].float()[None, ..., None], "depth": depth[None, ..., None]}

    one = torch.ones(1)
    reference = camera_batch(one * 0.0, one * 0.0, one * 1.0, one * 60.0, 32, 32)
    return ExportParts(geometry=shape, render_view=render_view, device=torch.device("cpu"),
                       material=lambda feats, shading=None: feats, reference=reference, surface=shape)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", EXPORTERS)
def test_every_registered_exporter_writes_from_parts_alone(tmp_path, name):
    cls = registry.get("exporter", name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    exporter = cls({k: v for k, v in SMALL.items() if k in fields}, path="system.exporter")
    paths = exporter.export(_parts(_Shape()), str(tmp_path / "export" / "out"))
    assert paths, name
    for kind, path in paths.items():
        assert os.path.isfile(path) and os.path.getsize(path) > 0, (name, kind, path)


def test_systems_hand_their_parts_to_the_exporters():
    """The systems' ``export_parts`` (what their ``export`` gives each exporter) on stand-in systems: the parts,
    ``render_view`` and the reference; the refine system loads its coarse stage only for the mesh slot."""
    ref = {"azimuth": torch.zeros(1)}
    coarse = SimpleNamespace(geometry=object(), material=object(), background=object(), renderer=object(),
                             device=torch.device("cpu"), render_view=lambda *a, **k: {},
                             _datamodule=lambda: SimpleNamespace(reference=ref))
    parts = registry.get("system", "coarse").export_parts(coarse)
    assert isinstance(parts, ExportParts) and parts.reference is ref and parts.surface is None
    assert [getattr(parts, k) for k in ("geometry", "material", "background", "renderer", "render_view", "device")] \
        == [getattr(coarse, k) for k in ("geometry", "material", "background", "renderer", "render_view", "device")]
    coarse._datamodule = lambda: None
    assert registry.get("system", "coarse").export_parts(coarse).reference is None

    class Refine(SimpleNamespace):
        loads = 0

        @property
        def coarse(self):
            Refine.loads += 1
            return SimpleNamespace(geometry="the coarse field")

    refine = Refine(geometry=object(), renderer=object(), device=torch.device("cpu"), render_view=lambda *a, **k: {},
                    reference=lambda: ref)
    export_parts = registry.get("system", "refine").export_parts
    parts = export_parts(refine)
    assert parts.geometry is refine.geometry and parts.renderer is refine.renderer and parts.reference is ref
    assert parts.surface is None and parts.material is None and Refine.loads == 0
    assert export_parts(refine, with_surface=True).surface == "the coarse field" and Refine.loads == 1
