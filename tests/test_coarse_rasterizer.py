"""Pure-torch triangle rasterizer (mesh silhouettes, texture baking) and the mesh exporter's baking."""
import math

import pytest
import torch

from it3d.core import cameras
from it3d.exporters.mesh import bake_texture
from it3d.exporters.texture import fill_gutter, pull_push_fill
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


def test_bake_texture_and_gutter():
    # one quad in UV space covering the left half of the texture; colour = x coordinate of the 3D point
    v = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [1.0, 1, 0], [0.0, 1, 0]])
    uv = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.5, 1.0], [0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    tex, mask = bake_texture(lambda p: p[:, :1].expand(-1, 3), v, uv, faces, torch.arange(4), 16)
    assert mask[:, :8].all() and not mask[:, 8:].any()
    assert tex[8, 0, 0] == pytest.approx(1 / 16, abs=1e-4)  # texel centre u = 0.5/16 -> x = 1/16
    assert tex[8, 7, 0] == pytest.approx(15 / 16, abs=1e-4)
    assert tex[8, 9, 0] == pytest.approx(15 / 16, abs=1e-4)  # outside the chart: the nearest chart texel
    assert tex[8, 15, 0] == pytest.approx(15 / 16, abs=1e-4)
    img = torch.zeros(3, 3, 1).numpy()
    img[1, 1] = 4.0
    valid = torch.zeros(3, 3, dtype=torch.bool).numpy()
    valid[1, 1] = True
    assert (fill_gutter(img, valid) == 4.0).all()


def test_pull_push_fill_interpolates_between_known_texels():
    img = torch.zeros(8, 8, 3)
    known = torch.zeros(8, 8, dtype=torch.bool)
    known[:, 0], known[:, 7] = True, True
    img[:, 7] = 1.0
    out = pull_push_fill(img, known)
    assert torch.equal(out[known], img[known])  # known texels untouched
    row = out[4, :, 0]
    assert (row[1:] >= row[:-1] - 1e-6).all() and 0.2 < float(row[3]) < 0.8  # a smooth ramp from 0 to 1
    assert torch.allclose(out[:, 3], out[:1, 3].expand(8, 3), atol=1e-6)  # constant down each column
    one = torch.zeros(5, 7, dtype=torch.bool)
    one[2, 3] = True  # a single known texel (odd sizes) fills everything with its colour
    assert torch.allclose(pull_push_fill(torch.full((5, 7, 3), 0.3) * one[..., None], one), torch.full((5, 7, 3), 0.3))


def test_render_textured_samples_the_texture_upright():
    """A camera-facing square with a 2x2 texture (row 0 = v 1): top-left red, top-right green,
    bottom-left blue, bottom-right white must appear in those image quadrants."""
    from it3d.renderers.mesh_rasterizer import render_textured

    v = torch.tensor([[0.0, -0.5, -0.5], [0.0, 0.5, -0.5], [0.0, 0.5, 0.5], [0.0, -0.5, 0.5]])  # x = 0 plane
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    tex = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]], [[0, 0, 1.0], [1.0, 1.0, 1.0]]])
    c2w = cameras.spherical_c2w(0.0, 0.0, 2.0)  # at +x looking at the origin: world +y is image right
    out = render_textured(v, f, uv, tex, c2w, 60.0, 64, 64, bg_color=(0.5, 0.5, 0.5), ssaa=1)
    half = 0.5 / math.tan(math.radians(30)) * 32 / 2  # the square's half-size in pixels
    assert out["coverage"].sum().item() == pytest.approx((2 * half) ** 2, rel=0.05)
    q = lambda i, j: out["rgb"][32 + i, 32 + j]  # noqa: E731
    assert torch.allclose(q(-8, -8), torch.tensor([1.0, 0, 0]), atol=0.02)
    assert torch.allclose(q(-8, 7), torch.tensor([0, 1.0, 0]), atol=0.02)
    assert torch.allclose(q(7, -8), torch.tensor([0, 0, 1.0]), atol=0.02)
    assert torch.allclose(q(7, 7), torch.tensor([1.0, 1.0, 1.0]), atol=0.02)
    assert torch.allclose(out["rgb"][1, 1], torch.tensor([0.5, 0.5, 0.5]))
