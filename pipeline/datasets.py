"""Readers for the evaluation datasets, each straight from its own release layout under --root.

A reader returns a Dataset: every test image as a Record (id, path, positive / negative / ignored
labels), the label list, named label splits (the published zero-shot protocols need seen / unseen /
all), and the annotation files that define it (what embed-images fingerprints: hashing ~100k images
on every run would cost more than embedding them).
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ovml.pipeline.errors import OvmlError

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
# The ten classes in the order of the IDX label ids, named as a label file names them (examples/fashion_labels.txt),
# so that an adapter trained on those labels and the dataset agree on which labels are unseen.
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
MOSAIC_SEED = 0
# The file names of VOC are not words CLIP knows; the labels are what the text tower reads.
VOC_CLASSES = {"aeroplane": "aeroplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat",
               "bottle": "bottle", "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow",
               "diningtable": "dining table", "dog": "dog", "horse": "horse", "motorbike": "motorbike",
               "person": "person", "pottedplant": "potted plant", "sheep": "sheep", "sofa": "sofa",
               "train": "train", "tvmonitor": "tv monitor"}

@dataclass(frozen=True)
class Record:
    """One test image. negatives None: every label not positive and not ignored is negative."""

    image_id: str
    path: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] | None = None
    ignored: tuple[str, ...] = ()
    render: Callable[[], Image.Image] | None = None  # images made in memory (fashion-mnist mosaics)

    def open_image(self) -> Image.Image:
        if self.render is not None:
            return self.render()
        with Image.open(self.path) as image:
            return image.convert("RGB")


@dataclass
class Dataset:
    name: str
    root: Path
    labels: list[str]
    splits: dict[str, list[str]]
    records: list[Record]
    annotation_files: list[Path]


def read_dataset(name: str, root: str | Path | None, mosaic: int = 2, split: str | None = None) -> Dataset:
    """The dataset's images of `split` (default: its first split, the one the protocols evaluate)."""
    if name not in DATASETS:
        raise OvmlError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    splits = DATASETS[name].splits
    split = split or splits[0]
    if split not in splits:
        raise OvmlError(f"{name} has no split '{split}'; --split must be one of: {', '.join(splits)}")
    if not root:
        if name != "fashion-mnist":
            raise OvmlError(f"--root is required for {name}: {DATASETS[name].layout}")
        if not FASHION_MNIST_ROOT.is_dir():
            raise OvmlError(f"{FASHION_MNIST_ROOT} does not exist; pass --root with {DATASETS[name].layout}")
        root = FASHION_MNIST_ROOT
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise OvmlError(f"--root {root} does not exist; {name} expects {DATASETS[name].layout}")
    return DATASETS[name].read(root, mosaic, split)


def cache_name(dataset: str, split: str | None = None) -> str:
    """The image cache's name (images/<name>/): the dataset's own for its default split, `<dataset>-<split>`
    for another, so a train-split cache never replaces the test cache eval reads."""
    default = DATASETS[dataset].splits[0] if dataset in DATASETS else None
    return dataset if not split or split == default else f"{dataset}-{split}"


def _need(path: Path, dataset: str) -> Path:
    if not path.exists():
        raise OvmlError(f"{path} is missing; --root for {dataset} must hold {DATASETS[dataset].layout}")
    return path


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def _binary_matrix(path: Path, rows: int, dataset: str) -> np.ndarray:
    """A file of 0/1 values (any separators) as a bool matrix [rows, n]; vectorised, Test_Tags1k.dat is ~200 MB."""
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    digits = data[(data == ord("0")) | (data == ord("1"))]
    if rows == 0 or digits.size % rows:
        raise OvmlError(f"{path} has {digits.size} 0/1 values, not a multiple of the {rows} images listed; "
                        f"--root for {dataset} must hold {DATASETS[dataset].layout}")
    return (digits == ord("1")).reshape(rows, -1)


def _records_from_matrix(image_ids: list[str], paths: list[str], positive: np.ndarray,
                         labels: list[str]) -> list[Record]:
    names = np.array(labels, dtype=object)
    return [Record(image_id, path, tuple(names[np.flatnonzero(row)]))
            for image_id, path, row in zip(image_ids, paths, positive, strict=True)]


