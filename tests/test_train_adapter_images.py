"""train-adapter --images: labelled images of the seen labels as training data, alone or beside captions."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import unit
from safetensors.torch import load_file
from typer.testing import CliRunner

from ovml.cli import app
from ovml.pipeline import atomic
from ovml.pipeline.adapter import load_adapter
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.image_cache import FAILURES_SCHEMA, ITEMS_SCHEMA, write_image_cache
from ovml.pipeline.image_training import pseudo_labels, read_labelled_images
from ovml.pipeline.metrics import average_precision, mean_average_precision
from ovml.pipeline.rundir import RunDir
from ovml.pipeline.text_embeddings import embedding_array, write_text_embeddings
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter

CLIP = "sim:unit-test"
LABELS = [f"label{i}" for i in range(6)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only adds contention


def label_vectors(dim: int = 16) -> np.ndarray:
    return unit(np.random.default_rng(0).normal(size=(len(LABELS), dim)))


def image_vectors(targets: np.ndarray, label_emb: np.ndarray, rng) -> np.ndarray:
    """Images sit away from their captions (the modality gap): the text side with half its dimensions sign-flipped,
    plus noise."""
    flip = np.where(np.arange(label_emb.shape[1]) % 2, -1.0, 1.0)
    return unit((targets @ label_emb) * flip + 0.4 * rng.normal(size=(len(targets), label_emb.shape[1])))


def caption_run(root: Path, label_emb: np.ndarray, vocabulary: list[str], n: int = 300) -> Path:
    """captions, vocabulary, text_emb and labels/train.parquet as generate-text and embed-text leave them."""
    rng = np.random.default_rng(1)
    targets = rng.random((n, len(vocabulary))) < 0.3
    ids = [f"c{i:05d}" for i in range(n)]
    atomic.write_parquet(root / "captions/part-00000.parquet", pa.table({
        "caption_id": ids, "labels": [[vocabulary[j] for j in np.flatnonzero(row)] for row in targets]}))
    atomic.write_json(root / "captions/vocabulary.json", {"labels": vocabulary, "synonyms": {}})
    text = unit(targets @ label_emb[:len(vocabulary)] + 0.5 * rng.normal(size=(n, label_emb.shape[1])))
    write_text_embeddings(root / "text_emb/part-00000.parquet", ids, text, "float32")
    atomic.write_parquet(root / "labels/train.parquet", pa.table({
        "label": vocabulary, "embedding": embedding_array(label_emb[:len(vocabulary)])}))
    return root


def image_cache(run_dir: Path, name: str, label_emb: np.ndarray, n: int = 400, seed: int = 2, clip: str = CLIP,
                labels: list[str] = LABELS) -> np.ndarray:
    """images/<name>/ as embed-images writes it; returns the positives matrix."""
    rng = np.random.default_rng(seed)
    targets = rng.random((n, len(labels))) < 0.3
    items = pa.Table.from_pylist([
        {"row": i, "image_id": f"img{i}", "path": f"/data/img{i}.jpg",
         "positives": [labels[j] for j in np.flatnonzero(row)], "negatives": None, "ignored": []}
        for i, row in enumerate(targets)], schema=ITEMS_SCHEMA)
    write_image_cache(run_dir / "images" / name, image_vectors(targets, label_emb, rng), items,
                      FAILURES_SCHEMA.empty_table(), {
                          "dataset": "folder", "root": "/data", "clip": clip, "random_weights": False,
                          "labels": labels, "splits": {"all": labels, "seen": labels[:4]}, "images": n,
                          "failures": 0, "image_split": "train"})
    return targets


def config(run_dir: Path, **overrides) -> TrainAdapterConfig:
    values = {"run_dir": run_dir, "clip": CLIP, "device": "cpu", "hidden": 32, "epochs": 4, "batch_size": 64,
              "patience": 10}
    return TrainAdapterConfig(**(values | overrides))


def test_the_seen_label_restriction_drops_every_other_label_from_the_images(tmp_path):
    targets = image_cache(tmp_path, "train", label_vectors())
    images = read_labelled_images(tmp_path / "images" / "train", LABELS[:4], None, seed=0)
    expected = [[LABELS[j] for j in np.flatnonzero(row[:4])] for row in targets]
    assert images.positives() == expected and images.seen == LABELS[:4]


def test_images_per_label_samples_that_many_positives_of_each_seen_label(tmp_path):
    image_cache(tmp_path, "train", label_vectors())
    images = read_labelled_images(tmp_path / "images" / "train", LABELS[:4], 5, seed=0)
    counts = [sum(label in row for row in images.positives()) for label in LABELS[:4]]
    assert min(counts) >= 5 and len(images.rows) <= 20


def test_an_adapter_trained_with_images_keeps_unseen_labels_out_of_its_vocabulary(tmp_path):
    label_emb = label_vectors()
    caption_run(tmp_path, label_emb, LABELS[:4])
    image_cache(tmp_path, "train", label_emb)
    train_adapter(config(tmp_path, images="train"))
    _, adapter = load_adapter(tmp_path / "adapter", CLIP, 16)
    assert adapter.vocabulary == LABELS[:4]
    assert adapter.training["sources"] == {"captions": 300, "images": {
        "cache": "train", "dataset": "folder", "split": "train", "images": 400, "seen_labels": 4, "per_label": None}}


def test_the_manifest_records_the_fingerprint_of_the_image_cache_it_learned_from(tmp_path):
    label_emb = label_vectors()
    caption_run(tmp_path, label_emb, LABELS[:4])
    image_cache(tmp_path, "train", label_emb)
    train_adapter(config(tmp_path, images="train"))
    inputs = RunDir(tmp_path).stage_record("train_adapter")["inputs"]
    index = tmp_path / "images/train/index.faiss"
    assert inputs["images/train/index.faiss"] == atomic.sha256_file(index)
    image_cache(tmp_path, "train", label_emb, seed=3)
    assert train_adapter(config(tmp_path, images="train")).reason.startswith("inputs changed: images/train/")


def test_images_and_captions_score_new_images_better_than_captions_alone(tmp_path):
    label_emb = label_vectors()
    for name in ("captions", "both"):
        caption_run(tmp_path / name, label_emb, LABELS)
    image_cache(tmp_path / "both", "train", label_emb)
    train_adapter(config(tmp_path / "captions", epochs=30))
    train_adapter(config(tmp_path / "both", images="train", epochs=30))
    rng = np.random.default_rng(7)
    test_targets = rng.random((300, len(LABELS))) < 0.3
    test_images = torch.from_numpy(image_vectors(test_targets, label_emb, rng))

    def image_map(run: str) -> float:
        model, _ = load_adapter(tmp_path / run / "adapter", CLIP, 16)
        scores = model.score(test_images, torch.from_numpy(label_emb))
        return mean_average_precision(average_precision(scores, test_targets))

    assert image_map("both") > image_map("captions") + 0.05


def test_noise_is_never_added_to_images(tmp_path, tiny_clip):
    from ovml.pipeline.clip import load_clip

    dim = load_clip(tiny_clip, "cpu").dim
    for name, noise in (("quiet", 0.0), ("noisy", 0.5)):
        image_cache(tmp_path / name, "train", label_vectors(dim), clip=tiny_clip)
        train_adapter(config(tmp_path / name, clip=tiny_clip, images="train", captions=False, noise=noise,
                             seen_labels="folder:seen"))
    quiet, noisy = (load_file(str(tmp_path / name / "adapter/model.safetensors")) for name in ("quiet", "noisy"))
    assert all(torch.equal(quiet[k], noisy[k]) for k in quiet)


def test_same_config_and_seed_give_identical_adapters(tmp_path):
    label_emb = label_vectors()
    for name in ("a", "b"):
        caption_run(tmp_path / name, label_emb, LABELS[:4])
        image_cache(tmp_path / name, "train", label_emb)
        train_adapter(config(tmp_path / name, images="train", images_per_label=20, seed=3))
    a, b = ((tmp_path / name / "adapter/model.safetensors").read_bytes() for name in ("a", "b"))
    assert a == b


def test_images_alone_take_their_seen_labels_from_a_dataset_split_and_embed_them_with_clip(tmp_path, tiny_clip):
    from ovml.pipeline.clip import load_clip

    dim = load_clip(tiny_clip, "cpu").dim
    image_cache(tmp_path, "train", label_vectors(dim), clip=tiny_clip)
    train_adapter(config(tmp_path, clip=tiny_clip, images="train", captions=False, seen_labels="folder:seen"))
    _, adapter = load_adapter(tmp_path / "adapter", tiny_clip, dim)
    assert adapter.vocabulary == LABELS[:4] and "captions" not in adapter.training["sources"]


def test_a_seen_label_file_is_an_input_of_the_stage(tmp_path):
    label_emb = label_vectors()
    caption_run(tmp_path, label_emb, LABELS[:4])
    image_cache(tmp_path, "train", label_emb)
    (tmp_path / "seen.txt").write_text("label0\nlabel1\n")
    train_adapter(config(tmp_path, images="train", seen_labels=str(tmp_path / "seen.txt")))
    assert "seen.txt" in RunDir(tmp_path).stage_record("train_adapter")["inputs"]


@pytest.mark.parametrize("flags, message", [
    (["--no-captions"], "add --images CACHE"),
    (["--images-per-label", "3"], "add --images CACHE"),
    (["--images", "train", "--images-per-label", "0"], "--images-per-label must be at least 1"),
    (["--images", "absent"], "holds no image cache; run `ovml embed-images`"),
    (["--images", "train", "--seen-labels", "nuswide:seen"], "--seen-labels nuswide:seen: the image cache is folder"),
    (["--images", "train", "--local"], "drop --local (or --images"),
    (["--unlabelled", "train", "--head", "query"], "drop --head query or --unlabelled"),
])
def test_bad_image_flags_are_one_line_errors_with_exit_code_2(tmp_path, flags, message):
    label_emb = label_vectors()
    caption_run(tmp_path, label_emb, LABELS[:4])
    image_cache(tmp_path, "train", label_emb)
    result = CliRunner().invoke(app, ["train-adapter", "--run-dir", str(tmp_path), "--clip", CLIP, *flags])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "adapter").exists()


def test_images_of_another_clip_model_are_refused(tmp_path):
    label_emb = label_vectors()
    caption_run(tmp_path, label_emb, LABELS[:4])
    image_cache(tmp_path, "train", label_emb, clip="other:model")
    with pytest.raises(OvmlError, match="made with CLIP 'other:model'"):
        train_adapter(config(tmp_path, images="train"))



def test_pseudo_labels_mark_each_labels_upper_score_mode():
    rng = np.random.default_rng(0)
    truth = rng.random((500, 3)) < [0.1, 0.3, 0.6]
    scores = np.where(truth, 4.0, -1.0) + rng.normal(size=truth.shape) * [0.5, 1.0, 0.8]
    assert (pseudo_labels(scores) == truth).mean(axis=0).min() > 0.97


def test_unlabelled_images_join_training_with_their_labels_ignored(tmp_path):
    label_emb = label_vectors()
    for name in ("labelled", "bare"):
        caption_run(tmp_path / name, label_emb, LABELS[:4])
        image_cache(tmp_path / name, "train", label_emb)
    items = atomic.read_parquet(tmp_path / "bare/images/train/items.parquet", "")
    atomic.write_parquet(tmp_path / "bare/images/train/items.parquet", items.set_column(
        items.schema.get_field_index("positives"), "positives", pa.array([[]] * len(items), pa.list_(pa.string()))))
    for name in ("labelled", "bare"):
        outcome = train_adapter(config(tmp_path / name, unlabelled="train"))
    labelled, bare = ((tmp_path / name / "adapter/model.safetensors").read_bytes() for name in ("labelled", "bare"))
    sources = load_adapter(tmp_path / "bare/adapter", CLIP, 16)[1].training["sources"]
    assert labelled == bare and outcome.summary["images"] == 400
    assert (sources["unlabelled"]["images"], sources["captions"]) == (400, 300)
    assert "images/train/index.faiss" in RunDir(tmp_path / "bare").stage_record("train_adapter")["inputs"]
