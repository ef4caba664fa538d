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
"""

from __future__ import annotations

import json
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


def write_patches(directory: Path, flat: pa.ChunkedArray, dim: int) -> None:
    """The patch features of every embedded row (a column of flattened float16 lists), as one .npy file."""
    chunks = [chunk.values.to_numpy(zero_copy_only=False) for chunk in flat.chunks if len(chunk)]
    values = np.concatenate(chunks).reshape(len(flat), -1, dim) if chunks else np.empty((0, 0, dim))
    with atomic.atomic_path(directory / PATCHES) as tmp, open(tmp, "wb") as f:
        np.save(f, values.astype(np.float16, copy=False))


def read_patches(directory: Path) -> np.ndarray | None:
    """The cached patch features (memory-mapped, float16 [n, patches, d]), or None when embedded without --local."""
    if not (directory / PATCHES).is_file():
        return None
    try:
        return np.load(directory / PATCHES, mmap_mode="r", allow_pickle=False)
    except ValueError:
        raise OvmlError(f"{directory / PATCHES} is damaged; remake it with `ovml embed-images --local --force "
                        f"--dataset {directory.name} --root DIR`") from None


def read_index(path: Path) -> np.ndarray:
    """All vectors of a flat index, as one float32 matrix."""
    index = load_index(path)
    return index.reconstruct_n(0, index.ntotal)


def read_dataset_info(directory: Path) -> dict:
    """dataset.json of a cache, or a one-line error when it is damaged."""
    try:
        info = json.loads((directory / "dataset.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = None
    if not isinstance(info, dict):
        raise OvmlError(f"{directory / 'dataset.json'} is damaged; remake it with "
                        f"`ovml embed-images --force --dataset {directory.name} --root DIR`")
    return info


def read_image_cache(directory: Path) -> tuple[np.ndarray, pa.Table, dict]:
    """(vectors [n, d], items, dataset info) of a cache written by embed-images."""
    for name in ("index.faiss", "items.parquet", "dataset.json"):
        if not (directory / name).is_file():
            raise OvmlError(f"{directory / name} is missing; run `ovml embed-images` for this dataset first")
    remake = f"ovml embed-images --force --dataset {directory.name} --root DIR"
    try:
        vectors = read_index(directory / "index.faiss")
    except RuntimeError:  # faiss's only signal for a file it cannot deserialize
        raise OvmlError(f"{directory / 'index.faiss'} is damaged or not a FAISS index; remake it with "
                        f"`{remake}`") from None
    items = atomic.read_parquet(directory / "items.parquet", remake)
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
