"""Prompt processor for CLIP-text-conditioned diffusion models (Stable Diffusion, DreamBooth).

* the prompt is the config's ``prompt`` or, when that is empty, the caption given by ``set_prompt``;
* an optional negative prompt gives the unconditional embedding (empty string by default);
* view-dependent prompting (threestudio style) appends ``", front view"`` / ``side`` / ``back`` /
  ``overhead`` chosen from each view's azimuth (relative to the front azimuth) and elevation;
* text embeddings are cached in memory (per process) and on disk, keyed by a hash of the model
  (id or local path plus its text-encoder file stamps) and the prompt, so a second call never
  re-encodes. The tokenizer and text encoder are loaded only on a cache miss. A prompt's
  embeddings (its four direction variants with view-dependent prompting) are also kept on the
  device, and each view's direction is chosen there: a training step makes no host read of the
  view angles and no copy of embeddings.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..core import hub, io
from ..core.base import BasePromptProcessor
from ..core.errors import It3dError
from ..core.registry import register
from ..core.typing import Float, Tensor

_MEMORY: Dict[str, Tensor] = {}
DIRECTIONS = ("front", "side", "back", "overhead")  # the order of direction_index


def clear_memory_cache() -> None:
    _MEMORY.clear()


@dataclass
class ViewConfig:
    front_threshold: float = 45.0  # |azimuth - front| <= this: front
    back_threshold: float = 45.0  # |azimuth - front| >= 180 - this: back
    overhead_threshold: float = 60.0  # elevation > this: overhead (takes precedence)
    suffixes: Dict[str, str] = field(default_factory=lambda: {
        "front": "front view", "side": "side view", "back": "back view", "overhead": "overhead view"})


@register("stable-diffusion", kind="prompt-processor")
class StableDiffusionPromptProcessor(BasePromptProcessor):
    @dataclass
    class Config:
        pretrained_model_name_or_path: str = ""  # empty: the guidance's model
        prompt: str = ""  # empty: the caption (set_prompt)
        negative_prompt: str = ""
        view_dependent_prompting: bool = True
        front_azimuth: Optional[float] = None  # degrees; None: the reference view's azimuth (0 before set_reference)
        view: ViewConfig = field(default_factory=ViewConfig)
        cache_dir: str = ".it3d_cache/text_embeddings"  # empty: memory cache only
        tokenizer_subfolder: str = "tokenizer"
        text_encoder_subfolder: str = "text_encoder"
        dtype: str = "auto"  # auto: the guidance's dtype

    def __init__(self, cfg: Any = None, path: str = "", **kwargs) -> None:
        self.path = path
        super().__init__(cfg, path, **kwargs)

    def configure(self, model: Optional[str] = None, device: Any = "cpu", dtype: Any = None, **kwargs) -> None:
        """``model`` / ``dtype``: the owning guidance's, used when this config leaves them empty / auto."""
        self.model = self.cfg.pretrained_model_name_or_path or model
        if not self.model:
            raise It3dError(f"{self.path or 'prompt_processor'}.pretrained_model_name_or_path: no text model given")
        self.device = torch.device(device)
        use = dtype if self.cfg.dtype == "auto" and dtype is not None else self.cfg.dtype
        self.dtype = hub.resolve_dtype(use, self.device)
        self.caption = ""
        self.front_azimuth = 0.0 if self.cfg.front_azimuth is None else float(self.cfg.front_azimuth)
        self.encode_calls = 0  # number of text-encoder forward passes (cache misses)

    # ------------------------------------------------------------------ prompt
    def set_prompt(self, caption: str) -> None:
        self.caption = caption or ""

    def set_reference(self, ref: Dict[str, Any]) -> None:
        if self.cfg.front_azimuth is None and "azimuth" in ref:
            self.front_azimuth = float(torch.as_tensor(ref["azimuth"]).reshape(-1)[0])

    @property
    def prompt(self) -> str:
        text = self.cfg.prompt or self.caption
        if not text:
            raise It3dError(f"no prompt: set {self.path or 'prompt_processor'}.prompt or give the image a caption "
                            "(preprocess.caption)")
        return text

    # ------------------------------------------------------------------ directions
    def direction_index(self, elevation: Tensor, azimuth: Tensor) -> Tensor:
        """Index into :data:`DIRECTIONS` per view (B,), computed where the angles are (degrees): no host read."""
        v = self.cfg.view
        azim = torch.as_tensor(azimuth, dtype=torch.float32).reshape(-1)
        rel = (torch.remainder(azim - self.front_azimuth + 180.0, 360.0) - 180.0).abs()
        elev = torch.as_tensor(elevation, dtype=torch.float32, device=azim.device).reshape(-1).expand_as(rel)
        side = torch.where(rel <= v.front_threshold, 0, torch.where(rel >= 180.0 - v.back_threshold, 2, 1))
        return torch.where(elev > v.overhead_threshold, 3, side)

    def directions(self, elevation: Tensor, azimuth: Tensor) -> List[str]:
        """Direction name per view (B,) from angles in degrees (a host read: for tests and reports)."""
        return [DIRECTIONS[i] for i in self.direction_index(elevation, azimuth).cpu().tolist()]

    def view_prompt(self, prompt: str, direction: str) -> str:
        if not self.cfg.view_dependent_prompting:
            return prompt
        return f"{prompt}, {self.cfg.view.suffixes[direction]}"

    # ------------------------------------------------------------------ embeddings
    def get_text_embeddings(self, elevation: Tensor, azimuth: Tensor, prompt: Optional[str] = None
                            ) -> Tuple[Float[Tensor, "B N D"], Float[Tensor, "B N D"]]:
        """(cond, uncond) text embeddings for B views; ``prompt`` overrides the processor's prompt.

        The embeddings of the prompt's direction variants (one without view-dependent prompting) are
        kept on the device; each view's row is picked there by :meth:`direction_index`, so a call makes
        no host read of the angles and no copy of the embeddings."""
        base = self.prompt if prompt is None else prompt
        table = self.device_embeddings(base)
        n = torch.as_tensor(azimuth).numel()
        if self.cfg.view_dependent_prompting:
            cond = table.index_select(0, self.direction_index(elevation, azimuth).to(table.device))
        else:
            cond = table.expand(n, *table.shape[1:])
        uncond = self.device_embeddings(self.cfg.negative_prompt, directional=False).expand_as(cond)
        return cond, uncond

    def device_embeddings(self, base: str, directional: bool = True) -> Float[Tensor, "K N D"]:
        """Embeddings of ``base`` on the device, in the model's dtype: one row per direction in
        :data:`DIRECTIONS` order with view-dependent prompting (and ``directional``), else one row."""
        key = (base, directional and self.cfg.view_dependent_prompting)
        tables = self.__dict__.setdefault("_tables", {})
        if key not in tables:
            prompts = [self.view_prompt(base, d) for d in DIRECTIONS] if key[1] else [base]
            tables[key] = self.encode(prompts)
        return tables[key]

    def encode(self, prompts: Sequence[str]) -> Float[Tensor, "B N D"]:
        """Embeddings (B, 77, D) of ``prompts``, from the memory cache, the disk cache, or the text encoder."""
        unique = list(dict.fromkeys(prompts))
        missing = [p for p in unique if self.cache_key(p) not in _MEMORY]
        still = []
        for p in missing:
            f = self.cache_file(p)
            if f and os.path.isfile(f):
                _MEMORY[self.cache_key(p)] = torch.load(f, map_location="cpu", weights_only=True)
            else:
                still.append(p)
        if still:
            emb = self._encode(still)
            for p, e in zip(still, emb):
                _MEMORY[self.cache_key(p)] = e
                f = self.cache_file(p)
                if f:
                    io.torch_save(e.clone(), f)
        return torch.stack([_MEMORY[self.cache_key(p)] for p in prompts]).to(self.device, self.dtype)

    @torch.no_grad()
    def _encode(self, prompts: List[str]) -> Tensor:
        from transformers import CLIPTextModel, CLIPTokenizer

        key = f"{self.path}.pretrained_model_name_or_path" if self.path else None
        tok = hub.load(CLIPTokenizer, self.model, subfolder=self.cfg.tokenizer_subfolder, config_key=key)
        enc = hub.load(CLIPTextModel, self.model, subfolder=self.cfg.text_encoder_subfolder, dtype=self.dtype,
                       device=self.device, config_key=key)
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        self.encode_calls += 1
        return enc(ids)[0].float().cpu()

    # ------------------------------------------------------------------ cache keys
    def model_stamp(self) -> str:
        """The model id, plus size and mtime of the text-encoder files for local folders (a rebuilt model re-encodes)."""
        local = hub.local_dir(self.model)
        if local is None:
            return self.model
        stamp = [local]
        for sub in (self.cfg.tokenizer_subfolder, self.cfg.text_encoder_subfolder):
            folder = os.path.join(local, sub)
            if os.path.isdir(folder):
                for name in sorted(os.listdir(folder)):
                    st = os.stat(os.path.join(folder, name))
                    stamp.append(f"{sub}/{name}:{st.st_size}:{st.st_mtime_ns}")
        return "|".join(stamp)

    def cache_key(self, prompt: str) -> str:
        if not hasattr(self, "_stamp"):
            self._stamp = self.model_stamp()
        return hashlib.sha256(f"{self._stamp}\n{self.cfg.text_encoder_subfolder}\n{prompt}".encode()).hexdigest()

    def cache_file(self, prompt: str) -> Optional[str]:
        if not self.cfg.cache_dir:
            return None
        return os.path.join(self.cfg.cache_dir, self.cache_key(prompt) + ".pt")
