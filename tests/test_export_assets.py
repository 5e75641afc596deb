"""Exported assets: glTF conventions read back with a glTF reader (pygltflib), texture orientation,
decimation / watertight options, and the fidelity check (fidelity.json + preview.png).

The stand-in stage is analytic: its surface is a body ellipsoid with a nose on the front (world +x,
towards the reference camera at azimuth 0) and an arm on the viewer's right (world +y); its albedo
is linear in position, ``rgb = p + 0.5``, so a texture baked at texel centres and a render that
interpolates vertex colours agree up to texture resolution."""
import json
import os
import struct

import numpy as np
import pytest
import torch

from it3d.core.base import ExportParts
from it3d.core.registry import get
from it3d.data.random_views import camera_batch
from it3d.renderers.mesh_rasterizer import interpolate, rasterize_mesh

pytestmark = pytest.mark.usefixtures("one_thread")
NOSE, ARM = np.array([0.1, 0.0, 0.2]), np.array([0.0, 0.2, -0.15])


def shape():
    import trimesh

    body = trimesh.creation.icosphere(3)
    body.vertices *= [0.1, 0.2, 0.3]
    nose = trimesh.creation.icosphere(2, radius=0.06)
    nose.vertices += NOSE
    arm = trimesh.creation.icosphere(2, radius=0.07)
    arm.vertices += ARM
    m = trimesh.util.concatenate([body, nose, arm])
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.long)


def albedo(p):
    return (p + 0.5).clamp(0, 1)


class Stage(torch.nn.Module):
    """A coarse stage for the mesh exporter: geometry, material, reference view, render_view (:meth:`parts`)."""

    def __init__(self, ref_azimuth=0.0, size=48):
        super().__init__()
        self.v, self.f = shape()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for the geometry
        one = torch.ones(1)
        self.ref = camera_batch(one * 0.0, one * ref_azimuth, one * 1.0, one * 60.0, size, size)
        self.geometry = _Geo(self)
        self.material = lambda feats, shading=None: feats
        self.renders = 0

    @property
    def device(self):
        return self.anchor.device

    def parts(self) -> ExportParts:
        return ExportParts(geometry=self.geometry, material=self.material, render_view=self.render_view,
                           device=self.device, reference=self.ref)

    def render_view(self, c2w, fovy, h, w, bg_color=None, **kw):
        self.renders += 1
        r = rasterize_mesh(self.v, self.f, c2w.float().cpu(), fovy, 2 * h, 2 * w)
        col = interpolate(albedo(self.v), self.f, r["face_id"], r["bary"])
        rgb = torch.where(r["mask"][..., None], col, torch.ones_like(col))
        pool = lambda x: torch.nn.functional.avg_pool2d(x.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0)  # noqa: E731
        return {"comp_rgb": pool(rgb)[None], "opacity": pool(r["mask"].float()[..., None])[None]}


class _Geo(torch.nn.Module):
    def __init__(self, stage):
        super().__init__()
        self.__dict__["stage"] = stage

    def isosurface(self, **kw):
        return self.stage.v, self.stage.f

    def parameters(self, recurse=True):
        return iter([self.stage.anchor])

    def forward(self, points, output_normal=False):
        return {"features": albedo(points)}


def export(tmp_path, ref_azimuth=0.0, **cfg):
    stage = Stage(ref_azimuth)
    exporter = get("exporter", "mesh")({"texture_size": 256, "fidelity_size": 48, "render_size": 96, **cfg}, path="system.exporter")
    paths = exporter.export(stage.parts(), str(tmp_path / "export" / "mesh"))
    return stage, paths