def _read_nuswide(root: Path, split: str = "test") -> Dataset:
    """The test (or train) list: the same files with Test replaced by Train, the release's own naming."""
    name, part = "nuswide", split.capitalize()
    image_list = _need(root / "ImageList" / f"{part}Imagelist.txt", name)
    tag_list = _need(root / "NUS_WID_Tags" / "TagList1k.txt", name)
    tags_file = _need(root / "NUS_WID_Tags" / f"{part}_Tags1k.dat", name)
    concepts_file = root / "Concepts81.txt"
    if not concepts_file.exists() and (root / "ConceptsList" / "Concepts81.txt").exists():
        concepts_file = root / "ConceptsList" / "Concepts81.txt"  # where the official zip unpacks it
    _need(concepts_file, name)
    _need(root / "Flickr", name)
    # TestImagelist.txt holds Windows paths relative to Flickr/, e.g. actor\0001_2124494179.jpg
    relative = [line.replace("\\", "/") for line in _lines(image_list)]
    tags = _lines(tag_list)
    concepts = _lines(concepts_file)
    label_files = [_need(root / "Groundtruth" / "TrainTestLabels" / f"Labels_{c}_{part}.txt", name)
                   for c in concepts]

    tag_matrix = _binary_matrix(tags_file, len(relative), name)
    if tag_matrix.shape[1] != len(tags):
        raise OvmlError(f"{tags_file} has {tag_matrix.shape[1]} columns but {tag_list} lists {len(tags)} tags")
    concept_matrix = np.concatenate([_binary_matrix(f, len(relative), name) for f in label_files], axis=1)
    if concept_matrix.shape[1] != len(concepts):
        raise OvmlError(f"each Labels_<concept>_{part}.txt must have one 0/1 line per image of {image_list}")
    concept_set = set(concepts)
    seen_columns = [i for i, tag in enumerate(tags) if tag not in concept_set]
    seen = [tags[i] for i in seen_columns]
    positive = np.concatenate([tag_matrix[:, seen_columns], concept_matrix], axis=1)
    labels = seen + concepts
    return Dataset(
        name, root, labels, {"seen": seen, "unseen": concepts, "all": labels},
        _records_from_matrix(relative, [str(root / "Flickr" / r) for r in relative], positive, labels),
        [image_list, tag_list, tags_file, concepts_file, *label_files],
    )


