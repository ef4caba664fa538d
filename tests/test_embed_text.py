"""The embed-text stage: captions parts in, text_emb parts + labels/train.parquet out; skips, resumes, errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import embed_text_killed_after_its_first_part
from typer.testing import CliRunner

from ovml.cli import app
from ovml.pipeline.clip import load_clip
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.label_embeddings import label_embeddings
from ovml.pipeline.text_embeddings import read_text_embeddings, read_token_features
from ovml.stages.embed_text import EmbedTextConfig, embed_text

VOCABULARY = ["dog", "beach", "bicycle"]
PARTS = {
    "part-00000.parquet": [
        "a dog",
        "a dog runs along the beach at sunset while a man on a bicycle waves from the boardwalk",
        "bicycle",
    ],
    "part-00001.parquet": [
        "a muddy dog shakes itself dry next to a bicycle leaning against a beach hut, splashing a family "
        "eating sandwiches on striped towels while gulls circle overhead and waves roll in",
        "beach",
    ],
}
OVERLONG = "a beach with " + "a dog, a bicycle and a red umbrella, " * 15


def write_captions(run_dir, parts=PARTS, vocabulary=VOCABULARY):
    captions = run_dir / "captions"
    captions.mkdir(parents=True, exist_ok=True)
    for name, texts in parts.items():
        n = len(texts)
        pq.write_table(pa.table({
            "caption_id": [f"{name[5:10]}-{i}" for i in range(n)], "text": texts,
            "labels": [["dog"]] * n, "requested": [["dog"]] * n, "prompt_id": ["p0"] * n,
            "backend": ["llama-cpp"] * n, "model": ["smollm2"] * n, "seed": [0] * n,
        }), captions / name)
    (captions / "vocabulary.json").write_text(json.dumps({"labels": vocabulary, "synonyms": {}}))


def config(run_dir, clip, **overrides):
    return EmbedTextConfig(run_dir=run_dir, clip=clip, device="cpu", batch_size=4, templates="single",
                           **overrides)


def open_clip_reference(clip, texts):
    encoder = load_clip(clip, device="cpu")
    with torch.inference_mode():
        return encoder.model.encode_text(encoder.tokenizer(texts), normalize=True).numpy()


def test_every_stored_embedding_equals_open_clip_encode_text_of_its_caption(tiny_clip, tmp_path):
    write_captions(tmp_path)
    embed_text(config(tmp_path, tiny_clip))
    for name, texts in PARTS.items():
        stored = pq.read_table(tmp_path / "text_emb" / name)
        assert stored["caption_id"].to_pylist() == [f"{name[5:10]}-{i}" for i in range(len(texts))]
        np.testing.assert_allclose(np.array(stored["embedding"].to_pylist(), dtype=np.float32),
                                   open_clip_reference(tiny_clip, texts), atol=1e-5)


def test_text_emb_has_one_part_per_captions_part_with_the_same_name(tiny_clip, tmp_path):
    write_captions(tmp_path)
    embed_text(config(tmp_path, tiny_clip))
    assert sorted(p.name for p in (tmp_path / "text_emb").iterdir()) == sorted(PARTS)


def test_reading_back_gives_ids_in_part_order_and_one_contiguous_float32_matrix(tiny_clip, tmp_path):
    write_captions(tmp_path)
    embed_text(config(tmp_path, tiny_clip))
    ids, matrix = read_text_embeddings(tmp_path / "text_emb")
    all_texts = [text for texts in PARTS.values() for text in texts]
    assert ids.to_pylist() == [f"{name[5:10]}-{i}" for name, texts in PARTS.items() for i in range(len(texts))]
    assert matrix.dtype == np.float32 and matrix.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(matrix, open_clip_reference(tiny_clip, all_texts), atol=1e-5)


def test_float16_storage_keeps_half_precision_values_and_reads_back_as_float32(tiny_clip, tmp_path):
    write_captions(tmp_path / "f32")
    write_captions(tmp_path / "f16")
    embed_text(config(tmp_path / "f32", tiny_clip))
    embed_text(config(tmp_path / "f16", tiny_clip, store_dtype="float16"))
    part = pq.read_table(tmp_path / "f16" / "text_emb" / "part-00000.parquet")
    assert part.schema.field("embedding").type == pa.list_(pa.float16(), 64)
    _, full = read_text_embeddings(tmp_path / "f32" / "text_emb")
    _, half = read_text_embeddings(tmp_path / "f16" / "text_emb")
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=1e-3)
    np.testing.assert_array_equal(half, full.astype(np.float16).astype(np.float32))


def test_training_labels_are_label_embeddings_in_vocabulary_order(tiny_clip, tmp_path):
    write_captions(tmp_path)
    embed_text(config(tmp_path, tiny_clip))
    table = pq.read_table(tmp_path / "labels" / "train.parquet")
    assert table["label"].to_pylist() == VOCABULARY
    expected = label_embeddings(load_clip(tiny_clip, device="cpu"), VOCABULARY, templates="single")
    np.testing.assert_allclose(np.array(table["embedding"].to_pylist(), dtype=np.float32), expected, atol=1e-6)


def test_summary_reports_texts_dim_dtype_and_speed(tiny_clip, tmp_path):
    write_captions(tmp_path)
    summary = embed_text(config(tmp_path, tiny_clip, store_dtype="float16")).summary
    assert summary["texts"] == sum(len(texts) for texts in PARTS.values())
    assert summary["truncated"] == 0 and summary["dim"] == 64 and summary["store_dtype"] == "float16"
    assert summary["texts_per_s"] > 0


def test_second_run_with_unchanged_captions_and_model_is_skipped(tiny_clip, tmp_path):
    write_captions(tmp_path)
    assert embed_text(config(tmp_path, tiny_clip)).status == "ran"
    assert embed_text(config(tmp_path, tiny_clip)).status == "skipped"


def test_changed_captions_are_embedded_again(tiny_clip, tmp_path):
    write_captions(tmp_path)
    embed_text(config(tmp_path, tiny_clip))
    write_captions(tmp_path, {"part-00000.parquet": ["a bicycle"]})
    outcome = embed_text(config(tmp_path, tiny_clip))
    assert outcome.status == "ran" and "inputs changed" in outcome.reason
    _, matrix = read_text_embeddings(tmp_path / "text_emb")
    np.testing.assert_allclose(matrix[0], open_clip_reference(tiny_clip, ["a bicycle"])[0], atol=1e-5)


def test_interrupted_run_resumes_keeping_finished_parts_and_writing_the_missing_one(tiny_clip, tmp_path,
                                                                                 monkeypatch):
    write_captions(tmp_path / "straight")
    embed_text(config(tmp_path / "straight", tiny_clip))
    write_captions(tmp_path / "killed")
    embed_text_killed_after_its_first_part(config(tmp_path / "killed", tiny_clip), monkeypatch)
    assert not (tmp_path / "killed" / "text_emb").exists()  # nothing half-made where readers look
    outcome = embed_text(config(tmp_path / "killed", tiny_clip))
    assert outcome.reason.startswith("resuming an interrupted run") and outcome.summary["resumed_parts"] == 1
    assert [p.read_bytes() for p in sorted((tmp_path / "killed" / "text_emb").iterdir())] == \
        [p.read_bytes() for p in sorted((tmp_path / "straight" / "text_emb").iterdir())]


def test_same_config_writes_byte_identical_parts(tiny_clip, tmp_path):
    for run in ("a", "b"):
        write_captions(tmp_path / run)
        embed_text(config(tmp_path / run, tiny_clip))
    for rel in [*(f"text_emb/{name}" for name in PARTS), "labels/train.parquet"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_caption_longer_than_the_context_is_truncated_and_counted(tiny_clip, tmp_path):
    write_captions(tmp_path, {"part-00000.parquet": ["a dog", OVERLONG]})
    summary = embed_text(config(tmp_path, tiny_clip)).summary
    assert summary["truncated"] == 1
    _, matrix = read_text_embeddings(tmp_path / "text_emb")
    np.testing.assert_allclose(matrix, open_clip_reference(tiny_clip, ["a dog", OVERLONG]), atol=1e-5)


def test_missing_captions_folder_names_the_stage_to_run(tiny_clip, tmp_path):
    with pytest.raises(OvmlError, match="captions is missing; run `ovml generate-text"):
        embed_text(config(tmp_path, tiny_clip))


def test_empty_captions_folder_names_the_stage_to_run(tiny_clip, tmp_path):
    (tmp_path / "captions").mkdir()
    with pytest.raises(OvmlError, match="run `ovml generate-text"):
        embed_text(config(tmp_path, tiny_clip))


def test_captions_folder_without_parts_names_the_stage_to_run(tiny_clip, tmp_path):
    write_captions(tmp_path, parts={})
    with pytest.raises(OvmlError, match="no part-\\*.parquet files; run `ovml generate-text"):
        embed_text(config(tmp_path, tiny_clip))


def test_missing_vocabulary_names_the_stage_to_run(tiny_clip, tmp_path):
    write_captions(tmp_path)
    (tmp_path / "captions" / "vocabulary.json").unlink()
    with pytest.raises(OvmlError, match="vocabulary.json is missing; run `ovml generate-text"):
        embed_text(config(tmp_path, tiny_clip))


def test_half_precision_on_cpu_fails_before_anything_is_recorded(tiny_clip, tmp_path):
    write_captions(tmp_path)
    with pytest.raises(OvmlError, match="needs a CUDA device"):
        embed_text(config(tmp_path, tiny_clip, precision="fp16"))
    assert not (tmp_path / "manifest.json").exists()


def test_cli_reports_missing_captions_in_one_line_with_exit_code_2(tiny_clip, tmp_path):
    result = CliRunner().invoke(app, ["embed-text", "--run-dir", str(tmp_path), "--clip", tiny_clip])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error:") and "generate-text" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_topped_up_caption_pool_embeds_only_its_new_parts(tiny_clip, tmp_path):
    write_captions(tmp_path)
    embed_text(config(tmp_path, tiny_clip))
    before = {p.name: p.read_bytes() for p in (tmp_path / "text_emb").iterdir()}
    write_captions(tmp_path, {"part-00007.parquet": ["a kite over the beach"]})
    outcome = embed_text(config(tmp_path, tiny_clip))
    assert outcome.summary["reused_parts"] == len(before) and outcome.summary["texts_per_s"] is not None
    after = {p.name: p.read_bytes() for p in (tmp_path / "text_emb").iterdir()}
    assert {name: after[name] for name in before} == before and "part-00007.parquet" in after


def test_captions_set_aside_in_the_archive_are_neither_read_nor_fingerprinted(tiny_clip, tmp_path):
    write_captions(tmp_path)
    first = embed_text(config(tmp_path, tiny_clip))
    archived = tmp_path / "captions" / "archive" / "0123456789abcdef" / "part-00000.parquet"
    archived.parent.mkdir(parents=True)
    archived.write_bytes(b"not even parquet")
    assert embed_text(config(tmp_path, tiny_clip)).status == "skipped"
    assert embed_text(config(tmp_path, tiny_clip, force=True)).summary["texts"] == first.summary["texts"]


def test_local_stores_word_token_features_beside_the_same_caption_embeddings(tiny_clip, tmp_path):
    write_captions(tmp_path / "global")
    write_captions(tmp_path / "local")
    embed_text(config(tmp_path / "global", tiny_clip))
    embed_text(config(tmp_path / "local", tiny_clip, local=True))
    encoder = load_clip(tiny_clip, device="cpu")
    for name, texts in PARTS.items():
        plain = pq.read_table(tmp_path / "global/text_emb" / name)
        local = pq.read_table(tmp_path / "local/text_emb" / name)
        assert "tokens" not in plain.column_names
        assert local["embedding"].equals(plain["embedding"])
        tokens, _ = encoder.tokenize(texts)
        expected = encoder.encode_token_features(tokens)
        for stored, words in zip(local["tokens"].to_pylist(), expected, strict=True):
            np.testing.assert_array_equal(np.array(stored, dtype=np.float16), words)


def test_token_features_read_back_in_part_order_and_pad_per_batch(tiny_clip, tmp_path):
    write_captions(tmp_path)
    embed_text(config(tmp_path, tiny_clip, local=True))
    features = read_token_features(tmp_path / "text_emb")
    encoder = load_clip(tiny_clip, device="cpu")
    all_texts = [text for texts in PARTS.values() for text in texts]
    lengths = [len(words) for words in encoder.encode_token_features(encoder.tokenize(all_texts)[0])]
    assert np.diff(features.offsets).tolist() == lengths
    padded, real = features.padded(np.array([2, 0]))
    assert padded.shape == (2, max(lengths[2], lengths[0]), encoder.dim)
    assert real.sum(axis=1).tolist() == [lengths[2], lengths[0]]
    np.testing.assert_array_equal(padded[1, :lengths[0]], features.values[:lengths[0]])
    assert not padded[~real].any()
