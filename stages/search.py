"""search: open-vocabulary image search over a dataset embed-images cached, through the adapter or zero-shot CLIP.

Not a pipeline stage (like predict): it reads the image cache and the adapter and writes only FAISS indexes under
cache/search/<dataset>/. The query is embedded the way a label is (its prompt-pool average; for the adapter, the
adapter's label templates), so searching for "dog" ranks images exactly as the "dog" column of eval's scores
does. Zero-shot searches the image cache's own flat index; the adapter searches its features of every image
(the adapter's h), indexed once per adapter and image cache and rebuilt when either file's sha256 changes.
`--index ivf` searches an IVF index instead: approximate, for large caches (recall in docs/benchmarks.md).
Scores are what predict prints: the cosine for zero-shot, sigmoid(logit) for the adapter.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import replace

import faiss
import torch

from ovml.pipeline import atomic
from ovml.pipeline.adapter import load_adapter
from ovml.pipeline.artifacts import ADAPTER, ADAPTER_CONFIG, ADAPTER_WEIGHTS, image_cache, search_cache
from ovml.pipeline.clip import load_clip
from ovml.pipeline.datasets import DATASETS
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.image_cache import (
    flat_index,
    ivf_index,
    load_index,
    open_index,
    read_dataset_info,
    read_index,
    save_index,
)
from ovml.pipeline.label_embeddings import label_embeddings
from ovml.pipeline.rundir import RunDir, check_same_clip, files_under
from ovml.pipeline.settings import SearchConfig, check_settings


def search(cfg: SearchConfig) -> dict:
    """{query, dataset, method, index, random_weights, results: [{rank, image_id, path, score}] best first}."""
    check_settings(cfg)
    query = " ".join(cfg.query.split())
    if not query:
        raise OvmlError('the query is empty; pass what to look for, e.g. `ovml search "a dog on a beach"`')
    if cfg.dataset not in DATASETS:
        raise OvmlError(f"unknown dataset '{cfg.dataset}'; choose one of: {', '.join(DATASETS)}")
    run_dir = RunDir(cfg.run_dir)
    cfg = replace(cfg, clip=run_dir.clip(cfg.clip))
    cache = run_dir / image_cache(cfg.dataset)
    for name in ("index.faiss", "items.parquet", "dataset.json"):
        if not (cache / name).is_file():
            raise OvmlError(f"{cache} holds no image cache; run `ovml embed-images --dataset {cfg.dataset} "
                            f"--root DIR --run-dir {run_dir.path}` first")
    if not cfg.zero_shot:
        run_dir.require(ADAPTER, produced_by="train_adapter")
    # Verified like any stage's inputs, before anything is read from them; the hashes also name search's index.
    hashes = run_dir.verified_hashes(files_under(run_dir.path, [image_cache(cfg.dataset)]
                                                 + ([] if cfg.zero_shot else [ADAPTER])))
    check_same_clip(read_dataset_info(cache)["clip"], cfg.clip, cache)
    encoder = load_clip(cfg.clip, cfg.device)
    if cfg.zero_shot:
        method, templates, adapter = "zero-shot", "pool", None
    else:  # verified, and the adapter verified is the one loaded even when train-adapter commits meanwhile
        (adapter, adapter_config), adapter_hashes = run_dir.verified_load(
            [p for p in (run_dir / ADAPTER_WEIGHTS, run_dir / ADAPTER_CONFIG) if p.is_file()],
            lambda: load_adapter(run_dir / ADAPTER, cfg.clip, encoder.dim))
        hashes.update(adapter_hashes)
        method, templates = "adapter", adapter_config.label_templates
    query_emb = label_embeddings(encoder, [query], templates)
    items = atomic.read_parquet(cache / "items.parquet", f"ovml embed-images --force --dataset {cfg.dataset} "
                                "--root DIR", columns=["image_id", "path"])
    index = _index(run_dir, cfg, adapter, hashes)
    if index.ntotal != len(items):
        raise OvmlError(f"{cache} is inconsistent ({len(items)} items, {index.ntotal} vectors); re-run "
                        f"`ovml embed-images --force --dataset {cfg.dataset}`")
    if cfg.index == "ivf":
        index.nprobe = cfg.nprobe
    similarity, rows = index.search(query_emb, cfg.top)
    found = rows[0] >= 0
    similarity, rows = similarity[0][found], rows[0][found]
    if adapter is not None:
        similarity = torch.sigmoid(adapter.scale * torch.from_numpy(similarity) + adapter.bias.detach()).numpy()
    items = items.take(rows).to_pylist()
    return {"query": query, "dataset": cfg.dataset, "method": method, "index": cfg.index,
            "random_weights": bool(encoder.random_weights),
            "results": [{"rank": rank, "image_id": item["image_id"], "path": item["path"],
                         "score": round(float(score), 6)}
                        for rank, (item, score) in enumerate(zip(items, similarity, strict=True), start=1)]}


def _index(run_dir: RunDir, cfg: SearchConfig, adapter, hashes: dict[str, str]) -> faiss.Index:
    """The FAISS index to search: the image cache's own for flat zero-shot, else one built once and kept in
    cache/search/<dataset>/, named by the sha256 of what it was built from (so a new adapter or a new image
    cache makes a new index, and the stale one is deleted; a damaged one is rebuilt, as any cache file)."""
    images = run_dir / image_cache(cfg.dataset) / "index.faiss"
    if adapter is None and cfg.index == "flat":
        return open_index(images)
    method = "zero-shot" if adapter is None else "adapter"
    sources = [f"{image_cache(cfg.dataset)}/index.faiss"] + ([] if adapter is None else [ADAPTER_WEIGHTS])
    key = hashlib.sha256("".join(hashes[rel] for rel in sources).encode()).hexdigest()[:16]
    directory = run_dir / search_cache(cfg.dataset)
    path = directory / f"{method}-{cfg.index}-{key}.faiss"
    if path.is_file():
        with contextlib.suppress(RuntimeError):  # faiss's signal for a damaged file: rebuilt below
            return load_index(path)
    vectors = read_index(images)
    if adapter is not None:
        vectors = adapter.all_features(torch.from_numpy(vectors)).numpy()
    index = ivf_index(vectors) if cfg.index == "ivf" else flat_index(vectors)
    save_index(path, index)
    for stale in directory.glob(f"{method}-{cfg.index}-*.faiss"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return index
