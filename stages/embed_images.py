"""embed-images: CLIP image embeddings of a dataset -> images/<dataset>/ (FAISS index + items).

Each batch lands in its own chunk file under images/<dataset>/chunks/ as soon as it is embedded, so a
killed run loses at most one batch; the last step assembles the cache and drops the chunks. A run in which no
image could be read fails instead, and the cache it would have replaced stays.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ovml.pipeline import atomic
from ovml.pipeline.artifacts import image_cache
from ovml.pipeline.clip import check_run_clip, has_random_weights, load_clip
from ovml.pipeline.datasets import DATASETS, Dataset, Record, cache_name, read_dataset
from ovml.pipeline.engine import UNIT, check_engine, open_engine, unit_rows
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.image_cache import (
    FAILURES_SCHEMA,
    ITEMS_SCHEMA,
    write_image_cache,
    write_patches,
)
from ovml.pipeline.progress import progress_bar
from ovml.pipeline.rundir import RunDir, StageOutcome, run_stage
from ovml.pipeline.settings import EmbedImagesConfig, as_params, check_settings
from ovml.pipeline.text_embeddings import embedding_matrix


def check(cfg: EmbedImagesConfig) -> Dataset:
    """The settings, the dataset's annotations and the CLIP spec, before anything runs (`ovml run` checks every
    stage's before the first). Returns the dataset read."""
    check_settings(cfg)
    check_engine(cfg.engine)
    dataset = read_dataset(cfg.dataset, cfg.root, mosaic=cfg.mosaic, split=cfg.split)
    if not dataset.records:
        raise OvmlError(f"{dataset.name} under {dataset.root} lists no images; check --root")
    check_run_clip(cfg.run_dir, cfg.clip, cfg.device)
    return dataset


def embed_images(cfg: EmbedImagesConfig) -> StageOutcome:
    dataset = check(cfg)
    name = cache_name(dataset.name, cfg.split)
    run_dir = RunDir(cfg.run_dir)
    cfg = replace(cfg, clip=run_dir.clip(cfg.clip))
    params = {**as_params(cfg), "root": str(dataset.root),
              "mosaic": cfg.mosaic if dataset.name == "fashion-mnist" else None}
    if name == dataset.name:  # the default split: caches made before --split existed keep their fingerprint
        del params["split"]
    if not cfg.local:  # caches made before --local existed keep their fingerprint: no re-embedding
        del params["local"], params["local_store"]
    output = image_cache(name)
    return run_stage(
        run_dir, f"embed_images/{name}", params=params,
        # The annotation files define the dataset; hashing every image on each run would cost about as
        # much as embedding it, so an image edited in place needs --force.
        inputs=dataset.annotation_files,
        outputs=[output],
        body=lambda out, resume: _embed(cfg, dataset, out / output, resume),
        force=cfg.force, models={"clip": cfg.clip},
    )


