"""Fixtures in the real on-disk formats, built with the production writers: datasets' release layouts and the
artifacts of a run (adapter, image cache). Tests import these from here, never from each other."""

from __future__ import annotations

import gzip
import json
import signal
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from ovml.pipeline import atomic
from ovml.pipeline.adapter import Adapter, AdapterConfig, save_adapter
from ovml.pipeline.artifacts import LABEL_CACHE
from ovml.pipeline.clip import load_clip
from ovml.pipeline.datasets import VOC_CLASSES
from ovml.pipeline.image_cache import ITEMS_SCHEMA, write_index
from ovml.pipeline.label_embeddings import label_embeddings


def write_jpeg(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (shade, 255 - shade, (shade * 7) % 256)).save(path, "JPEG")


def write_corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")


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
    # the train list (embed-images --split train): the same files with Train in place of Test
    (root / "ImageList" / "TrainImagelist.txt").write_text("\r\n".join(NUS_TRAIN_IMAGES) + "\r\n")
    (root / "NUS_WID_Tags" / "Train_Tags1k.dat").write_text(
        "".join("\t".join(map(str, row)) + "\t\n" for row in NUS_TRAIN_TAG_ROWS))
    for column, concept in enumerate(NUS_CONCEPTS):
        (labels_dir / f"Labels_{concept}_Train.txt").write_text(
            "".join(f"{row[column]}\n" for row in NUS_TRAIN_CONCEPT_ROWS))
    for i, image in enumerate(NUS_TRAIN_IMAGES):
        write_jpeg(root / "Flickr" / image.replace("\\", "/"), 25 + 30 * i)
    return root


NUS_TRAIN_IMAGES = ["animal\\0101_201.jpg", "water\\0102_202.jpg", "sky\\0103_203.jpg"]


NUS_TRAIN_TAG_ROWS = [[1, 1, 0, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 0]]


NUS_TRAIN_CONCEPT_ROWS = [[1, 1, 0], [0, 0, 1], [0, 1, 0]]


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


def fashion_mnist_release(root: Path, classes: list[int], split: str = "t10k") -> Path:
    """IDX files of one split whose every pixel of image i is 10 * class + 5, so a tile tells its own class."""
    root.mkdir(parents=True, exist_ok=True)
    labels = np.array(classes, dtype=np.uint8)
    images = np.repeat((labels * 10 + 5)[:, None, None], 28 * 28, axis=1).reshape(len(labels), 28, 28)
    (root / f"{split}-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">4I", 0x803, len(labels), 28, 28) + images.tobytes()))
    (root / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">2I", 0x801, len(labels))
                                                                       + labels.tobytes()))
    return root


FASHION_CLASSES = [0, 3, 3, 9, 1, 2, 8, 8, 7, 5, 4, 6, 0, 1]


def folder_release(root: Path) -> Path:
    write_jpeg(root / "imgs" / "a.jpg", 20)
    write_jpeg(root / "imgs" / "b.jpg", 200)
    write_corrupt(root / "imgs" / "broken.jpg")
    (root / "labels.csv").write_text("path,labels\nimgs/a.jpg,cat|dog\nimgs/b.jpg,sky\n"
                                     "imgs/broken.jpg,cat\nimgs/missing.jpg,\n")
    return root / "labels.csv"


def noise_folder(root, images=20):
    """A folder release of `images` random-noise photos: 320 patches with the tiny CLIP, enough to train PQ."""
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"imgs/{i}.png")
    (root / "labels.csv").write_text("path,labels\n" + "".join(f"imgs/{i}.png,cat\n" for i in range(images)))
    return root / "labels.csv"


