"""Prompt processor: caching (memory + disk, no re-encode), view-dependent prompts, errors."""
import os

import pytest
import torch
from transformers import CLIPTextModel

from it3d.core import hub, registry
from it3d.core.config import ConfigError
from it3d.core.errors import It3dError
from it3d.prompts.stable_diffusion import clear_memory_cache
from it3d.testing import tiny_model_dir

import it3d.prompts  # noqa: F401


pytestmark = pytest.mark.usefixtures("one_thread")


def make_pp(tmp_path, **cfg):
    base = {"cache_dir": str(tmp_path / "emb")}
    base.update(cfg)
    return registry.get("prompt-processor", "stable-diffusion")(base, path="system.guidance.sd.prompt_processor",
                                                                 model=tiny_model_dir("sd"), device=torch.device("cpu"))


@pytest.fixture
def encoder_calls(monkeypatch):
    """Counts forward passes of the (hub-shared) tiny text encoder."""
    enc = hub.load(CLIPTextModel, tiny_model_dir("sd"), subfolder="text_encoder", dtype="auto", device="cpu")
    calls = []
    orig = enc.forward
    monkeypatch.setattr(enc, "forward", lambda *a, **k: calls.append(1) or orig(*a, **k))
    return calls


def test_embeddings_cached_in_memory_and_on_disk(tmp_path, encoder_calls):
    clear_memory_cache()
    pp = make_pp(tmp_path, prompt="a photo of a dog", view_dependent_prompting=False)
    elev, azim = torch.zeros(3), torch.tensor([0.0, 90.0, 180.0])
    cond, uncond = pp.get_text_embeddings(elev, azim)
    assert cond.shape == (3, 77, 32) and uncond.shape == (3, 77, 32)
    assert len(encoder_calls) == 2  # prompt + negative prompt
    assert len(os.listdir(tmp_path / "emb")) == 2

    cond2, _ = pp.get_text_embeddings(elev, azim)  # memory hit
    assert len(encoder_calls) == 2 and torch.equal(cond, cond2)

    clear_memory_cache()  # a new process: disk hit, still no encoding
    cond3, uncond3 = make_pp(tmp_path, prompt="a photo of a dog", view_dependent_prompting=False).get_text_embeddings(elev, azim)
    assert len(encoder_calls) == 2 and torch.equal(cond, cond3) and torch.equal(uncond, uncond3)

    make_pp(tmp_path, prompt="a photo of a cat", view_dependent_prompting=False).get_text_embeddings(elev, azim)
    assert len(encoder_calls) == 3  # a new prompt is encoded (negative still cached)
    assert not torch.equal(cond[0], make_pp(tmp_path).encode(["a photo of a cat"])[0])


def test_disk_cache_is_keyed_by_model(tmp_path):
    a = make_pp(tmp_path)
    b = registry.get("prompt-processor", "stable-diffusion")({"cache_dir": str(tmp_path / "emb")}, model=tiny_model_dir("zero123"))
    assert a.cache_key("x") != b.cache_key("x") and a.cache_key("x") != a.cache_key("y")


def test_view_dependent_prompts(tmp_path):
    pp = make_pp(tmp_path, prompt="a teddy bear")
    elev = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0, 70.0])
    azim = torch.tensor([0.0, 44.0, 90.0, 180.0, -170.0, 180.0])
    assert pp.directions(elev, azim) == ["front", "front", "side", "back", "back", "overhead"]
    assert pp.view_prompt(pp.prompt, "back") == "a teddy bear, back view"
    pp.set_reference({"azimuth": torch.tensor([90.0])})  # front follows the reference view
    assert pp.directions(torch.zeros(2), torch.tensor([90.0, 270.0])) == ["front", "back"]
    cond, _ = pp.get_text_embeddings(torch.zeros(2), torch.tensor([90.0, 270.0]))
    torch.testing.assert_close(cond[1], pp.encode(["a teddy bear, back view"])[0])


def test_caption_is_the_default_prompt_and_missing_prompt_fails(tmp_path):
    pp = make_pp(tmp_path)
    with pytest.raises(It3dError, match="system.guidance.sd.prompt_processor.prompt"):
        pp.get_text_embeddings(torch.zeros(1), torch.zeros(1))
    pp.set_prompt("a cat")
    assert pp.prompt == "a cat"
    assert make_pp(tmp_path, prompt="a dog").prompt == "a dog"
    pp = make_pp(tmp_path, prompt="a dog", view={"suffixes": {"back": "from behind"}, "front_threshold": 30.0})
    assert pp.view_prompt(pp.prompt, "back") == "a dog, from behind"
    assert pp.directions(torch.zeros(1), torch.full((1,), 40.0)) == ["side"]
    with pytest.raises(ConfigError, match="system.guidance.sd.prompt_processor.view.front_treshold"):
        make_pp(tmp_path, view={"front_treshold": 30.0})


def test_embeddings_are_picked_on_the_device_without_a_host_read(tmp_path):
    from it3d.core.profiling import count_syncs

    pp = make_pp(tmp_path, prompt="a teddy bear")
    elev, azim = torch.tensor([0.0, 0.0, 0.0, 70.0]), torch.tensor([10.0, 90.0, 180.0, 0.0])
    pp.get_text_embeddings(elev, azim)  # first call: encodes the four direction variants once
    with count_syncs() as c:
        cond, uncond = pp.get_text_embeddings(elev, azim)
    assert c.count == 0 and c.uploads == 0, c.report()
    names = pp.directions(elev, azim)
    assert names == ["front", "side", "back", "overhead"]
    expected = pp.encode([f"a teddy bear, {d} view" for d in names])
    torch.testing.assert_close(cond, expected, rtol=0, atol=0)
    torch.testing.assert_close(uncond, pp.encode([""]).expand_as(cond), rtol=0, atol=0)
