"""The image cache of one dataset: images/<dataset>/{index.faiss, items.parquet, dataset.json, failures.parquet}.

index.faiss   IndexFlatIP over L2-normalised CLIP image embeddings; row i <-> items row i
items.parquet row, image_id, path, positives list<str>, negatives list<str> or null, ignored list<str>
              (negatives null: every dataset label that is neither positive nor ignored is negative;
              negatives given: a label in none of the three lists is unknown and left out, as in Open Images)
dataset.json  dataset name, root, clip spec, random_weights, labels (all), splits {name: [labels]},
              images (rows embedded), failures (images skipped)
failures.parquet  image_id, path, error   (images that could not be read; never embedded)
patches.npy   (embed-images --local only) float16 [n, patches, d]: L2-normalised patch features, row i <->
              items row i; written before the index, so an index never sits beside stale patches
patches_pq.npy, patches_pq.faiss   (--local --local-store pq, instead of patches.npy) uint8 [n, patches, d/8]:
              each patch as FAISS product-quantizer codes (d/8 sub-vectors of 8 dims, 8 bits each: 16x smaller
              than float16), and the quantizer that decodes them
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from ovml.pipeline import atomic
from ovml.pipeline.errors import OvmlError

ITEMS_SCHEMA = pa.schema([
    ("row", pa.int64()),
    ("image_id", pa.string()),
    ("path", pa.string()),
    ("positives", pa.list_(pa.string())),
    ("negatives", pa.list_(pa.string())),
    ("ignored", pa.list_(pa.string())),
])
FAILURES_SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("error", pa.string())])


def write_index(path: Path, vectors: np.ndarray) -> None:
    save_index(path, flat_index(vectors))


def write_image_cache(directory: Path, vectors: np.ndarray, items: pa.Table, failures: pa.Table, info: dict) -> None:
    """Every file atomically and the index last, so a directory holding an index is complete."""
    atomic.write_parquet(directory / "items.parquet", items.cast(ITEMS_SCHEMA))
    atomic.write_parquet(directory / "failures.parquet", failures.cast(FAILURES_SCHEMA))
    atomic.write_json(directory / "dataset.json", info)
    write_index(directory / "index.faiss", vectors)


PATCHES = "patches.npy"
PATCH_CODES = "patches_pq.npy"
PATCH_QUANTIZER = "patches_pq.faiss"
PATCH_STORES = ("float16", "pq")
PQ_TRAINING_PATCHES = 65_536  # patch vectors the quantizer is trained on, drawn evenly from every batch


def write_patches(directory: Path, batches: list[Callable[[], tuple[np.ndarray, np.ndarray]]], rows: int,
                  store: str, seed: int = 0) -> None:
    """The patch features of `rows` images as patches.npy (float16) or as PQ codes, one batch in memory at a time.

    Each batch is a function giving (positions among the rows, patches [n, patches, d] float16); it is called
    once per pass (twice for pq: a sample to train the quantizer, then the codes)."""
    def read_all():
        for batch in batches:
            positions, patches = batch()
            if len(positions):
                yield positions, patches
    first = next(read_all(), None)
    shape = (rows, *first[1].shape[1:]) if first else (rows, 0, 0)
    quantizer = _train_quantizer(read_all(), shape, seed) if store == "pq" else None
    name = PATCHES if quantizer is None else PATCH_CODES
    with atomic.atomic_path(directory / name) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16 if quantizer is None else np.uint8,
                                        shape=shape if quantizer is None else (*shape[:2], quantizer.code_size))
        for positions, patches in read_all():
            out[positions] = patches if quantizer is None else quantizer.compute_codes(
                np.ascontiguousarray(patches.reshape(-1, shape[2]), dtype=np.float32)).reshape(*patches.shape[:2], -1)
        out.flush()
        del out
    if quantizer is not None:
        with atomic.atomic_path(directory / PATCH_QUANTIZER) as tmp:
            faiss.write_ProductQuantizer(quantizer, str(tmp))


def _train_quantizer(batches, shape: tuple[int, int, int], seed: int) -> faiss.ProductQuantizer:
    """A product quantizer of d/8 sub-vectors (8 bits each), trained on up to PQ_TRAINING_PATCHES patch vectors
    drawn at random, in proportion, from every batch (seeded: the same cache gives the same codes)."""
    rows, per_image, dim = shape
    if dim % 8:
        raise OvmlError(f"--local-store pq needs a feature width divisible by 8, got {dim}; use --local-store float16")
    rng = np.random.default_rng(seed)
    share = min(1.0, PQ_TRAINING_PATCHES / max(1, rows * per_image))
    sample = []
    for _, patches in batches:
        flat = patches.reshape(-1, dim)
        sample.append(flat[rng.random(len(flat)) < share])
    sample = np.concatenate(sample)
    if len(sample) < 256:
        raise OvmlError(f"--local-store pq needs at least 256 patches to train its quantizer, got {len(sample)}; "
                        "use --local-store float16 for so few images")
    quantizer = faiss.ProductQuantizer(dim, dim // 8, 8)
    quantizer.cp.seed = seed
    quantizer.cp.min_points_per_centroid = 1  # small caches: fewer points than FAISS likes, without its warning
    quantizer.train(np.ascontiguousarray(sample, dtype=np.float32))
    return quantizer


@dataclass(frozen=True)
class QuantizedPatches:
    """PQ-coded patch features that read like the float16 array: patches[rows] decodes those rows only."""

    codes: np.ndarray  # [n, patches, code_size] uint8, memory-mapped
    quantizer: faiss.ProductQuantizer

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.codes.shape[:2], self.quantizer.d)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, rows) -> np.ndarray:
        """float32 [len(rows), patches, d], each decoded patch put back on the unit sphere."""
        codes = np.asarray(self.codes[rows])
        decoded = self.quantizer.decode(np.ascontiguousarray(codes.reshape(-1, codes.shape[-1])))
        decoded /= np.maximum(np.linalg.norm(decoded, axis=1, keepdims=True), 1e-12)
        return decoded.reshape(*codes.shape[:-1], -1)


def read_patches(directory: Path) -> np.ndarray | QuantizedPatches | None:
    """The cached patch features (memory-mapped float16 [n, patches, d], or PQ codes decoded on access), or None
    when embedded without --local."""
    remake = (f"remake it with `ovml embed-images --local --force --dataset {directory.name} --root DIR`")
    try:
        if (directory / PATCH_CODES).is_file():
            try:
                quantizer = faiss.read_ProductQuantizer(str(directory / PATCH_QUANTIZER))
            except RuntimeError:
                raise OvmlError(f"{directory / PATCH_QUANTIZER} is missing or damaged; {remake}") from None
            return QuantizedPatches(np.load(directory / PATCH_CODES, mmap_mode="r", allow_pickle=False), quantizer)
        if (directory / PATCHES).is_file():
            return np.load(directory / PATCHES, mmap_mode="r", allow_pickle=False)
    except ValueError:
        raise OvmlError(f"the patch features in {directory} are damaged; {remake}") from None
    return None


FLAT_HEADER = 45  # a serialized IndexFlatIP/L2: fourcc, d, ntotal, two unused int64, is_trained, metric, count


def read_index(path: Path) -> np.ndarray:
    """All vectors of a flat index, as one float32 matrix. A flat index's vectors are the file's tail, read there
    in one copy: deserialising held the file's bytes, the index and its reconstruction at once (6 GB at 1M x 512)."""
    with open(path, "rb") as f:
        head = f.read(FLAT_HEADER)
    if len(head) == FLAT_HEADER and head[:4] in (b"IxFI", b"IxF2"):
        dim, n = struct.unpack("<iq", head[4:16])
        count, = struct.unpack("<q", head[37:45])
        if count == n * dim and Path(path).stat().st_size == FLAT_HEADER + 4 * count:
            return np.fromfile(path, dtype=np.float32, offset=FLAT_HEADER, count=count).reshape(n, dim)
    index = open_index(path)
    return index.reconstruct_n(0, index.ntotal)


