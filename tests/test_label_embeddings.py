"""Label embeddings: prompt-pool means, the single-template baseline, and a cache keyed by what made them."""

import numpy as np
import pytest

from ovml.pipeline.clip import TINY_ARCH, load_clip, save_random_checkpoint
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.label_embeddings import label_embeddings, load_templates

LABELS = ["dog", "beach", "traffic light"]


def test_prompt_pool_has_at_least_80_distinct_templates_each_with_one_slot():
    pool = load_templates("pool")
    assert len(pool) >= 80 and len(set(pool)) == len(pool)
    assert all(template.count("{}") == 1 for template in pool)


def test_single_template_is_a_photo_of_a_label():
    assert load_templates("single") == ["a photo of a {}."]


def test_unknown_template_kind_is_a_one_line_error():
    with pytest.raises(OvmlError, match="'many' is not one of pool, single"):
        load_templates("many")


def test_label_embedding_is_the_normalised_mean_of_its_template_embeddings(tiny_clip):
    encoder = load_clip(tiny_clip, device="cpu")
    pool = load_templates("pool")
    embeddings = label_embeddings(encoder, LABELS)
    for label, embedding in zip(LABELS, embeddings, strict=True):
        mean = encoder.encode_text([t.replace("{}", label) for t in pool]).mean(axis=0)
        np.testing.assert_allclose(embedding, mean / np.linalg.norm(mean), atol=1e-6)
    assert embeddings.dtype == np.float32 and embeddings.shape == (len(LABELS), encoder.dim)


def test_single_template_embedding_is_that_prompt_alone(tiny_clip):
    encoder = load_clip(tiny_clip, device="cpu")
    np.testing.assert_allclose(label_embeddings(encoder, LABELS, templates="single"),
                               encoder.encode_text([f"a photo of a {label}." for label in LABELS]), atol=1e-6)


def test_cache_is_reused_when_labels_templates_and_model_are_unchanged(tiny_clip, tmp_path):
    encoder = load_clip(tiny_clip, device="cpu")
    first = label_embeddings(encoder, LABELS, cache_dir=tmp_path, name="vocab")
    written = (tmp_path / "vocab.parquet").stat().st_mtime_ns
    again = label_embeddings(encoder, LABELS, cache_dir=tmp_path, name="vocab")
    assert (tmp_path / "vocab.parquet").stat().st_mtime_ns == written
    np.testing.assert_array_equal(first, again)


def test_cache_is_recomputed_when_the_labels_change(tiny_clip, tmp_path):
    encoder = load_clip(tiny_clip, device="cpu")
    label_embeddings(encoder, LABELS, cache_dir=tmp_path, name="vocab")
    fewer = label_embeddings(encoder, LABELS[:2], cache_dir=tmp_path, name="vocab")
    np.testing.assert_allclose(fewer, label_embeddings(encoder, LABELS[:2]), atol=1e-6)


def test_cache_is_recomputed_when_the_templates_change(tiny_clip, tmp_path):
    encoder = load_clip(tiny_clip, device="cpu")
    label_embeddings(encoder, LABELS, cache_dir=tmp_path, name="vocab")
    single = label_embeddings(encoder, LABELS, templates="single", cache_dir=tmp_path, name="vocab")
    np.testing.assert_allclose(single, label_embeddings(encoder, LABELS, templates="single"), atol=1e-6)


def test_cache_is_recomputed_when_the_model_changes(tiny_clip, tmp_path):
    other_weights = save_random_checkpoint(TINY_ARCH, tmp_path / "other.safetensors", seed=1)
    other = load_clip(f"{TINY_ARCH}:{other_weights}", device="cpu")
    label_embeddings(load_clip(tiny_clip, device="cpu"), LABELS, cache_dir=tmp_path, name="vocab")
    recomputed = label_embeddings(other, LABELS, cache_dir=tmp_path, name="vocab")
    np.testing.assert_allclose(recomputed, label_embeddings(other, LABELS), atol=1e-6)


def test_unnamed_caches_of_different_label_lists_live_side_by_side(tiny_clip, tmp_path):
    encoder = load_clip(tiny_clip, device="cpu")
    label_embeddings(encoder, LABELS, templates="single", cache_dir=tmp_path)
    label_embeddings(encoder, LABELS[:1], templates="single", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("labels-*.parquet"))) == 2


def test_unreadable_cache_file_is_rebuilt(tiny_clip, tmp_path):
    encoder = load_clip(tiny_clip, device="cpu")
    (tmp_path / "vocab.parquet").write_bytes(b"not parquet")
    rebuilt = label_embeddings(encoder, LABELS, templates="single", cache_dir=tmp_path, name="vocab")
    np.testing.assert_array_equal(rebuilt, label_embeddings(encoder, LABELS, templates="single",
                                                            cache_dir=tmp_path, name="vocab"))
