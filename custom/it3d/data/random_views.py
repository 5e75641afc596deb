"""Camera sampling for single-image training: batches of camera rays, random novel views
(with progressive azimuth range and point lights around the camera), resolution
milestones (the 360° evaluation orbit: :func:`it3d.core.cameras.orbit_views`). Pure functions; the
datamodule holds the config."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..core import cameras
from ..core.config import ConfigError
from ..core.typing import Float, Tensor


def camera_batch(elevation: Float[Tensor, "B"], azimuth: Float[Tensor, "B"], distance: Float[Tensor, "B"],
                 fovy: Float[Tensor, "B"], height: int, width: int) -> Dict:
    """Rays and camera keys for cameras on the sphere looking at the origin (the batch format: the README's
    "Components by kind" section)."""
    c2w = cameras.spherical_c2w(elevation, azimuth, distance)
    rays_o, rays_d = cameras.get_rays(c2w, height, width, fovy)
    return {"rays_o": rays_o, "rays_d": rays_d, "c2w": c2w, "fovy": fovy.float(), "elevation": elevation.float(),
            "azimuth": azimuth.float(), "camera_distances": distance.float(), "height": int(height), "width": int(width)}


def _uniform(gen: torch.Generator, n: int, lo_hi: Sequence[float]) -> Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def light_positions(gen: torch.Generator, cam_pos: Float[Tensor, "B 3"], perturb: float,
                    distance_range: Sequence[float]) -> Float[Tensor, "B 3"]:
    """Point lights around the camera direction: normalize(cam_dir + N(0, perturb)) * U(distance_range)."""
    n = cam_pos.shape[0]
    d = F.normalize(F.normalize(cam_pos, dim=-1) + perturb * torch.randn(n, 3, generator=gen), dim=-1)
    return d * _uniform(gen, n, distance_range)[:, None]


def sample_views(gen: torch.Generator, n: int, height: int, width: int, elevation_range, azimuth_range,
                 distance_range, fovy_range, light_perturb: float, light_distance_range) -> Dict:
    """``n`` random novel views (angles in degrees) with their rays and ``light_positions``."""
    elev = _uniform(gen, n, elevation_range)
    azim = _uniform(gen, n, azimuth_range)
    dist = _uniform(gen, n, distance_range)
    fovy = _uniform(gen, n, fovy_range)
    out = camera_batch(elev, azim, dist, fovy, height, width)
    out["light_positions"] = light_positions(gen, out["c2w"][:, :3, 3], light_perturb, light_distance_range)
    return out


def azimuth_range_at(step: int, warmup_range: Sequence[float], full_range: Sequence[float], warmup_steps: int):
    """Progressive training: ``warmup_range`` (e.g. ±45°) for the first ``warmup_steps``, then ``full_range``."""
    return tuple(warmup_range) if step < warmup_steps else tuple(full_range)


def check_resolutions(milestones: Sequence[int], heights: Sequence[int], widths: Sequence[int], path: str) -> None:
    if len(heights) != len(widths) or len(heights) != len(milestones) + 1:
        raise ConfigError(f"{path}: need len(heights) == len(widths) == len(resolution_milestones) + 1, got "
                          f"{len(heights)}, {len(widths)}, {len(milestones)}")
    if list(milestones) != sorted(milestones):
        raise ConfigError(f"{path}.resolution_milestones must be increasing: {list(milestones)}")


def resolution_at(step: int, milestones: Sequence[int], heights: Sequence[int], widths: Sequence[int]) -> Tuple[int, int]:
    """Rendering size at ``step``: heights[i] where i = number of milestones <= step."""
    i = sum(1 for m in milestones if step >= m)
    return int(heights[i]), int(widths[i])


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, step): sampling is reproducible across resumes."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 63 - 1))
