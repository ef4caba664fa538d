"""The fast CLIP text path: same numbers as open_clip's encode_text, cut to each batch's real length."""

import numpy as np
import open_clip
import pytest
import torch

from ovml.pipeline.clip import CausalTextTower, ClipEncoder, ClipSpec, load_clip
from ovml.pipeline.errors import OvmlError

TEXTS_OF_VERY_DIFFERENT_LENGTHS = [
    "dog",
    "a photo of a dog and a cat on a sunny beach next to a red umbrella and a surfboard",
    "two kids fly a kite above the dunes while their grandparents watch from a bench and a golden "
    "retriever chases seagulls along the wet sand near the lifeguard tower at low tide",
    "sky",
    "a cluttered kitchen counter with " + "a mug, a knife and a loaf of bread, " * 12,  # longer than 77 tokens
]


def open_clip_reference(encoder: ClipEncoder, texts: list[str]) -> np.ndarray:
    with torch.inference_mode():
        return encoder.model.encode_text(encoder.tokenizer(texts), normalize=True).numpy()


def test_standard_clip_text_tower_takes_the_causal_shortcut(tiny_clip):
    assert CausalTextTower.of(load_clip(tiny_clip, device="cpu").model) is not None


def test_texts_of_very_different_lengths_in_one_batch_match_open_clip_encode_text(tiny_clip):
    encoder = load_clip(tiny_clip, device="cpu")
    fast = encoder.encode_text(TEXTS_OF_VERY_DIFFERENT_LENGTHS, batch_size=len(TEXTS_OF_VERY_DIFFERENT_LENGTHS))
    np.testing.assert_allclose(fast, open_clip_reference(encoder, TEXTS_OF_VERY_DIFFERENT_LENGTHS), atol=1e-5)


def test_sorting_into_small_batches_keeps_every_row_with_its_text(tiny_clip):
    encoder = load_clip(tiny_clip, device="cpu")
    texts = TEXTS_OF_VERY_DIFFERENT_LENGTHS * 3
    np.testing.assert_allclose(encoder.encode_text(texts, batch_size=2), open_clip_reference(encoder, texts),
                               atol=1e-5)


def bidirectional_encoder() -> ClipEncoder:
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16, vision_cfg={"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        text_cfg={"context_length": 77, "width": 32, "heads": 2, "layers": 1, "no_causal_mask": True},
    ).eval()
    return ClipEncoder(ClipSpec("bidirectional", "random"), model, None, open_clip.get_tokenizer("ViT-B-32"), "cpu",
                       random_weights=True)


def test_bidirectional_text_tower_falls_back_to_plain_encode_text():
    encoder = bidirectional_encoder()
    assert CausalTextTower.of(encoder.model) is None
    texts = TEXTS_OF_VERY_DIFFERENT_LENGTHS
    np.testing.assert_array_equal(encoder.encode_text(texts), open_clip_reference(encoder, texts))


def test_tokenize_gives_open_clip_ids_and_flags_only_texts_past_the_context(tiny_clip):
    encoder = load_clip(tiny_clip, device="cpu")
    fits_exactly = "dog " * 75  # 75 word tokens + start + end = 77
    one_too_many = "dog " * 76
    texts = ["a dog", fits_exactly, one_too_many]
    tokens, truncated = encoder.tokenize(texts)
    assert torch.equal(tokens, encoder.tokenizer(texts))
    assert truncated.tolist() == [False, False, True]


def test_progress_hears_of_every_text_once(tiny_clip):
    seen = []
    load_clip(tiny_clip, device="cpu").encode_text(TEXTS_OF_VERY_DIFFERENT_LENGTHS, batch_size=2,
                                                   progress=seen.append)
    assert seen == [2, 2, 1]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_cpu_is_a_one_line_error_naming_the_fix(tiny_clip, precision):
    with pytest.raises(OvmlError, match="needs a CUDA device.*--precision fp32") as info:
        load_clip(tiny_clip, device="cpu").encode_text(["a dog"], precision=precision)
    assert "\n" not in str(info.value)


def open_clip_token_outputs(encoder: ClipEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """Every position of open_clip's text tower after ln_final and the projection, unnormalised."""
    model = encoder.model
    with torch.inference_mode():
        x = model.token_embedding(tokens) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        return x @ model.text_projection


def test_token_features_are_open_clip_outputs_at_the_word_tokens_only(tiny_clip):
    encoder = load_clip(tiny_clip, device="cpu")
    tokens, _ = encoder.tokenize(TEXTS_OF_VERY_DIFFERENT_LENGTHS)
    features = encoder.encode_token_features(tokens, batch_size=2)
    reference = torch.nn.functional.normalize(open_clip_token_outputs(encoder, tokens), dim=-1)
    for row, words in enumerate(features):
        end = int(tokens[row].argmax())  # the end token: words are the positions between it and the start token
        assert words.dtype == np.float16 and words.shape == (end - 1, encoder.dim)
        np.testing.assert_allclose(words.astype(np.float32), reference[row, 1:end].numpy(), atol=2e-3)


def test_the_output_at_the_end_token_is_the_caption_embedding(tiny_clip):
    encoder = load_clip(tiny_clip, device="cpu")
    tokens, _ = encoder.tokenize(TEXTS_OF_VERY_DIFFERENT_LENGTHS)
    causal = CausalTextTower.of(encoder.model)
    positions = causal.pool_positions(tokens)
    with torch.inference_mode():
        every = causal.encode_all_positions(tokens, positions)
    at_end = torch.nn.functional.normalize(every[torch.arange(len(tokens)), positions], dim=-1).numpy()
    np.testing.assert_allclose(at_end, encoder.encode_tokens(tokens), atol=1e-5)


def test_token_features_of_a_bidirectional_tower_are_a_one_line_error():
    encoder = bidirectional_encoder()
    with pytest.raises(OvmlError, match="--local needs a causal"):
        encoder.encode_token_features(encoder.tokenize(["a dog"])[0])
