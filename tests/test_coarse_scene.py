"""The project's synthetic scene: exact ray casting and the encodings of the files it writes."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from it3d.core import cameras
from it3d.testing.scene import SceneSpec, make_scene, reference_camera, render_view


def test_centre_ray_hits_the_ellipsoid_where_the_algebra_says():
    s = SceneSpec()
    v = render_view(reference_camera(s), s.fovy, 32, 32, s, supersample=1)
    # pixel centres (15.5, 15.5), (16.5, 16.5) straddle the axis; the axis ray at z = 0 meets the
    # ellipsoid at x = a * sqrt(1 - (cz / c)^2)
    x = s.ellipsoid_radii[0] * math.sqrt(1 - (s.ellipsoid_center[2] / s.ellipsoid_radii[2]) ** 2)
    centre = v["depth"][15:17, 15:17, 0].mean().item()
    assert centre == pytest.approx(s.distance - x, abs=5e-3)
    assert v["mask"][0, 0, 0] == 0 and v["rgba"][0, 0, 3] == 0
    n = v["normal"][16, 16]
    assert n[0] > 0.95  # faces the camera at +x


def test_make_scene_files_and_depth_encoding(tmp_path):
    paths = make_scene(str(tmp_path), 48, save_npy=True)
    rgba = np.asarray(Image.open(paths["rgba"]))
    d16 = np.asarray(Image.open(paths["depth"]))
    z = np.load(paths["depth_npy"])
    assert rgba.shape == (48, 48, 4) and d16.dtype == np.uint16
    fg = (rgba[..., 3] > 127) & (d16 > 0)
    # disparity-like encoding is an exact decreasing affine map of the true z-depth
    r = np.corrcoef(d16[fg].astype(np.float64), z[fg])[0, 1]
    assert r == pytest.approx(-1.0, abs=1e-4)
    assert d16[~(rgba[..., 3] > 0)].max() == 0
