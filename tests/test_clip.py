"""The CLIP wrapper: spec parsing, local checkpoints, normalised deterministic embeddings, offline errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from ovml.pipeline import clip
from ovml.pipeline.clip import ClipSpec, check_clip, load_clip
from ovml.pipeline.errors import OvmlError


def test_two_texts_and_an_image_embed_to_unit_vectors_of_the_model_width(tiny_clip):
    encoder = load_clip(tiny_clip, device="cpu")
    texts = encoder.encode_text(["a dog on a beach", "a red car"])
    pixels = encoder.preprocess(Image.new("RGB", (48, 40), (200, 30, 30))).unsqueeze(0)
    image = encoder.encode_image_batch(pixels)
    assert texts.shape == (2, 64) and image.shape == (1, 64)
    assert texts.dtype == np.float32 and image.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(image, axis=1), 1.0, atol=1e-5)


def test_identical_inputs_give_identical_vectors(tiny_clip):
    encoder = load_clip(tiny_clip, device="cpu")
    a, b = encoder.encode_text(["a dog on a beach", "a dog on a beach"])
    assert np.array_equal(a, b)
    pixels = encoder.preprocess(Image.new("RGB", (32, 32), (10, 120, 30))).unsqueeze(0)
    assert np.array_equal(encoder.encode_image_batch(pixels), encoder.encode_image_batch(pixels))


def test_checkpoint_written_as_random_is_reported_as_random(tiny_clip):
    assert load_clip(tiny_clip, device="cpu").random_weights is True


def test_seeded_random_spec_matches_the_seeded_random_checkpoint(tiny_clip):
    from_file = load_clip(tiny_clip, device="cpu").encode_text(["a cat"])
    from_spec = load_clip("ovml-tiny:random", device="cpu").encode_text(["a cat"])
    np.testing.assert_array_equal(from_file, from_spec)


@pytest.mark.parametrize("spec", ["ViT-B-16", "ViT-B-16:", ":openai"])
def test_malformed_spec_is_one_line_error(spec):
    with pytest.raises(OvmlError, match="ARCH:PRETRAINED"):
        ClipSpec.parse(spec)


def test_pretrained_tag_without_cached_weights_names_the_spec_and_the_local_checkpoint_fix():
    with pytest.raises(OvmlError) as info:
        load_clip("ViT-B-16:openai", device="cpu")
    message = str(info.value)
    assert "ViT-B-16:openai" in message and "--clip ViT-B-16:/path/to/" in message
    assert "\n" not in message


def test_a_failed_download_leaves_the_process_hub_setting_as_it_was():
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    with pytest.raises(OvmlError):
        load_clip("ViT-B-16:openai", device="cpu")
    assert constants.HF_HUB_OFFLINE == before


def test_weights_missing_offline_are_found_by_the_check_without_loading_a_model(monkeypatch):
    if clip._hub_reachable():
        pytest.skip("the model hub is reachable here: the weights can be downloaded")
    monkeypatch.setattr(clip, "_create", lambda *args: pytest.fail("check_clip loaded a model"))
    with pytest.raises(OvmlError, match=r"CLIP weights for 'ViT-B-16:openai' are not available \("):
        check_clip("ViT-B-16:openai")


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(OvmlError, match="does not exist"):
        load_clip(f"ovml-tiny:{tmp_path}/missing.safetensors", device="cpu")


def test_unknown_architecture_is_named():
    with pytest.raises(OvmlError, match="unknown CLIP architecture 'ViT-Q-99'"):
        load_clip("ViT-Q-99:openai", device="cpu")


def test_unknown_pretrained_tag_lists_the_known_ones():
    with pytest.raises(OvmlError, match="not a pretrained tag of ViT-B-32 .*openai"):
        load_clip("ViT-B-32:nonsense", device="cpu")


def test_patch_features_are_unit_vectors_per_patch_beside_the_exact_global_embedding(tiny_clip):
    encoder = load_clip(tiny_clip, device="cpu")
    pixels = torch.stack([encoder.preprocess(Image.new("RGB", (40, 40), colour)) for colour in ((200, 30, 30),
                                                                                                (10, 120, 30))])
    global_vectors, patches = encoder.encode_image_patches(pixels)
    assert patches.shape == (2, 16, 64)  # ovml-tiny: 32 px images in 8 px patches
    np.testing.assert_allclose(np.linalg.norm(patches, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(global_vectors, encoder.encode_image_batch(pixels), atol=1e-6)


def test_patch_features_take_the_value_path_so_one_patch_ignores_the_others(tiny_clip):
    """Attention over a single token is exactly its value path: so a patch's feature equals the last block run
    on that patch token alone, then the final norm and projection."""
    encoder = load_clip(tiny_clip, device="cpu")
    visual = encoder.model.visual
    pixels = encoder.preprocess(Image.new("RGB", (32, 32), (90, 60, 200)))[None]
    with torch.inference_mode():
        x = visual._embeds(pixels)
        *first, last = visual.transformer.resblocks
        for block in first:
            x = block(x)
        token = x[:, 1:2]  # patch 0 alone: attention over a single token is exactly its value path
        alone = last(token)
        expected = visual.ln_post(alone) @ visual.proj
    _, patches = encoder.encode_image_patches(pixels)
    np.testing.assert_allclose(patches[0, 0], torch.nn.functional.normalize(expected[0, 0], dim=-1).numpy(),
                               atol=1e-5)