def _embed(cfg: EmbedImagesConfig, dataset: Dataset, directory: Path, resume: bool) -> dict:
    records = dataset.records[:cfg.limit]
    chunks = directory / "chunks"
    done = _done_rows(chunks) if resume else set()
    todo = [row for row in range(len(records)) if row not in done]
    items = [{UNIT: todo[start], "rows": todo[start:start + cfg.batch_size]}
             for start in range(0, len(todo), cfg.batch_size)]
    worker_args = (cfg.clip, cfg.device, dataset.name, str(dataset.root), cfg.mosaic, cfg.split, cfg.limit,
                   cfg.workers, cfg.local)
    started = time.perf_counter()
    with progress_bar("images") as progress, open_engine(cfg.engine, address=cfg.ray_address, actors=cfg.ray_actors,
                                                         device=cfg.device) as engine:
        task = progress.add_task(f"embed-images {dataset.name}", total=len(records), completed=len(done))
        expected = {item[UNIT]: len(item["rows"]) for item in items}
        for first_row, tables in engine.map(ImageChunkWorker, worker_args, items, expected=expected):
            table = unit_rows(tables)
            atomic.write_parquet(chunks / f"chunk-{first_row:09d}.parquet", table)
            progress.advance(task, table.num_rows)
    seconds = time.perf_counter() - started

    # Patches stay on disk (read chunk by chunk by write_patches); a batch of unreadable images has no patches
    # column, so only the columns every chunk has are read here.
    chunk_files = sorted(chunks.glob("chunk-*.parquet"))
    table = pa.concat_tables(pq.read_table(p, columns=["row", "embedding", "error"]) for p in chunk_files
                             ).sort_by("row")
    if table["row"].to_pylist() != list(range(len(records))):
        raise RuntimeError(f"chunks under {chunks} do not cover rows 0..{len(records) - 1} exactly once")
    ok = table.filter(pc.is_null(table["error"]))
    failed = table.filter(pc.is_valid(table["error"]))
    if not ok.num_rows:  # an empty cache would replace a working one; the chunks go, so a re-run reads anew
        shutil.rmtree(chunks)
        raise OvmlError(f"none of the {len(records)} images of {dataset.name} under {dataset.root} could be read "
                        f"(first: {records[failed['row'][0].as_py()].path}: {failed['error'][0].as_py()}); "
                        f"the previous cache is kept; check --root and the image files")
    vectors = embedding_matrix(ok["embedding"])
    kept = [records[row] for row in ok["row"].to_pylist()]
    if cfg.local:
        kept_rows = ok["row"].to_numpy()
        dim = vectors.shape[1]
        write_patches(directory, [functools.partial(_chunk_patches, p, kept_rows, dim) for p in chunk_files],
                      len(kept_rows), cfg.local_store)
    write_image_cache(directory, vectors, _items_table(kept), _failures_table(records, failed), {
        "dataset": dataset.name, "root": str(dataset.root), "clip": cfg.clip,
        "random_weights": has_random_weights(cfg.clip), "labels": dataset.labels, "splits": dataset.splits,
        "images": len(kept), "failures": len(failed), "image_split": cfg.split or DATASETS[dataset.name].splits[0],
    })
    for chunk in chunks.glob("chunk-*.parquet"):
        chunk.unlink()
    chunks.rmdir()
    summary = {"dataset": dataset.name, "cache": directory.name, "images": len(kept), "failures": len(failed),
               "reused": len(done)}
    if todo:
        summary["images_per_s"] = round(len(todo) / seconds, 2)
    return summary


