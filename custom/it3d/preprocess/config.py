"""``PreprocessConfig``: what ``ensure_preprocessed`` makes, with which models, and where it caches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.config import component, register_section_check, validate_dataclass

MAPS = ("mask", "depth", "normal", "caption")


@dataclass
class PreprocessConfig:
    size: int = 512  # side of the recentred square ``<stem>_rgba.png`` and of the maps
    border_ratio: float = 0.2  # the object spans 1 - border_ratio of the side (as data.single-image frames it)
    max_side: int = 1024  # the mask estimator sees the photo downscaled to this longest side
    cache_dir: Optional[str] = None  # default: the image's folder; set it when that folder is read-only
    overwrite: bool = False  # recompute even when cached
    device: str = "auto"  # auto: the device ensure_preprocessed is given
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    # given by hand (these win): maps aligned with the input photo (any resolution of its aspect)
    mask_path: Optional[str] = None
    depth_path: Optional[str] = None
    depth_convention: str = "disparity"  # of depth_path: disparity (larger = nearer) | depth
    normal_path: Optional[str] = None  # camera-space (n + 1) / 2, axes as normal_convention says
    normal_convention: str = "opengl"  # of normal_path: opengl (y up, z to the viewer) | opencv; framed as given
    caption: str = ""
    # estimators ("none" disables one); each entry is the estimator's own config
    mask_type: str = component("estimator", "sam-mask")
    mask: dict = field(default_factory=dict)
    depth_type: str = component("estimator", "transformers-depth")
    depth: dict = field(default_factory=dict)
    normal_type: str = component("estimator", "normal-from-depth")
    normal: dict = field(default_factory=dict)
    caption_type: str = component("estimator", "blip-caption", "caption_model")
    caption_model: dict = field(default_factory=dict)


def parse_preprocess_config(cfg: Any, path: str = "data.preprocess") -> PreprocessConfig:
    """Strict parse (unknown keys fail with their dotted path) including every estimator's config."""
    from ..core.config import ConfigError

    parsed = validate_dataclass(PreprocessConfig, cfg, path)
    if not 0.0 <= parsed.border_ratio < 1.0:
        raise ConfigError(f"{path}.border_ratio must be in [0, 1), got {parsed.border_ratio}")
    if parsed.depth_convention not in ("disparity", "depth"):
        raise ConfigError(f"{path}.depth_convention must be disparity or depth, got '{parsed.depth_convention}'")
    if parsed.normal_convention not in ("opengl", "opencv"):
        raise ConfigError(f"{path}.normal_convention must be opengl or opencv, got '{parsed.normal_convention}'")
    if parsed.size < 8 or parsed.max_side < 8:
        raise ConfigError(f"{path}.size and {path}.max_side must be at least 8")
    return parsed


def _check_data_preprocess(data: Any, path: str) -> None:
    """``data.preprocess`` of a single-image datamodule (completed with its hand-given inputs), estimators included."""
    from .entry import preprocess_config_from_data

    parse_preprocess_config(preprocess_config_from_data(data), f"{path}.preprocess")


register_section_check("preprocess", _check_data_preprocess)
