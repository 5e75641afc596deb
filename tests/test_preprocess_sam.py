"""SamSegmenter on the tiny SAM: hub round trip, prompt scaling against SamProcessor, embedding cache."""
import numpy as np
import torch
from transformers import SamModel, SamProcessor

from it3d.core import hub
from it3d.core.segment import SamSegmenter
from it3d.testing import tiny_model_dir


def test_tiny_sam_round_trip_and_reference_forward():
    path = tiny_model_dir("sam")
    seg = SamSegmenter(path, device="cpu", dtype="fp32")
    assert isinstance(seg.model, SamModel) and seg.model is hub.load(SamModel, path, dtype="fp32", device="cpu")
    torch.manual_seed(0)
    image = torch.rand(1, 40, 70, 3)
    boxes = torch.tensor([[5.0, 4.0, 50.0, 30.0]])
    points = torch.tensor([[[20.0, 15.0], [30.0, 20.0]]])
    masks, scores = seg.segment(image, boxes=boxes, points=points)
    assert masks.shape == (3, 40, 70) and masks.dtype == torch.bool and scores.shape == (3,)

    # slow reference: the processor scales the prompts itself and the model runs on pixel_values
    model = SamModel.from_pretrained(path).eval()
    proc = SamProcessor.from_pretrained(path)
    arr = (image[0].numpy() * 255 + 0.5).astype(np.uint8)
    inp = proc(images=arr, input_boxes=[boxes.tolist()], input_points=[points.tolist()],
               input_labels=[[[1, 1]]], return_tensors="pt")
    with torch.no_grad():
        out = model(**inp, multimask_output=True)
    ref = proc.image_processor.post_process_masks(out.pred_masks, inp["original_sizes"], inp["reshaped_input_sizes"])[0]
    assert torch.allclose(scores, out.iou_scores.reshape(-1), atol=1e-5)
    assert torch.equal(masks, ref.reshape(3, 40, 70).bool())


def test_sam_default_prompt_and_embedding_cache():
    seg = SamSegmenter(tiny_model_dir("sam"), device="cpu")
    image = torch.rand(1, 32, 48, 3)
    m_default, s_default = seg.segment(image)
    m_box, s_box = seg.segment(image, boxes=torch.tensor([[0.0, 0.0, 48.0, 32.0]]))
    assert seg.n_encoder_calls == 1  # one encoder pass for one image
    assert torch.equal(m_default, m_box) and torch.allclose(s_default, s_box)
    m2, s2 = seg.segment(image, boxes=torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 40.0, 30.0]]), multimask=False)
    assert m2.shape == (2, 32, 48) and s2.shape == (2,)
    seg.segment(image.flip(1))
    assert seg.n_encoder_calls == 2
