"""embed-images end to end with the tiny CLIP model on fixtures in each dataset's real layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import helpers
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ovml.cli import app
from ovml.pipeline.clip import load_clip
from ovml.pipeline.datasets import read_dataset
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.image_cache import read_image_cache, read_patches
from ovml.pipeline.rundir import RunDir
from ovml.stages.embed_images import EmbedImagesConfig, embed_images


def config(tmp_path: Path, clip: str, dataset: str, root: Path, **overrides) -> EmbedImagesConfig:
    values = {"run_dir": tmp_path / "run", "clip": clip, "device": "cpu", "dataset": dataset, "root": str(root),
              "batch_size": 2, "workers": 0} | overrides
    return EmbedImagesConfig(**values)


def test_folder_cache_holds_the_readable_images_and_lists_the_rest_as_failures(tmp_path, tiny_clip):
    outcome = embed_images(config(tmp_path, tiny_clip, "folder", helpers.folder_release(tmp_path / "data")))
    vectors, items, info = read_image_cache(tmp_path / "run" / "images" / "folder")
    failures = pq.read_table(tmp_path / "run" / "images" / "folder" / "failures.parquet")
    assert items["image_id"].to_pylist() == ["imgs/a.jpg", "imgs/b.jpg"]
    assert sorted(failures["image_id"].to_pylist()) == ["imgs/broken.jpg", "imgs/missing.jpg"]
    assert all(failures["error"].to_pylist())
    assert vectors.shape == (2, load_clip(tiny_clip, "cpu").dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert (outcome.summary["images"], outcome.summary["failures"]) == (2, 2)
    assert (info["images"], info["failures"], info["labels"]) == (2, 2, ["cat", "dog", "sky"])


def test_each_index_row_is_the_embedding_of_its_items_row(tmp_path, tiny_clip):
    csv_file = helpers.folder_release(tmp_path / "data")
    embed_images(config(tmp_path, tiny_clip, "folder", csv_file, batch_size=3))
    vectors, items, _ = read_image_cache(tmp_path / "run" / "images" / "folder")
    encoder = load_clip(tiny_clip, "cpu")
    records = {r.image_id: r for r in read_dataset("folder", csv_file).records}
    for row, image_id in enumerate(items["image_id"].to_pylist()):
        expected = encoder.encode_image_batch(encoder.preprocess(records[image_id].open_image())[None])[0]
        assert np.allclose(vectors[row], expected, atol=1e-5)


def test_dataset_json_records_what_eval_needs(tmp_path, tiny_clip):
    embed_images(config(tmp_path, tiny_clip, "voc2007", helpers.voc2007_release(tmp_path / "voc")))
    info = json.loads((tmp_path / "run" / "images" / "voc2007" / "dataset.json").read_text())
    assert {"dataset", "root", "clip", "random_weights", "labels", "splits", "images", "failures"} <= set(info)
    assert (info["dataset"], info["clip"], info["random_weights"]) == ("voc2007", tiny_clip, True)
    assert info["splits"] == {"all": info["labels"]} and len(info["labels"]) == 20


def test_voc_items_keep_negatives_and_difficult_labels_and_the_corrupt_image_is_a_failure(tmp_path, tiny_clip):
    root = helpers.voc2007_release(tmp_path / "voc")
    outcome = embed_images(config(tmp_path, tiny_clip, "voc2007", root))
    _, items, _ = read_image_cache(tmp_path / "run" / "images" / "voc2007")
    expected = {r.image_id: r for r in read_dataset("voc2007", root).records}
    for item in items.to_pylist():
        record = expected[item["image_id"]]
        assert (item["positives"], item["negatives"], item["ignored"]) == (
            list(record.positives), list(record.negatives), list(record.ignored))
    assert outcome.summary["failures"] == 1
    assert pq.read_table(tmp_path / "run" / "images" / "voc2007" / "failures.parquet")["image_id"].to_pylist() == [
        "000004"]


def test_fashion_mnist_mosaics_embed_through_loader_workers(tmp_path, tiny_clip):
    root = helpers.fashion_mnist_release(tmp_path / "fm", helpers.FASHION_CLASSES)
    outcome = embed_images(config(tmp_path, tiny_clip, "fashion-mnist", root, mosaic=2, workers=2))
    vectors, items, _ = read_image_cache(tmp_path / "run" / "images" / "fashion-mnist")
    assert len(vectors) == len(items) == len(helpers.FASHION_CLASSES) // 4 == outcome.summary["images"]
    assert items["path"].to_pylist()[1] == "t10k-images-idx3-ubyte#mosaic-000001"
    assert not (tmp_path / "run" / "images" / "fashion-mnist" / "chunks").exists()


def test_fashion_mnist_train_split_gets_its_own_cache_beside_the_test_one(tmp_path, tiny_clip):
    root = helpers.fashion_mnist_release(tmp_path / "fm", helpers.FASHION_CLASSES)
    helpers.fashion_mnist_release(root, helpers.FASHION_CLASSES[:8], split="train")
    embed_images(config(tmp_path, tiny_clip, "fashion-mnist", root))
    outcome = embed_images(config(tmp_path, tiny_clip, "fashion-mnist", root, split="train"))
    _, test_items, test_info = read_image_cache(tmp_path / "run" / "images" / "fashion-mnist")
    _, items, info = read_image_cache(tmp_path / "run" / "images" / "fashion-mnist-train")
    record = RunDir(tmp_path / "run").stage_record("embed_images/fashion-mnist-train")
    assert outcome.summary["cache"] == "fashion-mnist-train" and len(items) == 2 and len(test_items) == 3
    assert items["path"].to_pylist()[1] == "train-images-idx3-ubyte#mosaic-000001"
    assert (info["image_split"], test_info["image_split"], record["params"]["split"]) == ("train", "t10k", "train")


def test_an_unknown_split_is_a_one_line_error(tmp_path, tiny_clip):
    root = helpers.fashion_mnist_release(tmp_path / "fm", helpers.FASHION_CLASSES)
    with pytest.raises(OvmlError, match="--split must be one of: t10k, train"):
        embed_images(config(tmp_path, tiny_clip, "fashion-mnist", root, split="val"))


def test_limit_embeds_only_the_first_n_images(tmp_path, tiny_clip):
    outcome = embed_images(config(tmp_path, tiny_clip, "folder", helpers.folder_release(tmp_path / "data"), limit=3))
    _, items, _ = read_image_cache(tmp_path / "run" / "images" / "folder")
    failures = pq.read_table(tmp_path / "run" / "images" / "folder" / "failures.parquet")
    assert items["image_id"].to_pylist() + failures["image_id"].to_pylist() == [
        "imgs/a.jpg", "imgs/b.jpg", "imgs/broken.jpg"]
    assert outcome.summary["images"] + outcome.summary["failures"] == 3


def test_second_run_with_the_same_inputs_is_skipped(tmp_path, tiny_clip):
    cfg = config(tmp_path, tiny_clip, "folder", helpers.folder_release(tmp_path / "data"))
    embed_images(cfg)
    assert embed_images(cfg).status == "skipped"


def test_an_interrupted_run_resumes_from_its_completed_chunks(tmp_path, tiny_clip, ctrl_c_raises):
    """A FIFO in place of the 4th image blocks the run there; Ctrl-C (SIGINT) then interrupts it for real."""
    data = tmp_path / "data"
    for i in range(5):
        helpers.write_jpeg(data / f"{i}.jpg", 30 * i)
    (data / "3.jpg").unlink()
    os.mkfifo(data / "3.jpg")
    (data / "labels.csv").write_text("path,labels\n" + "".join(f"{i}.jpg,l{i}\n" for i in range(5)))
    cfg = config(tmp_path, tiny_clip, "folder", data / "labels.csv", batch_size=1)
    staging = tmp_path / "run" / ".staging"  # where an unfinished cache is built, beside the finished ones

    helpers.ctrl_c_once_chunks_are_staged(staging)
    with pytest.raises(KeyboardInterrupt):
        embed_images(cfg)
    assert len(list(staging.rglob("chunk-*.parquet"))) == 3
    (data / "3.jpg").unlink()
    helpers.write_jpeg(data / "3.jpg", 99)

    outcome = embed_images(cfg)
    _, items, _ = read_image_cache(tmp_path / "run" / "images" / "folder")
    assert outcome.reason.startswith("resuming an interrupted run")
    assert outcome.summary["reused"] == 3
    assert items["image_id"].to_pylist() == [f"{i}.jpg" for i in range(5)]
    assert not (tmp_path / "run" / "images" / "folder" / "chunks").exists() and not list(staging.rglob("*.parquet"))


def test_non_positive_limit_is_a_user_error(tmp_path, tiny_clip):
    with pytest.raises(OvmlError, match="--limit"):
        embed_images(config(tmp_path, tiny_clip, "folder", helpers.folder_release(tmp_path / "data"), limit=0))


def test_cli_reports_a_wrong_layout_in_one_line_with_exit_code_2(tmp_path, tiny_clip):
    result = CliRunner().invoke(app, ["embed-images", "--dataset", "voc2007", "--root", str(tmp_path),
                                      "--clip", tiny_clip, "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "aeroplane_test.txt is missing" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("dataset, release", [("nuswide", helpers.nuswide_release),
                                              ("openimages", helpers.openimages_release),
                                              ("coco2014", helpers.coco2014_release)])
def test_every_release_layout_embeds_with_its_corrupt_image_counted_as_a_failure(tmp_path, tiny_clip, dataset,
                                                                                   release):
    root = release(tmp_path / dataset)
    outcome = embed_images(config(tmp_path, tiny_clip, dataset, root))
    _, items, info = read_image_cache(tmp_path / "run" / "images" / dataset)
    assert outcome.summary["failures"] == 1
    assert len(items) == len(read_dataset(dataset, root).records) - 1 == info["images"]


def test_local_caches_float16_patch_features_row_aligned_with_the_index(tmp_path, tiny_clip):
    csv_file = helpers.folder_release(tmp_path / "data")
    embed_images(config(tmp_path, tiny_clip, "folder", csv_file, local=True))
    directory = tmp_path / "run" / "images" / "folder"
    _, items, _ = read_image_cache(directory)
    patches = read_patches(directory)
    encoder = load_clip(tiny_clip, "cpu")
    records = {r.image_id: r for r in read_dataset("folder", csv_file).records}
    assert patches.dtype == np.float16 and patches.shape == (2, 16, encoder.dim)
    for row, image_id in enumerate(items["image_id"].to_pylist()):
        _, expected = encoder.encode_image_patches(encoder.preprocess(records[image_id].open_image())[None])
        np.testing.assert_allclose(patches[row], expected[0], atol=2e-3)


def test_without_local_no_patch_features_are_cached(tmp_path, tiny_clip):
    embed_images(config(tmp_path, tiny_clip, "folder", helpers.folder_release(tmp_path / "data")))
    assert read_patches(tmp_path / "run" / "images" / "folder") is None


def test_pq_store_keeps_product_quantizer_codes_that_decode_close_to_the_float16_patches(tmp_path, tiny_clip):
    csv_file = helpers.noise_folder(tmp_path / "data")
    embed_images(config(tmp_path / "half", tiny_clip, "folder", csv_file, local=True))
    embed_images(config(tmp_path / "pq", tiny_clip, "folder", csv_file, local=True, local_store="pq"))
    half = read_patches(tmp_path / "half/run/images/folder")
    coded = read_patches(tmp_path / "pq/run/images/folder")
    directory = tmp_path / "pq/run/images/folder"
    assert not (directory / "patches.npy").exists()
    codes = np.load(directory / "patches_pq.npy")
    assert codes.dtype == np.uint8 and codes.shape == (20, 16, half.shape[2] // 8)
    assert coded.shape == half.shape and len(coded) == 20
    decoded = coded[np.array([7, 0])]
    cosine = (decoded * half[[7, 0]].astype(np.float32)).sum(axis=-1)
    assert cosine.min() > 0.9 and np.allclose(np.linalg.norm(decoded, axis=-1), 1, atol=1e-5)


def test_pq_store_for_too_few_patches_is_a_one_line_error(tmp_path, tiny_clip):
    with pytest.raises(OvmlError, match="at least 256 patches"):
        embed_images(config(tmp_path, tiny_clip, "folder", helpers.folder_release(tmp_path / "data"), local=True,
                            local_store="pq"))


def test_an_unknown_local_store_is_a_one_line_error(tmp_path, tiny_clip):
    with pytest.raises(OvmlError, match="--local-store"):
        embed_images(config(tmp_path, tiny_clip, "folder", helpers.folder_release(tmp_path / "data"), local=True,
                            local_store="zip"))


def test_the_index_reads_back_the_vectors_written_to_it(tmp_path):
    from ovml.pipeline.image_cache import ivf_index, read_index, save_index, write_index

    vectors = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    write_index(tmp_path / "flat.faiss", vectors)
    save_index(tmp_path / "ivf.faiss", ivf_index(vectors, nlist=2))  # not flat: read through FAISS
    np.testing.assert_array_equal(read_index(tmp_path / "flat.faiss"), vectors)
    assert sorted(map(tuple, read_index(tmp_path / "ivf.faiss"))) == sorted(map(tuple, vectors))