def open_index(path: Path) -> faiss.Index:
    """An image cache's index.faiss, or one line naming it as damaged and the command that remakes it."""
    try:
        return load_index(path)
    except RuntimeError:  # faiss's only signal for a file it cannot deserialize
        raise OvmlError(f"{path} is damaged or not a FAISS index; remake it with `ovml embed-images --force "
                        f"--dataset {path.parent.name} --root DIR`") from None


INFO_FIELDS = {"clip": str, "labels": list, "splits": dict, "images": int}  # what readers of dataset.json use


def read_dataset_info(directory: Path) -> dict:
    """dataset.json of a cache, or a one-line error when it is damaged (not JSON, or not of this shape)."""
    try:
        info = json.loads((directory / "dataset.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict) or not all(isinstance(info.get(k), t) for k, t in INFO_FIELDS.items()):
        raise OvmlError(f"{directory / 'dataset.json'} is damaged; remake it with "
                        f"`ovml embed-images --force --dataset {directory.name} --root DIR`")
    return info


def read_image_cache(directory: Path) -> tuple[np.ndarray, pa.Table, dict]:
    """(vectors [n, d], items, dataset info) of a cache written by embed-images."""
    for name in ("index.faiss", "items.parquet", "dataset.json"):
        if not (directory / name).is_file():
            raise OvmlError(f"{directory / name} is missing; run `ovml embed-images` for this dataset first")
    vectors = read_index(directory / "index.faiss")
    items = atomic.read_parquet(directory / "items.parquet", f"ovml embed-images --force --dataset {directory.name} "
                                "--root DIR")
    info = read_dataset_info(directory)
    if len(items) != len(vectors):
        raise OvmlError(f"{directory} is inconsistent ({len(items)} items, {len(vectors)} vectors); "
                        "re-run `ovml embed-images --force`")
    return vectors, items, info


def ivf_index(vectors: np.ndarray, nlist: int | None = None) -> faiss.Index:
    """An approximate inner-product index: k-means cells (default ~4 sqrt(n), at least 39 points each), searched
    a few cells at a time (nprobe). FAISS seeds its k-means, so the same vectors give the same index."""
    n, dim = vectors.shape
    nlist = nlist or max(1, min(round(4 * np.sqrt(n)), n // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(vectors, dtype=np.float32))
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def flat_index(vectors: np.ndarray) -> faiss.Index:
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def save_index(path: Path, index: faiss.Index) -> None:
    atomic.write_bytes(path, faiss.serialize_index(index).tobytes())


def load_index(path: Path) -> faiss.Index:
    return faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