def read_glb(path):
    """(gltf, positions, faces, normals, texcoords, PNG image) straight from the GLB's accessors."""
    import io

    from PIL import Image
    from pygltflib import GLTF2

    g = GLTF2().load(path)
    blob = g.binary_blob()

    def accessor(i, width):
        a = g.accessors[i]
        bv = g.bufferViews[a.bufferView]
        fmt = {5126: "f", 5125: "I", 5123: "H"}[a.componentType]
        n = a.count * width
        start = (bv.byteOffset or 0) + (a.byteOffset or 0)
        return np.array(struct.unpack_from(f"<{n}{fmt}", blob, start)).reshape(a.count, width)

    prim = g.meshes[0].primitives[0]
    pos = accessor(prim.attributes.POSITION, 3)
    nrm = accessor(prim.attributes.NORMAL, 3)
    uv = accessor(prim.attributes.TEXCOORD_0, 2)
    faces = accessor(prim.indices, 1).reshape(-1, 3)
    tex = g.textures[g.materials[prim.material].pbrMetallicRoughness.baseColorTexture.index]
    img = g.images[tex.source]
    bv = g.bufferViews[img.bufferView]  # embedded: a buffer view, not a URI
    png = Image.open(io.BytesIO(blob[bv.byteOffset or 0:(bv.byteOffset or 0) + bv.byteLength])).convert("RGB")
    return g, pos, faces, nrm, uv, img, np.asarray(png, dtype=np.float64) / 255.0


@pytest.mark.parametrize("ref_azimuth", [0.0, 90.0])
def test_glb_follows_gltf_conventions(tmp_path, ref_azimuth):
    stage, paths = export(tmp_path, ref_azimuth)
    g, pos, faces, nrm, uv, img, png = read_glb(paths["glb"])
    # metres, +Y up, origin at the centre of the base: world z (0.6 tall) -> Y in [0, 1]
    assert pos[:, 1].min() == pytest.approx(0.0, abs=1e-6) and pos[:, 1].max() == pytest.approx(1.0, abs=1e-5)
    centre = (pos.min(0) + pos.max(0)) / 2
    assert abs(centre[0]) < 1e-5 and abs(centre[2]) < 1e-5
    s = 1.0 / 0.6
    lo, hi = stage.v.min(0).values.numpy(), stage.v.max(0).values.numpy()
    mid = (lo + hi) / 2  # world bbox centre: the asset's X and Z are centred on it
    front = pos[pos[:, 2].argmax()]  # the part nearest the reference viewer
    right = pos[pos[:, 0].argmax()]  # the viewer's right
    if ref_azimuth == 0.0:  # nose (world +x) in front, arm (world +y) on the right, world z up
        assert front[2] == pytest.approx((hi[0] - mid[0]) * s, abs=1e-4) and front[1] == pytest.approx(0.5 * s, abs=0.02)
        assert right[0] == pytest.approx((hi[1] - mid[1]) * s, abs=1e-4) and right[1] == pytest.approx(0.15 * s, abs=0.02)
    else:  # reference camera at world +y: the arm faces the viewer, the nose is on the viewer's left
        assert front[2] == pytest.approx((hi[1] - mid[1]) * s, abs=1e-4) and front[1] == pytest.approx(0.15 * s, abs=0.02)
        left = pos[pos[:, 0].argmin()]
        assert left[0] == pytest.approx(-(hi[0] - mid[0]) * s, abs=1e-4) and left[1] == pytest.approx(0.5 * s, abs=0.02)
    # faces wind counter-clockwise seen from outside (positive volume); NORMAL agrees with them
    tri = pos[faces]
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert (tri[:, 0] * cross).sum() / 6 > 0
    vn = np.zeros_like(pos)
    np.add.at(vn, faces.reshape(-1), np.repeat(cross, 3, 0))
    vn /= np.linalg.norm(vn, axis=1, keepdims=True)
    assert np.allclose(np.linalg.norm(nrm, axis=1), 1, atol=1e-4) and ((vn * nrm).sum(1) > 0.8).mean() > 0.97
    # PBR material, texture embedded, UVs in [0, 1]
    mat = g.materials[0].pbrMetallicRoughness
    assert mat.metallicFactor == 0.0 and (mat.roughnessFactor is None or mat.roughnessFactor == 1.0)
    assert img.mimeType == "image/png" and img.uri is None and png.shape == (256, 256, 3)
    assert uv.min() >= 0.0 and uv.max() <= 1.0
    # the texel a viewer samples at each vertex's TEXCOORD_0 (glTF: origin top-left) has that vertex's albedo
    rec = json.load(open(os.path.join(os.path.dirname(paths["glb"]), "fidelity.json")))
    m = np.array(rec["frame"]["world_to_asset"])
    world = (np.linalg.inv(m) @ np.c_[pos, np.ones(len(pos))].T).T[:, :3]
    px = np.clip((uv * 256).astype(int), 0, 255)
    sampled = png[px[:, 1], px[:, 0]]
    assert np.abs(sampled - np.clip(world + 0.5, 0, 1)).mean() < 0.01


