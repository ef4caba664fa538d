"""`ovml predict`: top labels per image for any label list, as a table or JSON, with one-line errors."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from helpers import build_adapter
from PIL import Image
from typer.testing import CliRunner

from ovml.cli import app

LABELS = "cat,dog,beach,snow,car"


@pytest.fixture
def photos(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = tmp_path / f"photo{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def run_dir(tmp_path, tiny_clip):
    run_dir = tmp_path / "run"
    build_adapter(run_dir, tiny_clip)
    return run_dir


def ovml_predict(*args):
    return CliRunner().invoke(app, ["predict", *map(str, args)])


def test_json_lists_top_k_labels_per_image_best_first(photos, run_dir, tiny_clip):
    result = ovml_predict(*photos, "--labels", LABELS, "--top-k", 3, "--json", "--run-dir", run_dir,
                          "--clip", tiny_clip)
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)
    assert [p["image"] for p in predictions] == photos
    for prediction in predictions:
        assert prediction["method"] == "adapter" and prediction["random_weights"] is True
        scores = [item["score"] for item in prediction["labels"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(0 <= s <= 1 for s in scores)
        assert {item["label"] for item in prediction["labels"]} <= set(LABELS.split(","))


def test_table_shows_each_image_and_its_labels(photos, run_dir, tiny_clip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["photo0.jpg", "--labels", LABELS, "--top-k", 2, "--run-dir", run_dir, "--clip", tiny_clip]
    result = ovml_predict(*common)
    assert result.exit_code == 0, result.output
    predictions = json.loads(ovml_predict(*common, "--json").stdout)
    assert "photo0.jpg" in result.stdout and "CLIP weights are random" in result.stdout
    for item in predictions[0]["labels"]:
        assert item["label"] in result.stdout and f"{item['score']:.4f}" in result.stdout


def test_zero_shot_needs_no_adapter_and_scores_are_cosines(photos, tmp_path, tiny_clip):
    result = ovml_predict(photos[0], "--labels", LABELS, "--zero-shot", "--json", "--run-dir", tmp_path / "empty",
                          "--clip", tiny_clip)
    assert result.exit_code == 0, result.output
    (prediction,) = json.loads(result.stdout)
    assert prediction["method"] == "zero-shot"
    assert all(-1 <= item["score"] <= 1 for item in prediction["labels"])


def test_untrained_adapter_ranks_labels_like_zero_shot(photos, tmp_path, tiny_clip):
    run_dir = tmp_path / "run"
    build_adapter(run_dir, tiny_clip, trained=False)
    common = ["--labels", LABELS, "--json", "--run-dir", run_dir, "--clip", tiny_clip]
    adapter = json.loads(ovml_predict(*photos, *common).stdout)
    zero_shot = json.loads(ovml_predict(*photos, *common, "--zero-shot").stdout)
    for a, z in zip(adapter, zero_shot, strict=True):
        assert [i["label"] for i in a["labels"]] == [i["label"] for i in z["labels"]]


def test_labels_file_gives_the_vocabulary(photos, run_dir, tiny_clip, tmp_path):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("tree\n\nriver\n")
    result = ovml_predict(photos[0], "--labels-file", labels_file, "--json", "--run-dir", run_dir, "--clip", tiny_clip)
    assert result.exit_code == 0, result.output
    assert sorted(i["label"] for i in json.loads(result.stdout)[0]["labels"]) == ["river", "tree"]


def test_labels_file_reads_like_generate_texts_label_files(photos, run_dir, tiny_clip, tmp_path):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# scene labels\ntree: trees, forest\nriver: stream\n")
    result = ovml_predict(photos[0], "--labels-file", labels_file, "--json", "--run-dir", run_dir, "--clip", tiny_clip)
    assert result.exit_code == 0, result.output
    assert sorted(i["label"] for i in json.loads(result.stdout)[0]["labels"]) == ["river", "tree"]


def _one_line_error(result, *fragments):
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr


def png_header_only(path, width: int, height: int) -> None:
    """A PNG that declares its size and holds no pixels: enough for Pillow's size check, a few bytes on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_a_one_line_error(run_dir, tiny_clip, tmp_path):
    png_header_only(tmp_path / "huge.png", 20000, 20000)
    result = ovml_predict(tmp_path / "huge.png", "--labels", LABELS, "--run-dir", run_dir, "--clip", tiny_clip)
    _one_line_error(result, "huge.png", "decompression-bomb limit")


def test_missing_image_is_named(run_dir, tiny_clip, tmp_path):
    result = ovml_predict(tmp_path / "nope.jpg", "--labels", LABELS, "--run-dir", run_dir, "--clip", tiny_clip)
    _one_line_error(result, "nope.jpg", "does not exist")


def test_corrupt_image_is_named(run_dir, tiny_clip, tmp_path):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    result = ovml_predict(corrupt, "--labels", LABELS, "--run-dir", run_dir, "--clip", tiny_clip)
    _one_line_error(result, "broken.jpg", "cannot read image")


def test_missing_adapter_says_to_run_train_adapter(photos, tmp_path, tiny_clip):
    result = ovml_predict(photos[0], "--labels", LABELS, "--run-dir", tmp_path / "empty", "--clip", tiny_clip)
    _one_line_error(result, "ovml train-adapter")


def test_labels_are_required(photos, run_dir, tiny_clip):
    result = ovml_predict(photos[0], "--run-dir", run_dir, "--clip", tiny_clip)
    _one_line_error(result, "--labels")


def test_predict_leaves_embed_texts_labels_folder_alone(photos, run_dir, tiny_clip):
    result = ovml_predict(*photos, "--labels", LABELS, "--run-dir", run_dir, "--clip", tiny_clip)
    assert result.exit_code == 0, result.output
    assert not (run_dir / "labels").exists()


def test_local_fuses_the_adapters_local_head_on_the_patches_as_eval_does(photos, tmp_path, tiny_clip):
    import torch

    from ovml.pipeline.adapter import LOCAL_WEIGHT
    from ovml.pipeline.clip import load_clip
    from ovml.pipeline.label_embeddings import label_embeddings

    run_dir = tmp_path / "local-run"
    model = build_adapter(run_dir, tiny_clip, local_pooling="top-k")
    result = ovml_predict(photos[0], "--labels", LABELS, "--top-k", 5, "--json", "--local", "--run-dir", run_dir,
                          "--clip", tiny_clip)
    assert result.exit_code == 0, result.output
    prediction = json.loads(result.stdout)[0]
    assert prediction["method"] == "adapter+local"
    encoder = load_clip(tiny_clip, "cpu")
    vectors, patches = encoder.encode_image_patches(encoder.preprocess(Image.open(photos[0]).convert("RGB"))[None])
    label_emb = torch.from_numpy(label_embeddings(encoder, LABELS.split(","), "pool"))
    with torch.inference_mode():
        fused = ((1 - LOCAL_WEIGHT) * model(torch.from_numpy(vectors), label_emb)
                 + LOCAL_WEIGHT * model.local_logits(model.local_features(torch.from_numpy(patches)), label_emb))
    expected = dict(zip(LABELS.split(","), torch.sigmoid(fused)[0].tolist(), strict=True))
    assert {item["label"]: item["score"] for item in prediction["labels"]} == pytest.approx(expected, abs=1e-5)


def test_local_with_an_adapter_without_a_local_head_is_a_one_line_error(photos, run_dir, tiny_clip):
    result = ovml_predict(photos[0], "--labels", LABELS, "--local", "--run-dir", run_dir, "--clip", tiny_clip)
    assert result.exit_code != 0
    assert "train-adapter --local" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
