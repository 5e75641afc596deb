"""Segment Anything through transformers (``SamModel`` + ``SamProcessor``): shared by the ``sam`` mask
estimator (preprocessing) and the refine builder's SAM mask union, so neither reaches into the other.

transformers' ``SamModel`` loads the same weights as the original ``segment_anything``
checkpoints (the ``facebook/sam-vit-{base,large,huge}`` hub repos are conversions of them)
and needs no torchvision, which the CPU installs of it3d cannot have; it also loads through
``it3d.core.hub`` like every other pretrained model.

``SamSegmenter(model_id_or_path, device, dtype).segment(image, boxes=None, points=None)``
returns every candidate mask for every prompt (K = prompts x 3 with ``multimask=True``) at the
image's resolution and SAM's predicted IoU for each. The image embedding of the last image
is kept, so several prompt sets on one image cost one encoder pass.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from . import hub
from .errors import It3dError
from .image import to_uint8_image
from .typing import Bool, Float, Int, Tensor

DEFAULT_SAM = "facebook/sam-vit-base"


class SamSegmenter:
    def __init__(self, model_id_or_path: str = DEFAULT_SAM, device: Any = "cpu", dtype: Any = "auto",
                 config_key: Optional[str] = None) -> None:
        from transformers import SamModel, SamProcessor

        self.device = torch.device(device)
        self.dtype = hub.resolve_dtype(dtype, self.device)
        self.model = hub.load(SamModel, model_id_or_path, dtype=self.dtype, device=self.device, config_key=config_key)
        self.processor = hub.load(SamProcessor, model_id_or_path, config_key=config_key)
        self._last_image: Optional[Tensor] = None
        self._last_inputs = None
        self.n_encoder_calls = 0  # counted so tests (and callers) can see the embedding cache at work

    def _embed(self, image: Tensor):
        last = self._last_image
        if last is not None and last.shape == image.shape and torch.equal(last, image):
            return self._last_inputs
        inputs = self.processor(images=to_uint8_image(image), return_tensors="pt")
        with torch.no_grad():
            pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
            emb = self.model.get_image_embeddings(pixel_values)
        self.n_encoder_calls += 1
        self._last_image = image.detach().clone()
        self._last_inputs = (emb, inputs["original_sizes"], inputs["reshaped_input_sizes"])
        return self._last_inputs

    def _scale_coords(self, coords: Tensor, original_size, reshaped_size) -> Tensor:
        """Pixel (x, y) in the input image -> the processor's resized frame."""
        oh, ow = [int(v) for v in original_size]
        rh, rw = [int(v) for v in reshaped_size]
        scale = torch.tensor([rw / ow, rh / oh], dtype=torch.float32)
        return coords.float().cpu().reshape(-1, 2).mul(scale).reshape(coords.shape)

    @torch.no_grad()
    def segment(self, image: Float[Tensor, "1 H W 3"], boxes: Optional[Float[Tensor, "N 4"]] = None,
                points: Optional[Float[Tensor, "N P 2"]] = None, point_labels: Optional[Int[Tensor, "N P"]] = None,
                multimask: bool = True) -> Tuple[Bool[Tensor, "K H W"], Float[Tensor, "K"]]:
        """Masks for the prompts; ``boxes`` are (x0, y0, x1, y1) and ``points`` (x, y) in pixels of ``image``.

        ``point_labels``: 1 = foreground (default), 0 = background. With no prompt at all the
        whole image is the box. Boxes and points given together must have the same N (one prompt
        each). Returns K = N * (3 if multimask else 1) masks on ``image``'s grid and their
        predicted IoU scores, in prompt-major order.
        """
        h, w = image.shape[1:3]
        if boxes is None and points is None:
            boxes = torch.tensor([[0.0, 0.0, float(w), float(h)]])
        if boxes is not None and points is not None and boxes.shape[0] != points.shape[0]:
            raise It3dError(f"SamSegmenter.segment: {boxes.shape[0]} boxes but {points.shape[0]} point sets")
        emb, orig, resh = self._embed(image)
        kwargs = {"image_embeddings": emb, "multimask_output": multimask}
        if boxes is not None:
            scaled = self._scale_coords(boxes.reshape(-1, 2, 2), orig[0], resh[0])
            kwargs["input_boxes"] = scaled.reshape(1, -1, 4).to(self.device, self.dtype)
        if points is not None:
            pts = self._scale_coords(points, orig[0], resh[0]).unsqueeze(0)  # 1 N P 2
            labels = torch.ones(pts.shape[:-1], dtype=torch.long) if point_labels is None else point_labels[None].long()
            kwargs["input_points"] = pts.to(self.device, self.dtype)
            kwargs["input_labels"] = labels.to(self.device)
        out = self.model(**kwargs)
        masks = self.processor.image_processor.post_process_masks(out.pred_masks.float().cpu(), orig, resh)[0]
        scores = out.iou_scores[0].float().cpu()
        return masks.reshape(-1, h, w).bool(), scores.reshape(-1)
