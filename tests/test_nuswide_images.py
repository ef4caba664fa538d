"""The NUS-WIDE zero-shot protocol end to end on a fixture in the release layout: train on the seen labels of the
train list's images, evaluate ZSL (unseen concepts) and GZSL (all) on the test list."""

import json

import helpers
import pytest
import torch

from ovml.pipeline.adapter import load_adapter
from ovml.pipeline.clip import load_clip
from ovml.pipeline.image_cache import read_image_cache
from ovml.pipeline.image_training import read_labelled_images
from ovml.stages.embed_images import EmbedImagesConfig, embed_images
from ovml.stages.evaluate import EvalConfig, evaluate
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter

SEEN = [tag for tag in helpers.NUS_TAGS if tag not in helpers.NUS_CONCEPTS]


@pytest.fixture
def nuswide_images_run(tmp_path, tiny_clip):
    torch.set_num_threads(1)
    root = helpers.nuswide_release(tmp_path / "nus")
    run_dir = tmp_path / "run"
    for split in ("test", "train"):
        embed_images(EmbedImagesConfig(run_dir=run_dir, clip=tiny_clip, device="cpu", dataset="nuswide",
                                       root=str(root), split=split, workers=0))
    train_adapter(TrainAdapterConfig(run_dir=run_dir, clip=tiny_clip, device="cpu", images="nuswide-train",
                                     captions=False, seen_labels="nuswide:seen", hidden=16, epochs=2, batch_size=2,
                                     val_fraction=0.0))
    return run_dir


def test_the_train_list_is_embedded_beside_the_test_list(nuswide_images_run):
    _, train_items, train_info = read_image_cache(nuswide_images_run / "images/nuswide-train")
    _, test_items, _ = read_image_cache(nuswide_images_run / "images/nuswide")
    assert train_items["image_id"].to_pylist() == [p.replace("\\", "/") for p in helpers.NUS_TRAIN_IMAGES]
    assert len(test_items) == len(helpers.NUS_IMAGES) - 1 and train_info["image_split"] == "train"


def test_training_sees_only_the_seen_labels_of_the_train_images(nuswide_images_run, tiny_clip):
    images = read_labelled_images(nuswide_images_run / "images/nuswide-train", SEEN, None, seed=0)
    _, config = load_adapter(nuswide_images_run / "adapter", tiny_clip, load_clip(tiny_clip).dim)
    assert images.positives() == [["dog"], ["sunset", "tree", "car"], ["sunset"]]
    assert config.vocabulary == SEEN and not set(config.vocabulary) & set(helpers.NUS_CONCEPTS)


def test_eval_ranks_the_unseen_concepts_in_zsl_and_every_label_in_gzsl(nuswide_images_run, tiny_clip):
    evaluate(EvalConfig(run_dir=nuswide_images_run, clip=tiny_clip, device="cpu", dataset="nuswide"))
    report = json.loads((nuswide_images_run / "eval/nuswide/report.json").read_text())
    assert report["protocols"]["ZSL"]["labels"] == helpers.NUS_CONCEPTS
    assert report["protocols"]["GZSL"]["labels"] == SEEN + helpers.NUS_CONCEPTS
    assert set(report["protocols"]["ZSL"]["metrics"]) == {"adapter", "zero-shot"}