def _read_openimages(root: Path) -> Dataset:
    name = "openimages"
    meta = root / "2018_04"
    descriptions_file = _need(meta / "class-descriptions.csv", name)
    trainable_file = _need(meta / "classes-trainable.txt", name)
    top_unseen_file = _need(meta / "top_400_unseen.csv", name)
    images_file = _need(meta / "test" / "images.csv", name)
    annotations_file = _need(meta / "test" / "test-annotations-human-imagelabels.csv", name)
    _need(root / "test", name)

    with open(descriptions_file, newline="", encoding="utf-8") as f:
        display = {row[0]: row[1] for row in csv.reader(f) if len(row) >= 2}

    def named(mid: str) -> str:
        if mid not in display:
            raise OvmlError(f"{descriptions_file} has no name for class {mid}")
        return display[mid]

    seen_mids = _lines(trainable_file)
    unseen_mids, unseen_sources = _top_unseen_mids(top_unseen_file)
    # Different MIDs may share a display name; the label is the name CLIP reads, so they merge.
    seen = list(dict.fromkeys(named(m) for m in seen_mids))
    unseen = list(dict.fromkeys(named(m) for m in unseen_mids))
    labels = list(dict.fromkeys(seen + unseen))
    label_of = {mid: display[mid] for mid in seen_mids + unseen_mids}

    with open(images_file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "ImageID" not in (reader.fieldnames or []):
            raise OvmlError(f"{images_file} has no ImageID column; expected the 2018_04 test/images.csv")
        image_ids = [row["ImageID"] for row in reader]
    positives: dict[str, set[str]] = {}
    negatives: dict[str, set[str]] = {}
    with open(annotations_file, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"ImageID", "LabelName", "Confidence"} <= set(reader.fieldnames or []):
            raise OvmlError(f"{annotations_file} must have the columns ImageID, LabelName, Confidence")
        for row in reader:
            label = label_of.get(row["LabelName"])
            if label is not None:
                target = positives if float(row["Confidence"]) > 0.5 else negatives
                target.setdefault(row["ImageID"], set()).add(label)
    position = {label: i for i, label in enumerate(labels)}
    records = []
    for image_id in image_ids:
        pos, neg = positives.get(image_id, set()), negatives.get(image_id, set())
        both = pos & neg  # merged names verified both ways: unknown, not a guess
        records.append(Record(image_id, str(root / "test" / f"{image_id}.jpg"), _ordered(pos - both, position),
                              _ordered(neg - both, position), _ordered(both, position)))
    return Dataset(name, root, labels, {"seen": seen, "unseen": unseen, "all": labels}, records,
                   [descriptions_file, trainable_file, images_file, annotations_file, *unseen_sources])


def _top_unseen_mids(path: Path) -> tuple[list[str], list[Path]]:
    """top_400_unseen.csv lists MIDs, or (as released with LESA) row indices into the unseen label list.

    That list ships as unseen_labels.pkl; ovml never loads pickle, so it reads the same list from
    unseen_labels.txt (one MID per line) beside it.
    """
    with open(path, newline="", encoding="utf-8") as f:
        first_column = [row[0].strip() for row in csv.reader(f) if row and row[0].strip()]
    if all(value.startswith("/") for value in first_column):
        return first_column, [path]
    if not all(value.isdigit() for value in first_column):
        raise OvmlError(f"{path} must list one unseen class per row: a MID (/m/...) or an index into "
                        "unseen_labels.txt")
    unseen_list = path.parent / "unseen_labels.txt"
    if not unseen_list.exists():
        raise OvmlError(
            f"{path} holds indices into unseen_labels.pkl, which ovml does not load (pickle); convert it once "
            f"with: python -c \"import pickle; print('\\n'.join(pickle.load(open('unseen_labels.pkl', 'rb'))))\" "
            f"> {unseen_list}")
    unseen_all = _lines(unseen_list)
    indices = [int(v) for v in first_column]
    if max(indices) >= len(unseen_all):
        raise OvmlError(f"{path} refers to row {max(indices)} but {unseen_list} has {len(unseen_all)} rows")
    return [unseen_all[i] for i in indices], [path, unseen_list]


def _ordered(names: set[str], position: dict[str, int]) -> tuple[str, ...]:
    """Label names in dataset order (Open Images has ~7,600 labels, so no scan of the whole list)."""
    return tuple(sorted(names, key=position.__getitem__))


def _read_coco2014(root: Path) -> Dataset:
    name = "coco2014"
    annotations_file = _need(root / "annotations" / "instances_val2014.json", name)
    images_dir = _need(root / "val2014", name)
    try:
        data = json.loads(annotations_file.read_text(encoding="utf-8"))
        categories = sorted(data["categories"], key=lambda c: c["id"])
        images = sorted(data["images"], key=lambda i: i["id"])
        category_name = {c["id"]: c["name"] for c in categories}
        present: dict[int, set[str]] = {}
        for annotation in data["annotations"]:
            present.setdefault(annotation["image_id"], set()).add(category_name[annotation["category_id"]])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise OvmlError(f"{annotations_file} is not a COCO instances file ({type(e).__name__}: {e})") from None
    labels = [c["name"] for c in categories]
    position = {label: i for i, label in enumerate(labels)}
    records = [Record(str(image["id"]), str(images_dir / image["file_name"]),
                      _ordered(present.get(image["id"], set()), position)) for image in images]
    return Dataset(name, root, labels, {"all": labels}, records, [annotations_file])


def _read_voc2007(root: Path) -> Dataset:
    name = "voc2007"
    if not (root / "VOC2007").exists() and (root / "ImageSets" / "Main").exists():
        root = root.parent  # --root pointed at VOC2007 itself rather than at the VOCdevkit above it
    main = root / "VOC2007" / "ImageSets" / "Main"
    class_files = [_need(main / f"{cls}_test.txt", name) for cls in VOC_CLASSES]
    jpegs = _need(root / "VOC2007" / "JPEGImages", name)
    labels = list(VOC_CLASSES.values())
    marks: dict[str, dict[str, list[str]]] = {}
    for label, path in zip(labels, class_files, strict=True):
        for line in _lines(path):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
                raise OvmlError(f"{path}: line '{line}' is not '<image id> <1|-1|0>'")
            kind = {"1": "positives", "-1": "negatives", "0": "ignored"}[parts[1]]
            marks.setdefault(parts[0], {"positives": [], "negatives": [], "ignored": []})[kind].append(label)
    records = [Record(image_id, str(jpegs / f"{image_id}.jpg"), tuple(m["positives"]), tuple(m["negatives"]),
                      tuple(m["ignored"])) for image_id, m in marks.items()]
    return Dataset(name, root, labels, {"all": labels}, records, class_files)


def _read_fashion_mnist(root: Path, mosaic: int, split: str) -> Dataset:
    """K x K mosaics of one split's images, drawn the same way for either split (a seeded permutation)."""
    name = "fashion-mnist"
    if mosaic < 1:
        raise OvmlError(f"--mosaic must be at least 1 (K for K x K grids), got {mosaic}")
    images, classes, images_file, labels_file = read_fashion_mnist_split(root, split)
    per_grid = mosaic * mosaic
    count = len(images) // per_grid
    if count == 0:
        raise OvmlError(f"--mosaic {mosaic} needs {per_grid} images per grid but {images_file} has {len(images)}")
    order = np.random.default_rng(MOSAIC_SEED).permutation(len(images))[:count * per_grid].reshape(count, per_grid)
    stem = images_file.name.removesuffix(".gz")
    records = []
    for i, members in enumerate(order):
        present = sorted(set(classes[members].tolist()))
        records.append(Record(f"mosaic-{i:06d}", f"{stem}#mosaic-{i:06d}",
                              tuple(FASHION_MNIST_CLASSES[c] for c in present),
                              render=functools.partial(_render_mosaic, str(images_file), tuple(members.tolist()))))
    labels = list(FASHION_MNIST_CLASSES)
    return Dataset(name, root, labels, {"all": labels}, records, [images_file, labels_file])


def read_fashion_mnist_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, Path, Path]:
    """(images [n, 28, 28] uint8, class ids [n], images file, labels file) of the `train` or `t10k` split."""
    images_file = _idx_file(root, f"{split}-images-idx3-ubyte")
    labels_file = _idx_file(root, f"{split}-labels-idx1-ubyte")
    images = _idx_array(str(images_file))
    classes = _idx_array(str(labels_file))
    if images.ndim != 3 or classes.ndim != 1 or len(images) != len(classes) or classes.max() >= 10:
        raise OvmlError(f"{images_file} and {labels_file} are not matching Fashion-MNIST image and label files")
    return images, classes, images_file, labels_file


