"""Point-cloud builders on the synthetic scene (it3d.testing.scene).

``SceneCoarse`` stands in for a trained coarse stage with *true* geometry: ``render_view`` ray-casts
the analytic scene and answers in the renderer contract (comp_rgb over the background, opacity,
depth = expected t along the normalised ray, i.e. opacity * t), and ``geometry.isosurface`` runs
marching cubes on the scene's signed distance. The real coarse system is exercised in
tests/test_builders_coarse.py.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from it3d.core import registry
from it3d.core.errors import It3dError
from it3d.core import cameras
from it3d.testing import scene as sc

SPEC = sc.SceneSpec()
SIZE = 48
OBJECT_SIZE = 0.62  # largest extent of the scene: z from -0.30 (box bottom) to 0.32 (ellipsoid top)


def scene_sdf(p: torch.Tensor, spec: sc.SceneSpec = SPEC) -> torch.Tensor:
    """Signed distance to the union (ellipsoid: first-order |f| / |grad f|, exact near the surface)."""
    c, r = torch.tensor(spec.ellipsoid_center, dtype=p.dtype), torch.tensor(spec.ellipsoid_radii, dtype=p.dtype)
    q = (p - c) / r
    f = (q * q).sum(-1) - 1
    grad = 2 * (p - c) / (r * r)
    d_ell = f / grad.norm(dim=-1).clamp_min(1e-9)
    b = (p - torch.tensor(spec.box_center, dtype=p.dtype)).abs() - torch.tensor(spec.box_half, dtype=p.dtype)
    d_box = b.clamp_min(0).norm(dim=-1) + b.max(-1).values.clamp_max(0)
    return torch.minimum(d_ell, d_box)


class _Geometry:
    def __init__(self):
        self.calls = []

    def isosurface(self, resolution, threshold="auto"):
        from skimage.measure import marching_cubes

        self.calls.append((resolution, threshold))
        lo, hi = -0.4, 0.4
        g = torch.linspace(lo, hi, resolution, dtype=torch.float64)
        grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1)
        sdf = scene_sdf(grid).numpy()
        v, f, _, _ = marching_cubes(sdf, level=0.0, spacing=((hi - lo) / (resolution - 1),) * 3)
        return torch.from_numpy((v + lo).copy()).float(), torch.from_numpy(f.copy()).long()  # as the real one


_RENDERS = {}  # the analytic renders are deterministic: cache them across the builds of this module


def _render(c2w, fovy_deg, height, width, supersample):
    key = (c2w.cpu().numpy().round(6).tobytes(), round(float(fovy_deg), 6), height, width, supersample)
    if key not in _RENDERS:
        _RENDERS[key] = sc.render_view(c2w.cpu(), float(fovy_deg), height, width, SPEC, supersample=supersample)
    return _RENDERS[key]


class SceneCoarse:
    def __init__(self, supersample: int = 2):
        self.geometry = _Geometry()
        self.supersample = supersample
        self.n_renders = 0

    def render_view(self, c2w, fovy_deg, height, width, shading="albedo", bg_color=None, normals=True):
        self.n_renders += 1
        v = _render(c2w, fovy_deg, height, width, self.supersample)
        a = v["mask"]
        bg = torch.ones(3) if bg_color is None else bg_color.cpu().float()
        dirs = cameras.ray_directions(height, width, float(fovy_deg))
        t = v["depth"] * dirs.norm(dim=-1, keepdim=True)  # z -> distance along the normalised ray
        return {"comp_rgb": (v["rgba"][..., :3] * a + (1 - a) * bg)[None], "opacity": a[None], "depth": (t * a)[None]}


def make_reference(size: int = SIZE):
    c2w = sc.reference_camera(SPEC)
    v = sc.render_view(c2w, SPEC.fovy, size, size, SPEC)
    a = v["mask"]
    rgb = v["rgba"][..., :3] * a + (1 - a)
    return {"rgb": rgb[None], "mask": (a > 0.5).float()[None], "c2w": c2w[None], "fovy": torch.tensor([SPEC.fovy]),
            "elevation": torch.tensor([SPEC.elevation]), "azimuth": torch.tensor([SPEC.azimuth]),
            "camera_distances": torch.tensor([SPEC.distance]), "height": size, "width": size}


def build(name, cfg=None, coarse=None, reference=None):
    b = registry.get("builder", name)(cfg or {}, path="system.builder", device="cpu")
    out = b.build(coarse or SceneCoarse(), reference or make_reference())
    return b, out


@pytest.fixture(scope="module")
def unproj():
    return build("depth-unprojection")


def test_registered_and_strict_config():
    assert {"depth-unprojection", "mesh-sampling"} <= set(registry.names("builder"))
    with pytest.raises(Exception, match="system.builder.max_point"):
        registry.get("builder", "depth-unprojection")({"max_point": 3}, path="system.builder")


def test_unprojection_output_and_reference_colours(unproj):
    b, out = unproj
    pos, col, is_ref = out["positions"], out["colors"], out["is_ref"]
    n = pos.shape[0]
    assert pos.dtype == torch.float32 and pos.shape == (n, 3) and col.shape == (n, 3) and is_ref.shape == (n,)
    assert is_ref.dtype == torch.bool and float(col.min()) >= 0 and float(col.max()) <= 1
    assert len(b.stats["n_novel_per_view"]) == 33  # 3 elevations x 11 azimuths by default
    ref = make_reference()
    mask = ref["mask"][0, ..., 0] > 0.5
    # every reference pixel inside the mask gives exactly one point, coloured exactly by that pixel
    i, j = _pixels(pos[is_ref], ref)
    assert int(is_ref.sum()) == int(mask.sum())
    hits = torch.zeros(SIZE, SIZE, dtype=torch.long).index_put_((i, j), torch.ones_like(i), accumulate=True)
    assert torch.equal(hits > 0, mask) and int(hits.max()) == 1
    assert torch.equal(col[is_ref], ref["rgb"][0][i, j])
    # the reference points come first and the novel ones add the unseen rest (well over half of the cloud)
    assert bool(is_ref[: int(is_ref.sum())].all())
    assert 1.5 * int(is_ref.sum()) < n


def _pixels(points, ref):
    uv, _ = cameras.project(points, ref["c2w"][0], float(ref["fovy"][0]), SIZE, SIZE)
    return torch.floor(uv[:, 1]).long(), torch.floor(uv[:, 0]).long()


def test_unprojection_points_on_true_surface(unproj):
    _, out = unproj
    d = scene_sdf(out["positions"].double()).abs()
    assert float(d.mean()) < 0.01 * OBJECT_SIZE, float(d.mean())
    assert float(torch.quantile(d, 0.99)) < 0.03 * OBJECT_SIZE
    # the cloud covers the object all round: every direction from the ellipsoid centre has a point near
    dirs = torch.nn.functional.normalize(torch.randn(500, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    c = torch.tensor(SPEC.ellipsoid_center)
    surf = c + dirs * (1.0 / ((dirs / torch.tensor(SPEC.ellipsoid_radii)) ** 2).sum(-1).sqrt())[:, None]
    above_box = surf[:, 2] > -0.16
    nn = torch.cdist(surf[above_box], out["positions"]).min(1).values
    assert float(nn.max()) < 0.04, float(nn.max())


def hits_per_view_ok(b, out, coarse, reference, every=4):
    """Per build view v (processing order, every ``every``-th): every point added by v lies on v's
    visible layer, on a distinct pixel of v, and on a pixel that no earlier point on v's visible layer
    occupies. Returns how many views were checked."""
    from it3d.builders.base import on_visible_layer

    pos, vid = out["positions"], out["view"]
    cams = b.novel_cameras(b.reference_camera(reference))
    checked = 0
    for v in range(0, len(cams), every):
        new = vid == v
        if int(new.sum()) == 0:
            continue
        cam = cams[v]
        view = b.render(coarse, cam)
        vis_old, io, jo = on_visible_layer(pos[vid < v], cam, view.depth, view.mask, b.cfg.depth_tol, b.cfg.max_slope)
        vis_new, i_n, j_n = on_visible_layer(pos[new], cam, view.depth, view.mask, b.cfg.depth_tol, b.cfg.max_slope)
        assert bool(vis_new.all())  # new points lie on the view's own visible layer
        flat_new = i_n * cam.width + j_n
        assert flat_new.unique().numel() == flat_new.numel()  # one point per pixel
        occupied = set((io[vis_old] * cam.width + jo[vis_old]).tolist())
        assert not occupied & set(flat_new.tolist())  # never on a pixel already covered
        checked += 1
    return checked


def test_unprojection_adds_each_pixel_once_per_view(unproj):
    b, out = unproj
    assert hits_per_view_ok(b, out, SceneCoarse(), make_reference()) >= 5
    # the final cloud seen from the reference view: each foreground pixel off steep slopes (slant < 45 deg)
    # is hit by at most one point of its visible layer
    from it3d.builders.base import depth_slope, on_visible_layer

    ref = make_reference()
    cam = b.reference_camera(ref)
    view = b.render(SceneCoarse(), cam)
    vis, i, j = on_visible_layer(out["positions"], cam, view.depth, view.mask, b.cfg.depth_tol, b.cfg.max_slope)
    hits = torch.zeros(SIZE, SIZE, dtype=torch.long).index_put_((i[vis], j[vis]), torch.ones_like(i[vis]), accumulate=True)
    flat = view.mask & (depth_slope(view.depth, view.mask, cam.focal) < 1.0)
    assert int(flat.sum()) > 0.5 * int(view.mask.sum()) and int(hits[flat].max()) == 1
    # no point is duplicated anywhere in the cloud
    from scipy.spatial import cKDTree

    assert len(cKDTree(out["positions"].numpy()).query_pairs(1e-6)) == 0


def test_unprojection_cap_keeps_reference_points():
    few = {"elevations": [0.0, 30.0], "azimuths": [60.0, 120.0, 180.0]}
    _, full = build("depth-unprojection", few)
    n_ref = int(full["is_ref"].sum())
    cap = n_ref + 500
    b, out = build("depth-unprojection", {**few, "max_points": cap})
    assert out["positions"].shape[0] == cap and int(out["is_ref"].sum()) == n_ref
    assert b.stats["n_before_cap"] == full["positions"].shape[0]
    # the kept novel points are a subset of the uncapped cloud's novel points
    full_novel = {tuple(p) for p in full["positions"][~full["is_ref"]].numpy().round(6).tolist()}
    kept = out["positions"][~out["is_ref"]].numpy().round(6).tolist()
    assert all(tuple(p) in full_novel for p in kept)
    with pytest.raises(It3dError, match="max_points"):
        build("depth-unprojection", {**few, "max_points": n_ref - 1})


def test_unprojection_edge_and_footprint_settings():
    """No edge removal lets flying points in at depth edges; a dilated footprint adds fewer points."""
    few = {"elevations": [0.0, 30.0], "azimuths": [60.0, 120.0, 180.0]}
    _, loose = build("depth-unprojection", {**few, "edge_slope": 1e9})
    _, strict = build("depth-unprojection", {**few, "edge_slope": 2.0})
    _, dil = build("depth-unprojection", {**few, "edge_slope": 2.0, "footprint_radius": 1.5})
    far = [int((scene_sdf(o["positions"].double()).abs() > 0.01).sum()) for o in (loose, strict)]
    assert far[1] < far[0] and far[1] == 0, far
    assert dil["positions"].shape[0] < strict["positions"].shape[0]


def test_mesh_sampling_colours():
    ref = make_reference()
    b, out = build("mesh-sampling", {"num_points": 20000, "isosurface_resolution": 64,
                                     "elevations": [0.0, 45.0, -40.0], "azimuths": [60.0 * k for k in range(1, 6)]})
    pos, col, is_ref, vid = out["positions"], out["colors"], out["is_ref"], out["view"]
    assert pos.shape == (20000, 3) and col.shape == (20000, 3)
    assert float(col.min()) >= 0 and float(col.max()) <= 1
    # Poisson-disk: no two samples closer than the radius (no top-up happened at this size)
    from scipy.spatial import cKDTree

    assert len(cKDTree(pos.numpy()).query_pairs(0.999 * b.stats["poisson_radius"])) == 0
    assert float(scene_sdf(pos.double()).abs().mean()) < 0.01 * OBJECT_SIZE
    # reference-visible points take exactly their reference pixel's colour
    i, j = _pixels(pos[is_ref], ref)
    assert torch.equal(col[is_ref], ref["rgb"][0][i, j])
    # and they are the points truly visible from the reference camera (ray-cast from the camera centre)
    # (at 48 px a pixel spans ~0.02; sub-pixel ambiguities at grazing rims are allowed for 0.5% of them)
    gap = _occlusion_gap(pos, ref["c2w"][0])
    facing = (_normals(pos) * torch.nn.functional.normalize(ref["c2w"][0, :3, 3] - pos, dim=-1)).sum(-1)
    assert not bool((is_ref & (gap > 0.05) & (facing < -0.3)).any())  # never the far side
    assert float((is_ref & (gap > 0.05)).sum()) < 0.005 * float(is_ref.sum())
    uv, _ = cameras.project(pos, ref["c2w"][0], SPEC.fovy, SIZE, SIZE)
    ii, jj = torch.floor(uv[:, 1]).long().clamp(0, SIZE - 1), torch.floor(uv[:, 0]).long().clamp(0, SIZE - 1)
    seen = (gap < 0.003) & (ref["mask"][0, ..., 0][ii, jj] > 0.5) & (facing > 0.5)  # visible, not grazing
    assert float((is_ref & seen).sum()) > 0.95 * float(seen.sum()), (int((is_ref & seen).sum()), int(seen.sum()))
    # every point is coloured: by the reference, a view, or its nearest coloured neighbour
    assert int((vid == -1).sum()) + int((vid >= 0).sum()) + int((vid == -2).sum()) == 20000
    assert int((vid == -2).sum()) < 0.05 * 20000
    assert b.stats["n_ref"] == int(is_ref.sum())
    # novel colours agree with the true surface colour at the point (the scene's shaded albedo)
    novel = vid >= 0
    err = (col[novel] - _colour_at(pos[novel])).abs().mean()
    assert float(err) < 0.05, float(err)


def _occlusion_gap(points, c2w):
    """How far in front of each point the ray from the camera centre first hits the scene (0 = visible)."""
    eye = c2w[:3, 3].double().expand(points.shape[0], 3)
    to_p = points.double() - eye
    dist = to_p.norm(dim=-1)
    t = sc.cast(eye, to_p / dist[:, None], SPEC)["t"]
    return (dist - t).clamp_min(0).float()


def _normals(points):
    eps = 1e-3
    grad = torch.stack([(scene_sdf(points + eps * e) - scene_sdf(points - eps * e)) / (2 * eps) for e in torch.eye(3)], -1)
    return torch.nn.functional.normalize(grad, dim=-1)


def _colour_at(points):
    """Scene colour at surface points: cast a short ray back onto the surface along -normal direction."""
    n = _normals(points)
    out = sc.cast((points + 0.02 * n).double(), (-n).double(), SPEC)
    return out["rgb"].float()


def test_mesh_sampling_visibility_modes():
    """Each depth test (mesh raster, sample z-buffer, NeRF depth) finds the truly visible points."""
    ref = make_reference()
    cfg = {"num_points": 8000, "isosurface_resolution": 48, "elevations": [0.0], "azimuths": [90.0, 180.0]}
    for mode in ("mesh", "points", "nerf"):
        _, out = build("mesh-sampling", {**cfg, "visibility": mode}, reference=ref)
        pos, is_ref = out["positions"], out["is_ref"]
        gap = _occlusion_gap(pos, ref["c2w"][0])
        facing = (_normals(pos) * torch.nn.functional.normalize(ref["c2w"][0, :3, 3] - pos, dim=-1)).sum(-1)
        seen = (gap < 0.003) & (facing > 0.5)
        assert float((is_ref & seen).sum()) > 0.95 * float(seen.sum()), mode
        assert float((is_ref & (gap > 0.05)).sum()) < 0.01 * float(is_ref.sum()), mode
    with pytest.raises(Exception, match="visibility"):
        registry.get("builder", "mesh-sampling")({"visibility": "rays"}, path="system.builder")
