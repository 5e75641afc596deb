"""diffuse-light shading modes and schedules; backgrounds."""
import pytest
import torch

from it3d.core.config import ConfigError
from it3d.core.errors import It3dError
from it3d.core.registry import get
pytestmark = pytest.mark.usefixtures("one_thread")


def material(**cfg):
    return get("material", "diffuse-light")(cfg, path="system.material")


def test_shading_modes_by_hand():
    m = material(ambient_light_color=[0.1, 0.1, 0.1], diffuse_light_color=[0.8, 0.8, 0.8])
    albedo = torch.tensor([[0.5, 0.25, 1.0], [0.5, 0.25, 1.0]])
    normal = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    pos = torch.zeros(2, 3)
    light = torch.tensor([[0.0, 3.0, 4.0], [0.0, 3.0, 4.0]])  # unit direction (0, .6, .8)
    kw = dict(viewdirs=None, shading_normal=normal, light_positions=light, positions=pos)
    torch.testing.assert_close(m(albedo, shading="albedo", **kw), albedo)
    lit = torch.tensor([[0.1 + 0.8 * 0.8], [0.1]])  # cos = 0.8 for the first, 0 for the second
    torch.testing.assert_close(m(albedo, shading="textureless", **kw), lit.expand(2, 3))
    torch.testing.assert_close(m(albedo, shading="lambertian", **kw), (albedo * lit).clamp(0, 1))
    torch.testing.assert_close(m(albedo, shading="normal", **kw), (normal + 1) / 2)
    with pytest.raises(It3dError, match="normals"):
        m(albedo, shading="lambertian", light_positions=light, positions=pos)
    with pytest.raises(It3dError, match="light_positions"):
        m(albedo, shading="lambertian", shading_normal=normal)
    m.eval()
    torch.testing.assert_close(m(albedo, **kw), albedo)  # test mode: albedo


def test_piecewise_schedules_choose_the_shading_per_step():
    # Customize-It-3D: normal shading for the first 1000 steps of the 360-degree phase (steps 2000..2999;
    # piecewise schedules are right-continuous: at a repeated step the later value holds)
    m = material(shading_probs={"albedo": [[2000, 1], [2000, 0], [3000, 0], [3000, 1]],
                                "normal": [[2000, 0], [2000, 1], [3000, 1], [3000, 0]]})
    g = torch.Generator().manual_seed(0)
    for step, mode in ((0, "albedo"), (1999, "albedo"), (2000, "normal"), (2500, "normal"), (2999, "normal"),
                       (3000, "albedo"), (9000, "albedo")):
        assert {m.sample_shading(step, g) for _ in range(20)} == {mode}
    m.train()
    m.do_update_step(0, 2500)
    assert m.current_shading() == "normal"
    m.eval()
    assert m.current_shading() == "albedo"


def test_shading_probabilities_are_relative_weights():
    m = material(shading_probs={"albedo": 0.2, "lambertian": 0.6, "textureless": 0.2})
    g = torch.Generator().manual_seed(0)
    draws = [m.sample_shading(0, g) for _ in range(2000)]
    assert draws.count("lambertian") / 2000 == pytest.approx(0.6, abs=0.05)
    assert draws.count("textureless") / 2000 == pytest.approx(0.2, abs=0.05)
    with pytest.raises(ConfigError, match="unknown shading"):
        material(shading_probs={"phong": 1.0})
    with pytest.raises(ConfigError, match="all weights are 0"):
        material(shading_probs={"albedo": 0.0}).sample_shading(0)


def test_backgrounds():
    dirs = torch.nn.functional.normalize(torch.randn(4, 3, 5, 3), dim=-1)
    solid = get("background", "solid-color")({"color": [0.2, 0.4, 0.6]}, path="system.background")
    torch.testing.assert_close(solid(dirs), torch.tensor([0.2, 0.4, 0.6]).expand(4, 3, 5, 3))
    rnd = get("background", "random-color")({"random_prob": 1.0}, path="system.background")
    rnd.train()
    out = rnd(dirs)
    assert out.shape == (4, 3, 5, 3)
    assert torch.equal(out, out[:, :1, :1].expand_as(out))  # one colour per batch element
    assert not torch.allclose(out[0, 0, 0], out[1, 0, 0])
    rnd.eval()
    torch.testing.assert_close(rnd(dirs), torch.ones(4, 3, 5, 3))
    never = get("background", "random-color")({"random_prob": 0.0}, path="system.background")
    never.train()
    torch.testing.assert_close(never(dirs), torch.ones(4, 3, 5, 3))
    col = get("background", "learned")({"mode": "color", "init_color": [0.25, 0.5, 0.75]}, path="system.background")
    torch.testing.assert_close(col(dirs), torch.tensor([0.25, 0.5, 0.75]).expand(4, 3, 5, 3))
    col(dirs).sum().backward()
    assert col.logit.grad is not None
    mlp = get("background", "learned")({}, path="system.background")
    out = mlp(dirs)
    assert out.shape == (4, 3, 5, 3) and (out > 0).all() and (out < 1).all()
    assert not torch.allclose(out[0, 0, 0], out[0, 0, 1])  # depends on the direction