def test_obj_and_mtl_share_the_frame_and_material(tmp_path):
    import trimesh

    _, paths = export(tmp_path)
    obj = trimesh.load(paths["obj"], force="mesh", process=False)
    glb = trimesh.load(paths["glb"], force="mesh", process=False)
    assert np.allclose(obj.bounds, glb.bounds, atol=1e-5)
    mtl = open(paths["mtl"]).read()
    assert "map_Kd mesh_texture.png" in mtl and "Pm 0.000" in mtl and "Pr 1.000" in mtl


@pytest.mark.parametrize("bake_source", ["field", "renders"])
def test_fidelity_json_and_preview(tmp_path, bake_source):
    from PIL import Image

    from it3d.exporters import fidelity

    stage, paths = export(tmp_path, bake_source=bake_source)
    rec = json.load(open(paths["fidelity"]))
    assert [v["view"] for v in rec["views"]] == ["reference"] + [f"el15_az{a}" for a in range(0, 360, 45)]
    assert rec["reference"]["mask_iou"] >= 0.98 and rec["reference"]["psnr"] >= 35.0, rec["reference"]
    assert min(v["mask_iou"] for v in rec["views"]) >= 0.95 and rec["meets_targets"]
    assert rec["faces"] == rec["faces_extracted"] == len(stage.f) and rec["bake_source"] == bake_source
    assert stage.renders == 9 + (25 if bake_source == "renders" else 0)  # fidelity views (+ bake views)
    # the preview: reference column (2 rows) + 2 rows of 4 (exported | stage) pairs, 48-pixel views
    w = Image.open(paths["preview"]).size
    gap = 3
    assert w == (48 + 2 * gap + 4 * (2 * 48 + gap), 2 * 48)
    # the check reads the written file: a GLB turned by 90 degrees about Y is caught
    import trimesh

    m = trimesh.load(paths["glb"], force="mesh", process=False)
    m.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, [0, 1, 0]))
    m.export(paths["glb"])
    from it3d.exporters.conventions import AssetFrame

    frame = AssetFrame(np.array(rec["frame"]["world_to_asset"])[:3, :3] / rec["frame"]["scale_m_per_scene_unit"],
                       -np.array(rec["frame"]["world_to_asset"])[:3, 3] / rec["frame"]["scale_m_per_scene_unit"],
                       rec["frame"]["scale_m_per_scene_unit"])
    from it3d.exporters.views import bake_views

    views = bake_views(stage.ref, [], [], 48)
    res = fidelity.measure(paths["glb"], frame, views, get("exporter", "mesh").stage_render(stage.parts()))
    assert res["views"][0]["mask_iou"] < 0.8


def _texel_cover_count(uv, uv_faces, size):
    """How many faces cover each texel centre (strictly inside, so faces sharing an edge count once)."""
    xy = uv.double().numpy() * size
    count = np.zeros((size, size), np.int64)
    for t in xy[uv_faces.numpy()]:
        lo, hi = np.floor(t.min(0)).astype(int), np.ceil(t.max(0)).astype(int)
        xs, ys = np.meshgrid(np.arange(lo[0], hi[0]) + 0.5, np.arange(lo[1], hi[1]) + 0.5, indexing="ij")
        d = [(t[j, 0] - t[i, 0]) * (ys - t[i, 1]) - (t[j, 1] - t[i, 1]) * (xs - t[i, 0]) for i, j in ((0, 1), (1, 2), (2, 0))]
        inside = ((d[0] > 1e-9) & (d[1] > 1e-9) & (d[2] > 1e-9)) | ((d[0] < -1e-9) & (d[1] < -1e-9) & (d[2] < -1e-9))
        np.add.at(count, (xs[inside].astype(int), ys[inside].astype(int)), 1)
    return count


