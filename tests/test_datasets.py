"""Dataset readers, each on a tiny copy of the dataset's real release layout written by the test.

The `*_release` builders are shared with tests/test_embed_images.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import (
    COCO_ANNOTATIONS,
    COCO_CATEGORIES,
    FASHION_CLASSES,
    NUS_CONCEPT_ROWS,
    NUS_CONCEPTS,
    NUS_IMAGES,
    NUS_TAG_ROWS,
    NUS_TAGS,
    OI_ANNOTATIONS,
    OI_NAMES,
    OI_TRAINABLE,
    OI_UNSEEN_LIST,
    VOC_MARKS,
    coco2014_release,
    fashion_mnist_release,
    folder_release,
    nuswide_release,
    openimages_release,
    voc2007_release,
)

from ovml.pipeline.datasets import FASHION_MNIST_CLASSES, VOC_CLASSES, read_dataset
from ovml.pipeline.errors import OvmlError

# --- NUS-WIDE ------------------------------------------------------------------------------------------


def test_nuswide_splits_are_tags_minus_concepts_concepts_and_both(tmp_path):
    dataset = read_dataset("nuswide", nuswide_release(tmp_path), mosaic=2)
    seen = [t for t in NUS_TAGS if t not in NUS_CONCEPTS]
    assert dataset.splits == {"seen": seen, "unseen": NUS_CONCEPTS, "all": seen + NUS_CONCEPTS}
    assert dataset.labels == seen + NUS_CONCEPTS


def test_nuswide_positives_come_from_tags_for_seen_and_ground_truth_for_concepts(tmp_path):
    dataset = read_dataset("nuswide", nuswide_release(tmp_path))
    for record, tags, concepts in zip(dataset.records, NUS_TAG_ROWS, NUS_CONCEPT_ROWS, strict=True):
        expected = {t for t, on in zip(NUS_TAGS, tags, strict=True) if on and t not in NUS_CONCEPTS}
        expected |= {c for c, on in zip(NUS_CONCEPTS, concepts, strict=True) if on}
        assert set(record.positives) == expected
        assert record.negatives is None and record.ignored == ()


def test_nuswide_windows_image_paths_resolve_under_flickr(tmp_path):
    dataset = read_dataset("nuswide", nuswide_release(tmp_path))
    assert [Path(r.path) for r in dataset.records] == [
        tmp_path / "Flickr" / p.replace("\\", "/") for p in NUS_IMAGES]
    assert Path(dataset.records[0].path).is_file()


def test_nuswide_missing_tag_matrix_is_a_one_line_error_naming_it(tmp_path):
    nuswide_release(tmp_path)
    (tmp_path / "NUS_WID_Tags" / "Test_Tags1k.dat").unlink()
    with pytest.raises(OvmlError, match="Test_Tags1k.dat is missing") as error:
        read_dataset("nuswide", tmp_path)
    assert "\n" not in str(error.value) and "Concepts81.txt" in str(error.value)


# --- Open Images 2018_04 -------------------------------------------------------------------------------


def test_openimages_confidence_one_is_positive_zero_negative_absent_unknown(tmp_path):
    dataset = read_dataset("openimages", openimages_release(tmp_path))
    by_id = {r.image_id: r for r in dataset.records}
    for image_id, record in by_id.items():
        annotated = [(OI_NAMES[mid], c) for image, mid, c in OI_ANNOTATIONS if image == image_id]
        assert set(record.positives) == {name for name, c in annotated if c == 1}
        assert set(record.negatives) == {name for name, c in annotated if c == 0}
        assert record.path == str(tmp_path / "test" / f"{image_id}.jpg")


def test_openimages_top_unseen_indices_resolve_through_the_unseen_list(tmp_path):
    dataset = read_dataset("openimages", openimages_release(tmp_path, top_unseen="1\n0\n"))
    seen = [OI_NAMES[m] for m in OI_TRAINABLE]
    unseen = [OI_NAMES[OI_UNSEEN_LIST[1]], OI_NAMES[OI_UNSEEN_LIST[0]]]
    assert dataset.splits == {"seen": seen, "unseen": unseen, "all": seen + unseen}


def test_openimages_top_unseen_may_list_mids(tmp_path):
    dataset = read_dataset("openimages", openimages_release(tmp_path, top_unseen="/m/05\n"))
    assert dataset.splits["unseen"] == [OI_NAMES["/m/05"]]


def test_openimages_indices_without_the_text_unseen_list_explain_the_pickle_conversion(tmp_path):
    openimages_release(tmp_path)
    (tmp_path / "2018_04" / "unseen_labels.txt").unlink()
    with pytest.raises(OvmlError, match="unseen_labels.txt") as error:
        read_dataset("openimages", tmp_path)
    assert "\n" not in str(error.value)


def test_openimages_missing_annotations_is_a_layout_error(tmp_path):
    openimages_release(tmp_path)
    (tmp_path / "2018_04" / "test" / "test-annotations-human-imagelabels.csv").unlink()
    with pytest.raises(OvmlError, match="test-annotations-human-imagelabels.csv is missing"):
        read_dataset("openimages", tmp_path)


# --- COCO 2014 -----------------------------------------------------------------------------------------


def test_coco_labels_follow_category_ids_and_positives_follow_instances(tmp_path):
    dataset = read_dataset("coco2014", coco2014_release(tmp_path))
    assert dataset.labels == [c["name"] for c in sorted(COCO_CATEGORIES, key=lambda c: c["id"])]
    name = {c["id"]: c["name"] for c in COCO_CATEGORIES}
    for record in dataset.records:
        assert set(record.positives) == {name[c] for i, c in COCO_ANNOTATIONS if str(i) == record.image_id}
        assert record.negatives is None
    assert dataset.splits == {"all": dataset.labels}


def test_coco_without_the_image_folder_is_a_layout_error(tmp_path):
    coco2014_release(tmp_path)
    for p in (tmp_path / "val2014").iterdir():
        p.unlink()
    (tmp_path / "val2014").rmdir()
    with pytest.raises(OvmlError, match="val2014 is missing"):
        read_dataset("coco2014", tmp_path)


# --- Pascal VOC 2007 -----------------------------------------------------------------------------------


def test_voc_one_is_positive_minus_one_negative_zero_difficult_ignored(tmp_path):
    dataset = read_dataset("voc2007", voc2007_release(tmp_path))
    assert [r.image_id for r in dataset.records] == list(VOC_MARKS)
    for record in dataset.records:
        marks = {VOC_CLASSES[cls]: mark for cls, mark in VOC_MARKS[record.image_id].items()}
        assert set(record.positives) == {label for label, m in marks.items() if m == "1"}
        assert set(record.ignored) == {label for label, m in marks.items() if m == "0"}
        assert set(record.negatives) == set(dataset.labels) - set(marks)


def test_voc_has_twenty_readable_labels_and_accepts_the_voc2007_folder_as_root(tmp_path):
    voc2007_release(tmp_path)
    dataset = read_dataset("voc2007", tmp_path / "VOC2007")
    assert len(dataset.labels) == 20 and "potted plant" in dataset.labels
    assert Path(dataset.records[0].path) == tmp_path / "VOC2007" / "JPEGImages" / "000001.jpg"


def test_voc_missing_class_file_is_a_one_line_error_naming_it(tmp_path):
    voc2007_release(tmp_path)
    (tmp_path / "VOC2007" / "ImageSets" / "Main" / "sofa_test.txt").unlink()
    with pytest.raises(OvmlError, match="sofa_test.txt is missing") as error:
        read_dataset("voc2007", tmp_path)
    assert "\n" not in str(error.value)


# --- Fashion-MNIST -------------------------------------------------------------------------------------


def test_fashion_mnist_mosaics_are_labelled_with_the_classes_of_their_tiles(tmp_path):
    dataset = read_dataset("fashion-mnist", fashion_mnist_release(tmp_path, FASHION_CLASSES), mosaic=2)
    assert len(dataset.records) == len(FASHION_CLASSES) // 4
    for record in dataset.records:
        pixels = np.asarray(record.open_image().convert("L"))
        assert pixels.shape == (56, 56)
        tiles = {int(pixels[y, x]) for y in (0, 28) for x in (0, 28)}
        assert set(record.positives) == {FASHION_MNIST_CLASSES[(v - 5) // 10] for v in tiles}


def test_fashion_mnist_mosaics_are_deterministic_and_named_after_the_idx_file(tmp_path):
    root = fashion_mnist_release(tmp_path, FASHION_CLASSES)
    first, second = read_dataset("fashion-mnist", root, mosaic=3), read_dataset("fashion-mnist", root, mosaic=3)
    assert [r.positives for r in first.records] == [r.positives for r in second.records]
    assert first.records[0].path == "t10k-images-idx3-ubyte#mosaic-000000"
    assert np.array_equal(np.asarray(first.records[0].open_image()), np.asarray(second.records[0].open_image()))
    assert first.labels == FASHION_MNIST_CLASSES


def test_fashion_mnist_without_idx_files_is_a_layout_error(tmp_path):
    with pytest.raises(OvmlError, match="t10k-images-idx3-ubyte.gz is missing"):
        read_dataset("fashion-mnist", tmp_path)


# --- folder --------------------------------------------------------------------------------------------


def test_folder_labels_split_on_bars_and_paths_are_relative_to_the_csv(tmp_path):
    dataset = read_dataset("folder", folder_release(tmp_path))
    assert dataset.labels == ["cat", "dog", "sky"]
    assert [(r.image_id, r.positives) for r in dataset.records] == [
        ("imgs/a.jpg", ("cat", "dog")), ("imgs/b.jpg", ("sky",)), ("imgs/broken.jpg", ("cat",)),
        ("imgs/missing.jpg", ())]
    assert Path(dataset.records[0].path) == tmp_path / "imgs" / "a.jpg"


def test_folder_csv_without_the_header_is_a_one_line_error(tmp_path):
    (tmp_path / "labels.csv").write_text("a.jpg,cat\n")
    with pytest.raises(OvmlError, match="path,labels") as error:
        read_dataset("folder", tmp_path / "labels.csv")
    assert "\n" not in str(error.value)


def test_folder_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    csv_file = folder_release(tmp_path)
    plain = read_dataset("folder", csv_file)
    csv_file.write_bytes(b"\xef\xbb\xbf" + csv_file.read_bytes())
    assert read_dataset("folder", csv_file).records == plain.records


def test_folder_csv_that_is_not_utf8_is_a_one_line_error(tmp_path):
    (tmp_path / "labels.csv").write_bytes("path,labels\ncaf\u00e9.jpg,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(OvmlError, match="is not UTF-8 text") as error:
        read_dataset("folder", tmp_path / "labels.csv")
    assert "\n" not in str(error.value)


def test_a_root_is_required_except_for_an_installed_fashion_mnist(tmp_path):
    with pytest.raises(OvmlError, match="--root is required for voc2007"):
        read_dataset("voc2007", "")