def _idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return _need(root / f"{stem}.gz", "fashion-mnist")


@functools.lru_cache(maxsize=4)
def _idx_array(path: str) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format), gzipped or not; cached so mosaics stay cheap."""
    try:
        raw = Path(path).read_bytes()
        data = gzip.decompress(raw) if path.endswith(".gz") else raw
    except (OSError, EOFError) as e:
        raise OvmlError(f"cannot read {path}: {e}") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise OvmlError(f"{path} is not an IDX file of unsigned bytes (magic 0x0000080N)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise OvmlError(f"{path} is truncated: its header promises {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _render_mosaic(images_file: str, members: tuple[int, ...]) -> Image.Image:
    tiles = _idx_array(images_file)[list(members)]
    k = math.isqrt(len(members))
    height, width = tiles.shape[1:]
    grid = tiles.reshape(k, k, height, width).transpose(0, 2, 1, 3).reshape(k * height, k * width)
    return Image.fromarray(np.ascontiguousarray(grid)).convert("RGB")


def _read_folder(csv_file: Path) -> Dataset:
    name = "folder"
    if not csv_file.is_file():
        raise OvmlError(f"{csv_file} is not a file; --root for folder must be {DATASETS[name].layout}")
    try:  # utf-8-sig: spreadsheet programs start their UTF-8 CSVs with a byte-order mark
        with open(csv_file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"path", "labels"} <= set(reader.fieldnames or []):
                raise OvmlError(f"{csv_file} must start with the header `path,labels`; it is "
                                f"{DATASETS[name].layout}")
            rows = [(row["path"].strip(), row["labels"] or "") for row in reader if (row["path"] or "").strip()]
    except UnicodeDecodeError:
        raise OvmlError(f"{csv_file} is not UTF-8 text; save it as UTF-8 (CSV UTF-8 in spreadsheet programs)") from None
    if not rows:
        raise OvmlError(f"{csv_file} lists no images; it must be {DATASETS[name].layout}")
    per_image = [tuple(dict.fromkeys(p.strip() for p in labels.split("|") if p.strip())) for _, labels in rows]
    labels = sorted({label for names in per_image for label in names})
    records = [Record(path, str(csv_file.parent / path), names) for (path, _), names in zip(rows, per_image,
                                                                                            strict=True)]
    return Dataset(name, csv_file, labels, {"all": labels}, records, [csv_file])


@dataclass(frozen=True)
class Protocol:
    """One published way to score a dataset: which label split is ranked, at which K, over which images."""

    name: str
    split: str
    ks: tuple[int, ...]
    images_with_a_positive_only: bool


ALL_LABELS = (Protocol("all", "all", (3,), False),)


def zero_shot_protocols(ks: tuple[int, ...]) -> tuple[Protocol, ...]:
    """The published pair: ZSL ranks the unseen labels, GZSL all of them; images without a positive skipped."""
    return Protocol("ZSL", "unseen", ks, True), Protocol("GZSL", "all", ks, True)


def open_vocabulary_protocol(all_ks: tuple[int, ...], unseen: int) -> Protocol:
    """`unseen` for a dataset without a published split: the labels absent from the adapter's training
    vocabulary, ranked among themselves, images without one of them skipped (the zero-shot setting).
    F1@K needs K below the label count to tell methods apart (K >= count predicts every label), so the
    dataset's Ks that fit are kept, or K=1."""
    return Protocol("unseen", "unseen", tuple(k for k in all_ks if k < unseen) or (1,), True)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset as ovml knows it: its release layout, its reader (root, mosaic K), its evaluation protocols."""

    layout: str
    read: Callable[[Path, int, str], Dataset]
    protocols: tuple[Protocol, ...] = ALL_LABELS
    splits: tuple[str, ...] = ("test",)  # the images embed-images --split may pick; the first is the default


# The one table of datasets (open_clip's pretrained registry is the model): embed-images, eval and the
# vocabulary reader all look a dataset up here.
DATASETS: dict[str, DatasetSpec] = {
    "nuswide": DatasetSpec(
        layout="the NUS-WIDE release: Flickr/, ImageList/TestImagelist.txt, "
               "Groundtruth/TrainTestLabels/Labels_<concept>_Test.txt, NUS_WID_Tags/TagList1k.txt, "
               "NUS_WID_Tags/Test_Tags1k.dat and Concepts81.txt (Train in place of Test for --split train)",
        read=lambda root, mosaic, split: _read_nuswide(root, split),
        protocols=zero_shot_protocols((3, 5)), splits=("test", "train")),
    "openimages": DatasetSpec(
        layout="the Open Images folder: 2018_04/{class-descriptions.csv, classes-trainable.txt, "
               "top_400_unseen.csv, test/images.csv, test/test-annotations-human-imagelabels.csv} "
               "and test/<ImageID>.jpg",
        read=lambda root, mosaic, split: _read_openimages(root),
        protocols=zero_shot_protocols((10, 20))),
    "coco2014": DatasetSpec(
        layout="the COCO 2014 folder: annotations/instances_val2014.json and val2014/",
        read=lambda root, mosaic, split: _read_coco2014(root)),
    "voc2007": DatasetSpec(
        layout="the VOCdevkit folder: VOC2007/ImageSets/Main/<class>_test.txt and VOC2007/JPEGImages/",
        read=lambda root, mosaic, split: _read_voc2007(root)),
    "fashion-mnist": DatasetSpec(
        layout="the Fashion-MNIST IDX files t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] "
               "(train-*: --split train) "
               "(`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist)",
        read=_read_fashion_mnist, splits=("t10k", "train")),
    "folder": DatasetSpec(
        layout="a CSV file with a header `path,labels`: one image per row, labels separated by '|', "
               "paths relative to the CSV",
        read=lambda root, mosaic, split: _read_folder(root),
        splits=("test", "train")),  # one CSV per split: the split only names the cache
}
