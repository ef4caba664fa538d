"""Dataset readers, each on a tiny copy of the dataset's real release layout written by the test.

The `*_release` builders are shared with tests/test_embed_images.py.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovml.pipeline.datasets import FASHION_MNIST_CLASSES, VOC_CLASSES, read_dataset
from ovml.pipeline.errors import OvmlError


def write_jpeg(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (shade, 255 - shade, (shade * 7) % 256)).save(path, "JPEG")


def write_corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")


# --- NUS-WIDE ------------------------------------------------------------------------------------------

NUS_TAGS = ["sky", "dog", "sunset", "tree", "car"]
NUS_CONCEPTS = ["animal", "sky", "water"]
NUS_IMAGES = ["animal\\0001_101.jpg", "animal\\0002_102.jpg", "water\\0003_103.jpg", "sky\\0004_104.jpg"]
NUS_TAG_ROWS = [[0, 1, 0, 0, 0], [1, 0, 0, 1, 0], [0, 0, 1, 0, 1], [1, 0, 0, 0, 0]]
NUS_CONCEPT_ROWS = [[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]]  # image 4 has the tag sky but not the concept


def nuswide_release(root: Path) -> Path:
    (root / "ImageList").mkdir(parents=True)
    (root / "ImageList" / "TestImagelist.txt").write_text("\r\n".join(NUS_IMAGES) + "\r\n")
    (root / "NUS_WID_Tags").mkdir()
    (root / "NUS_WID_Tags" / "TagList1k.txt").write_text("\n".join(NUS_TAGS) + "\n")
    (root / "NUS_WID_Tags" / "Test_Tags1k.dat").write_text(
        "".join("\t".join(map(str, row)) + "\t\n" for row in NUS_TAG_ROWS))
    (root / "Concepts81.txt").write_text("\n".join(NUS_CONCEPTS) + "\n")
    labels_dir = root / "Groundtruth" / "TrainTestLabels"
    labels_dir.mkdir(parents=True)
    for column, concept in enumerate(NUS_CONCEPTS):
        (labels_dir / f"Labels_{concept}_Test.txt").write_text("".join(f"{row[column]}\n" for row in NUS_CONCEPT_ROWS))
    for i, image in enumerate(NUS_IMAGES[:-1]):
        write_jpeg(root / "Flickr" / image.replace("\\", "/"), 40 * i)
    write_corrupt(root / "Flickr" / NUS_IMAGES[-1].replace("\\", "/"))
    return root


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

OI_NAMES = {"/m/01": "Cat", "/m/02": "Dog", "/m/03": "Pizza, slice", "/m/04": "Zebra", "/m/05": "Violin"}
OI_TRAINABLE = ["/m/01", "/m/02", "/m/03"]
OI_UNSEEN_LIST = ["/m/04", "/m/05"]  # the LESA unseen list, converted from unseen_labels.pkl to text
OI_ANNOTATIONS = [("img1", "/m/01", 1), ("img1", "/m/02", 0), ("img1", "/m/05", 1),
                  ("img2", "/m/04", 0), ("img2", "/m/03", 1), ("img3", "/m/02", 1)]


def openimages_release(root: Path, top_unseen: str = "1\n0\n") -> Path:
    meta = root / "2018_04"
    (meta / "test").mkdir(parents=True)
    (meta / "class-descriptions.csv").write_text("".join(
        f'{mid},"{name}"\n' if "," in name else f"{mid},{name}\n" for mid, name in OI_NAMES.items()))
    (meta / "classes-trainable.txt").write_text("\n".join(OI_TRAINABLE) + "\n")
    (meta / "unseen_labels.txt").write_text("\n".join(OI_UNSEEN_LIST) + "\n")
    (meta / "top_400_unseen.csv").write_text(top_unseen)
    (meta / "test" / "images.csv").write_text(
        "ImageID,Subset,OriginalURL,OriginalLandingURL,License,AuthorProfileURL,Author,Title,OriginalSize,"
        "OriginalMD5,Thumbnail300KURL\n"
        + "".join(f"{i},test,u,u,l,a,a,t,1,md5,u\n" for i in ("img1", "img2", "img3")))
    (meta / "test" / "test-annotations-human-imagelabels.csv").write_text(
        "ImageID,Source,LabelName,Confidence\n"
        + "".join(f"{image},verification,{mid},{c}\n" for image, mid, c in OI_ANNOTATIONS))
    write_jpeg(root / "test" / "img1.jpg", 10)
    write_jpeg(root / "test" / "img2.jpg", 90)
    write_corrupt(root / "test" / "img3.jpg")
    return root


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

COCO_CATEGORIES = [{"id": 18, "name": "dog", "supercategory": "animal"},
                   {"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 3, "name": "car", "supercategory": "vehicle"}]
COCO_ANNOTATIONS = [(42, 1), (42, 18), (42, 1), (73, 3)]  # (image, category); image 99 has none


def coco2014_release(root: Path) -> Path:
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 12, "height": 10} for i in (73, 42, 99)]
    annotations = [{"id": n, "image_id": i, "category_id": c, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}
                   for n, (i, c) in enumerate(COCO_ANNOTATIONS)]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(
        {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": COCO_CATEGORIES}))
    write_jpeg(root / "val2014" / "COCO_val2014_000000000042.jpg", 30)
    write_jpeg(root / "val2014" / "COCO_val2014_000000000073.jpg", 120)
    write_corrupt(root / "val2014" / "COCO_val2014_000000000099.jpg")
    return root


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

VOC_MARKS = {"000001": {"dog": "1", "person": "0"}, "000002": {"car": "1", "person": "1"}, "000004": {}}


def voc2007_release(root: Path) -> Path:
    main = root / "VOC2007" / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for cls in VOC_CLASSES:
        (main / f"{cls}_test.txt").write_text("".join(
            f"{image} {'' if marks.get(cls, '-1') == '-1' else ' '}{marks.get(cls, '-1')}\n"
            for image, marks in VOC_MARKS.items()))
    write_jpeg(root / "VOC2007" / "JPEGImages" / "000001.jpg", 60)
    write_jpeg(root / "VOC2007" / "JPEGImages" / "000002.jpg", 160)
    write_corrupt(root / "VOC2007" / "JPEGImages" / "000004.jpg")
    return root


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

def fashion_mnist_release(root: Path, classes: list[int]) -> Path:
    """IDX files whose every pixel of image i is 10 * class + 5, so a tile tells its own class."""
    root.mkdir(parents=True, exist_ok=True)
    labels = np.array(classes, dtype=np.uint8)
    images = np.repeat((labels * 10 + 5)[:, None, None], 28 * 28, axis=1).reshape(len(labels), 28, 28)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">4I", 0x803, len(labels), 28, 28) + images.tobytes()))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">2I", 0x801, len(labels))
                                                                   + labels.tobytes()))
    return root


FASHION_CLASSES = [0, 3, 3, 9, 1, 2, 8, 8, 7, 5, 4, 6, 0, 1]


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

def folder_release(root: Path) -> Path:
    write_jpeg(root / "imgs" / "a.jpg", 20)
    write_jpeg(root / "imgs" / "b.jpg", 200)
    write_corrupt(root / "imgs" / "broken.jpg")
    (root / "labels.csv").write_text("path,labels\nimgs/a.jpg,cat|dog\nimgs/b.jpg,sky\n"
                                     "imgs/broken.jpg,cat\nimgs/missing.jpg,\n")
    return root / "labels.csv"


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


def test_a_root_is_required_except_for_an_installed_fashion_mnist(tmp_path):
    with pytest.raises(OvmlError, match="--root is required for voc2007"):
        read_dataset("voc2007", "")