def build_cache(run_dir, clip, dataset, labels, splits, positives, negatives=None, ignored=None, seed=0,
                directions=None):
    """images/<dataset>/ as embed-images writes it; each image vector leans towards its positives' embeddings
    (or towards their rows of `directions` [labels, d], where zero-shot CLIP cannot follow)."""
    encoder = load_clip(clip)
    label_emb = label_embeddings(encoder, labels, cache_dir=run_dir / LABEL_CACHE)  # eval reuses it
    rng = np.random.default_rng(seed)
    lean = label_emb if directions is None else directions
    vectors = positives.astype(np.float32) @ lean + 0.5 * rng.standard_normal((len(positives), encoder.dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    names = np.array(labels)
    directory = run_dir / "images" / dataset
    write_index(directory / "index.faiss", vectors)
    atomic.write_parquet(directory / "items.parquet", pa.Table.from_pylist([
        {"row": i, "image_id": f"img{i:03d}", "path": f"/data/img{i:03d}.jpg",
         "positives": list(names[row]), "negatives": None if negatives is None else negatives[i],
         "ignored": [] if ignored is None else ignored[i]}
        for i, row in enumerate(positives)
    ], schema=ITEMS_SCHEMA))
    atomic.write_json(directory / "dataset.json", {
        "dataset": dataset, "root": "/data", "clip": clip, "random_weights": encoder.random_weights,
        "labels": labels, "splits": splits, "images": len(positives), "failures": 1,
    })
    return vectors


def build_adapter(run_dir, clip, seed=0, trained=True, vocabulary=("sky", "dog"), label_templates="pool",
                  local_pooling=None, head="cosine"):
    """An adapter as train-adapter saves it; trained=False keeps the zero-initialised last layers; a local head
    with local_pooling set; head="query" for the query head. Returns the model."""
    dim = load_clip(clip).dim
    torch.manual_seed(seed)
    model = Adapter(AdapterConfig(dim=dim, clip=clip, vocabulary=list(vocabulary), label_templates=label_templates,
                                  hidden=16, dropout=0.0, local_pooling=local_pooling, head=head, queries=3,
                                  training={"noise": 0.04, "seed": seed}))
    if trained:
        for mlp in (model.mlp, model.local_mlp) if local_pooling or head == "query" else (model.mlp,):
            torch.nn.init.normal_(mlp[-1].weight, std=0.5)
    save_adapter(run_dir / "adapter", model)
    return model.eval()


def ctrl_c_once_chunks_are_staged(staging: Path, chunks: int = 3) -> None:
    """From a daemon thread, Ctrl-C (SIGINT to the main thread) once `chunks` chunk files are staged under
    `staging` (or after 60 s): how the tests interrupt an embed-images run blocked on a FIFO image."""
    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(staging.rglob("chunk-*.parquet"))) < chunks:
            time.sleep(0.05)
        time.sleep(0.2)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()


def embed_text_killed_after_its_first_part(cfg, monkeypatch) -> None:
    """Run embed-text with `cfg` as if the process were killed right after its first part was written."""
    import ovml.stages.embed_text as stage

    real_write = stage.write_text_embeddings

    def write_then_die(path, *args, **kwargs):
        real_write(path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(stage, "write_text_embeddings", write_then_die)
    try:
        stage.embed_text(cfg)
    except KeyboardInterrupt:
        return
    finally:
        monkeypatch.setattr(stage, "write_text_embeddings", real_write)
    raise AssertionError("embed-text finished without writing a part")


class EchoBackend:
    """An LLM that answers every prompt with a caption naming what the prompt asked for (its labels are in the
    prompt's last words): captions without a model download."""

    name = "echo"
    model = "echo-1"

    def complete(self, requests):
        for request in requests:
            asked = request.messages[-1][1].split(":")[-1].strip().rstrip(".")[:80]
            yield json.dumps({"caption": f"A photo that shows {asked}, take {request.seed}."})


FINISHED_RUN_LABELS = ["cat", "dog", "sky"]  # the folder fixture's labels, so eval has a vocabulary to score
ARTIFACTS = ("captions", "text_emb", "labels", "adapter", "images", "eval")  # every stage's outputs


def build_finished_run(root: Path, clip: str) -> tuple[Path, Path]:
    """(run dir with every stage finished by the production stages, its labels file): echo captions, the tiny
    CLIP, a two-epoch adapter, the folder fixture embedded and evaluated."""
    import pytest

    import ovml.pipeline.llm as llm
    from ovml.stages.embed_images import EmbedImagesConfig, embed_images
    from ovml.stages.embed_text import EmbedTextConfig, embed_text
    from ovml.stages.evaluate import EvalConfig, evaluate
    from ovml.stages.generate_text import GenerateTextConfig, generate_text
    from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter

    labels = root / "labels.txt"
    labels.write_text("\n".join(FINISHED_RUN_LABELS) + "\n", encoding="utf-8")
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(llm, "open_backend", lambda *args, **kwargs: EchoBackend())
        generate_text(GenerateTextConfig(run_dir=run_dir, labels=str(labels), per_label=2, part_size=4))
    embed_text(EmbedTextConfig(run_dir=run_dir, clip=clip, device="cpu"))
    train_adapter(TrainAdapterConfig(run_dir=run_dir, clip=clip, device="cpu", hidden=16, epochs=2))
    csv = folder_release(root / "images")
    embed_images(EmbedImagesConfig(run_dir=run_dir, clip=clip, device="cpu", dataset="folder", root=str(csv),
                                   workers=0))
    evaluate(EvalConfig(run_dir=run_dir, clip=clip, device="cpu", dataset="folder"))
    return run_dir, labels


def artifact_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of every file the stages made, by path in the run dir."""
    return {str(p.relative_to(run_dir)): atomic.sha256_file(p) for folder in ARTIFACTS
            for p in sorted((run_dir / folder).rglob("*")) if p.is_file()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def unit(m: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as CLIP embeddings are."""
    return (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)
