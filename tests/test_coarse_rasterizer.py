"""Pure-torch triangle rasterizer (mesh silhouettes, texture baking) and the mesh exporter's baking."""
import math

import pytest
import torch

from it3d.data import cameras
from it3d.exporters.mesh import bake_texture, dilate
from it3d.renderers.mesh_rasterizer import interpolate, rasterize_2d, rasterize_mesh


def test_square_covers_exactly_the_pixel_centres_inside():
    xy = torch.tensor([[1.0, 1.0], [5.0, 1.0], [5.0, 5.0], [1.0, 5.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    r = rasterize_2d(xy, faces, 8, 8)
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[1:5, 1:5] = True  # centres 1.5 .. 4.5
    assert torch.equal(r["mask"], expect)
    # barycentrics reproduce the pixel centre
    pos = interpolate(xy, faces, r["face_id"], r["bary"])
    assert torch.allclose(pos[2, 3], torch.tensor([3.5, 2.5]), atol=1e-5)


def test_nearest_face_wins_and_depth_is_perspective_correct():
    # two camera-facing quads at z-depth 2 (red) and 1 (blue) seen by a camera at the origin looking down -z
    c2w = torch.eye(4)
    def quad(z, s):
        return torch.tensor([[-s, -s, -z], [s, -s, -z], [s, s, -z], [-s, s, -z]])
    v = torch.cat([quad(2.0, 0.5), quad(1.0, 0.1)])
    f = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    r = rasterize_mesh(v, f, c2w, 90.0, 32, 32)
    assert r["face_id"][16, 16].item() in (2, 3) and r["depth"][16, 16].item() == pytest.approx(1.0, abs=1e-5)
    assert r["face_id"][16, 13].item() in (0, 1) and r["depth"][16, 13].item() == pytest.approx(2.0, abs=1e-5)
    # a slanted triangle: interpolated depth equals the true plane depth along the pixel ray
    tri = torch.tensor([[-1.0, -1.0, -1.0], [1.0, -1.0, -3.0], [0.0, 1.0, -2.0]])
    r2 = rasterize_mesh(tri, torch.tensor([[0, 1, 2]]), c2w, 90.0, 32, 32)
    i, j = 18, 16
    d = cameras.ray_directions(32, 32, 90.0)[i, j]  # z = -1
    n = torch.cross(tri[1] - tri[0], tri[2] - tri[0], dim=0)
    t = (n @ tri[0]) / (n @ d)  # point = t * d, so the z-depth is t
    assert r2["mask"][i, j] and r2["depth"][i, j].item() == pytest.approx(t.item(), rel=1e-4)
    p = interpolate(tri, torch.tensor([[0, 1, 2]]), r2["face_id"], r2["bary"])[i, j]
    assert torch.allclose(p, t * d, atol=1e-4)


def test_sphere_silhouette_area_matches_the_analytic_disc():
    import trimesh

    m = trimesh.creation.icosphere(4, radius=0.3)
    v, f = torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces)
    r = rasterize_mesh(v, f, cameras.spherical_c2w(0.0, 0.0, 1.0), 60.0, 96, 96, budget=1 << 16)
    # the cone tangent to a sphere of radius 0.3 at distance 1 has half-angle asin(0.3)
    rad = math.tan(math.asin(0.3)) / math.tan(math.radians(30)) * 48
    assert r["mask"].float().sum().item() == pytest.approx(math.pi * rad ** 2, rel=0.03)
    assert r["depth"][48, 48].item() == pytest.approx(0.7, abs=2e-3)


def test_bake_texture_and_dilate():
    # one quad in UV space covering the left half of the texture; colour = x coordinate of the 3D point
    v = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [1.0, 1, 0], [0.0, 1, 0]])
    uv = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    tex = bake_texture(lambda p: p[:, :1].expand(-1, 3), v, uv, faces, torch.arange(4), 16, dilate_iterations=2)
    assert tex[8, 0, 0].item() == pytest.approx(1 / 16, abs=1e-4)  # texel centre u = 0.5/16 -> x = 1/16
    assert tex[8, 7, 0].item() == pytest.approx(15 / 16, abs=1e-4)
    assert tex[8, 9, 0].item() == pytest.approx(15 / 16, abs=1e-4)  # dilated 2 texels past the border
    assert tex[8, 12, 0].item() == 1.0  # untouched background
    img = torch.zeros(3, 3, 1)
    img[1, 1] = 4.0
    valid = torch.zeros(3, 3, dtype=torch.bool)
    valid[1, 1] = True
    assert torch.equal(dilate(img, valid, 1), torch.full((3, 3, 1), 4.0))