def _chunk_patches(chunk_file: Path, kept_rows: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions among the kept rows, float16 patches [n, patches, d]) of one chunk's readable images."""
    table = pq.read_table(chunk_file)
    if "patches" not in table.column_names:  # every image of the chunk failed
        return np.empty(0, np.int64), np.empty((0, 0, dim), np.float16)
    table = table.filter(pc.is_null(table["error"]))
    values = table["patches"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.searchsorted(kept_rows, table["row"].to_numpy()), values.reshape(table.num_rows, -1, dim)


class ImageChunkWorker:
    """An engine worker: CLIP loaded once and the dataset read, then chunks of row numbers -> chunk tables.

    Images are decoded by `workers` DataLoader processes ahead of the model, across all the chunks of a call (the
    local engine makes one call for the whole run; a Ray actor one per chunk): decoding is slower than embedding on
    a GPU, and one core decodes far fewer images than it embeds."""

    def __init__(self, clip: str, device: str, dataset: str, root: str, mosaic: int, split: str | None,
                 limit: int | None, workers: int, local: bool):
        self.encoder = load_clip(clip, device)
        self.records = read_dataset(dataset, root, mosaic=mosaic, split=split).records[:limit]
        self.workers, self.local = workers, local

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        units, chunks = batch[UNIT].to_pylist(), batch["rows"].to_pylist()
        starts = np.cumsum([0] + [len(rows) for rows in chunks])
        loader = torch.utils.data.DataLoader(
            _Pixels(self.records, [row for rows in chunks for row in rows], self.encoder.preprocess),
            batch_sampler=[range(a, b) for a, b in zip(starts[:-1], starts[1:], strict=True)],
            num_workers=self.workers, collate_fn=_collate)
        for unit, (rows, pixels, errors) in zip(units, loader, strict=True):
            table = _embed_chunk(self.encoder, rows, pixels, errors, self.local)
            yield table.append_column(UNIT, pa.array([unit] * len(rows), pa.int64()))


def _embed_chunk(encoder, rows: list[int], pixels: torch.Tensor | None, errors: dict[int, str],
                 local: bool = False) -> pa.Table:
    vectors = patches = None
    if pixels is not None and local:
        vectors, patches = encoder.encode_image_patches(pixels)
    elif pixels is not None:
        vectors = encoder.encode_image_batch(pixels)
    return _chunk_table(rows, vectors, errors, encoder.dim, patches)


class _Pixels(torch.utils.data.Dataset):
    """Rows still to embed -> (row, preprocessed pixels or None, error or None); a bad image never raises."""

    def __init__(self, records: list[Record], rows: list[int], preprocess):
        self.records, self.rows, self.preprocess = records, rows, preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        try:
            return row, self.preprocess(self.records[row].open_image()), None
        except Exception as e:  # noqa: BLE001 - missing, corrupt, truncated, undecodable: all are failures to record
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return row, None, f"{type(e).__name__}: {message}"[:300]


def _collate(items):
    """(rows, stacked pixels of the readable images or None, {row: error}), in row order."""
    rows = [row for row, _, _ in items]
    readable = [pixels for _, pixels, _ in items if pixels is not None]
    errors = {row: error for row, _, error in items if error is not None}
    return rows, (torch.stack(readable) if readable else None), errors


def _chunk_table(rows: list[int], vectors: np.ndarray | None, errors: dict[int, str], dim: int,
                 patches: np.ndarray | None = None) -> pa.Table:
    """One batch's rows; with `patches` also each image's patch features, flattened, float16."""
    embeddings, patch_rows, next_vector = [], [], 0
    for row in rows:
        if row in errors:
            embeddings.append(None)
            patch_rows.append(None)
        else:
            embeddings.append(vectors[next_vector])
            patch_rows.append(None if patches is None else patches[next_vector].astype(np.float16).ravel())
            next_vector += 1
    columns = {
        "row": pa.array(rows, pa.int64()),
        "error": pa.array([errors.get(row) for row in rows], pa.string()),
        "embedding": pa.array(embeddings, pa.list_(pa.float32(), dim)),
    }
    if patches is not None:
        columns["patches"] = pa.array(patch_rows, pa.list_(pa.float16(), patches[0].size))
    return pa.table(columns)


def _done_rows(chunks: Path) -> set[int]:
    """Rows the staged chunks of a killed attempt hold; a staged chunk damaged since is deleted and redone."""
    done = set()
    for chunk in chunks.glob("chunk-*.parquet"):
        try:
            done.update(pq.read_table(chunk, columns=["row"])["row"].to_pylist())
        except pa.ArrowInvalid:
            chunk.unlink()
    return done


def _items_table(records: list[Record]) -> pa.Table:
    return pa.table({
        "row": pa.array(range(len(records)), pa.int64()),
        "image_id": [r.image_id for r in records],
        "path": [r.path for r in records],
        "positives": pa.array([list(r.positives) for r in records], pa.list_(pa.string())),
        "negatives": pa.array([None if r.negatives is None else list(r.negatives) for r in records],
                              pa.list_(pa.string())),
        "ignored": pa.array([list(r.ignored) for r in records], pa.list_(pa.string())),
    }, schema=ITEMS_SCHEMA)


def _failures_table(records: list[Record], failed: pa.Table) -> pa.Table:
    rows = failed["row"].to_pylist()
    return pa.table({
        "image_id": [records[row].image_id for row in rows],
        "path": [records[row].path for row in rows],
        "error": failed["error"],
    }, schema=FAILURES_SCHEMA)