def test_uv_unwrap_caps_charts_without_overlap():
    """The unwrap caps every chart at the area of ``max_chart_faces`` average faces (xatlas's
    default grows charts without limit: 10x slower at 50k faces, see bench_export.py), and the atlas
    stays valid: every face a non-degenerate UV triangle in [0, 1], no texel covered twice, and
    the utilisation measured on this shape (0.59 with the cap at 100 faces, 0.69 uncapped)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    from it3d.exporters.texture import UnwrapOptions, uv_unwrap

    v, f = shape()
    p = v[f].double()
    area = (torch.linalg.norm(torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1), dim=-1) / 2).numpy()
    for cap in (0, 100):
        info = {}
        uv, uv_faces, vmap = uv_unwrap(v, f, UnwrapOptions(max_chart_faces=cap), info)
        assert uv_faces.shape == f.shape and bool((v[vmap][uv_faces] == v[f]).all())  # same faces, same order
        assert float(uv.min()) >= 0.0 and float(uv.max()) <= 1.0
        t = uv[uv_faces].double()
        e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
        uv_area = (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).abs() / 2
        assert float(uv_area.min()) > 1e-5 * float(uv_area.mean())  # no face collapsed in the atlas
        assert _texel_cover_count(uv, uv_faces, 512).max() == 1  # charts do not overlap
        n = len(uv)
        edges = torch.cat([uv_faces[:, [0, 1]], uv_faces[:, [1, 2]]]).numpy()
        _, chart = connected_components(sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)))
        chart_area = np.bincount(chart[uv_faces[:, 0].numpy()], weights=area)
        assert info["charts"] == len(np.unique(chart[uv_faces[:, 0].numpy()]))
        if cap:
            assert chart_area.max() <= area.sum() * cap / len(f) + area.max()  # uncapped: 25% of the surface
            assert info["utilization"] >= 0.5, info
        else:
            assert chart_area.max() > 0.2 * area.sum() and info["utilization"] >= 0.6, info


def test_decimation_and_watertight(tmp_path):
    import trimesh

    stage, paths = export(tmp_path, target_faces=800, watertight=True)
    rec = json.load(open(paths["fidelity"]))
    assert rec["faces_extracted"] == len(stage.f) and rec["faces"] <= 800
    assert rec["watertight"] is True
    obj = trimesh.load(paths["obj"], force="mesh", process=True)
    assert len(obj.faces) == rec["faces"]
    assert rec["reference"]["mask_iou"] >= 0.95 and rec["reference"]["psnr"] >= 30.0, rec["reference"]


def test_bad_export_options_fail_clearly(tmp_path):
    from it3d.core.errors import It3dError

    with pytest.raises(It3dError, match="export.origin"):
        get("exporter", "mesh")({"origin": "top"}, path="system.exporter")
    with pytest.raises(It3dError, match="export.scale"):
        export(tmp_path, scale="huge")


def test_run_report_shows_export_fidelity(tmp_path):
    from it3d.eval import report

    _, paths = export(tmp_path)
    rec = json.load(open(paths["fidelity"]))
    files = sorted(os.path.join(tmp_path, "export", f) for f in os.listdir(tmp_path / "export"))
    html = open(report.write_run_report(str(tmp_path), {"name": "x", "status": "ok"},
                                        {"exports": {"coarse": files}})).read()
    assert "<h2>Export fidelity</h2>" in html and 'src="export/preview.png"' in html
    assert f"<td class=\"l\">reference</td><td>{report.fmt(rec['reference']['psnr'])}</td>" in html
    assert html.count("<td class=\"l\">el15_az") == 8
