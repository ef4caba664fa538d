"""eval at Open Images scale: peak RSS and wall time of `ovml eval` on 125,000 images x 7,586 labels.

    .venv/bin/python benchmarks/bench_eval.py                                   # 125,000 x 7,586, top-50 scores
    .venv/bin/python benchmarks/bench_eval.py --images 25000 --labels 1006      # a second size, for the growth
    .venv/bin/python benchmarks/bench_eval.py --save-scores all                 # every score in scores.parquet

Synthetic cache (random unit image vectors leaning towards 1-8 positive labels; 0-8 verified negatives per image,
so, as in Open Images, every other label is unknown), a random ViT-B-16-sized adapter, and label embeddings
pre-filled in the label cache (embedding 7,586 x 85 prompts on this CPU would take hours and is embed-text's
cost, not eval's). Protocols as for Open Images: ZSL on 400 unseen labels, GZSL on all. Eval runs in a fresh
process, so the peak RSS is the stage's own (CLIP model load included); the numbers say nothing of accuracy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import torch
from peak_rss import measure

from ovml.pipeline import atomic
from ovml.pipeline.adapter import Adapter, AdapterConfig, save_adapter
from ovml.pipeline.artifacts import LABEL_CACHE, eval_dir, image_cache
from ovml.pipeline.clip import ClipSpec
from ovml.pipeline.image_cache import ITEMS_SCHEMA, write_index
from ovml.pipeline.label_embeddings import label_embeddings, load_templates
from ovml.stages.evaluate import EvalConfig, evaluate

CLIP = "ViT-B-16:random"
DIM = 512
UNSEEN = 400


def unit(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_run(root: Path, images: int, labels: int, seed: int = 0, noise: float = 1.0) -> Path:
    """noise: per-dimension std of what is added to an image's lean towards its labels (1.0: mostly noise, enough
    for eval, whose cost does not depend on the values; search's recall does, so it asks for clusters)."""
    rng = np.random.default_rng(seed)
    names = [f"label {i}" for i in range(labels)]
    def encode_text(texts, progress=None):
        return rng.standard_normal((len(texts), DIM), np.float32)

    per_template = SimpleNamespace(spec=ClipSpec.parse(CLIP), dim=DIM, encode_text=encode_text)
    label_emb = label_embeddings(per_template, names, "pool", cache_dir=root / LABEL_CACHE)
    n_pos, n_neg = rng.integers(1, 9, size=images), rng.integers(0, 9, size=images)
    pos, neg = rng.integers(0, labels, size=(images, 8)), rng.integers(0, labels, size=(images, 8))
    pos_used, neg_used = np.arange(8) < n_pos[:, None], np.arange(8) < n_neg[:, None]
    vectors = np.empty((images, DIM), dtype=np.float32)
    for start in range(0, images, 10_000):
        rows = slice(start, start + 10_000)
        lean = (label_emb[pos[rows]] * pos_used[rows, :, None]).sum(axis=1)
        vectors[rows] = unit(lean + noise * rng.normal(size=lean.shape))
    vocabulary = pa.array(names)

    def lists(chosen: np.ndarray, used: np.ndarray) -> pa.ListArray:
        offsets = np.concatenate([[0], np.cumsum(used.sum(axis=1))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), vocabulary.take(pa.array(chosen[used])))

    cache = root / image_cache("openimages")
    ids = [f"img{i:07d}" for i in range(images)]
    atomic.write_parquet(cache / "items.parquet", pa.table({
        "row": np.arange(images), "image_id": ids, "path": [f"/data/{i}.jpg" for i in ids],
        "positives": lists(pos, pos_used), "negatives": lists(neg, neg_used),
        "ignored": pa.array([[]] * images, pa.list_(pa.string())),
    }, schema=ITEMS_SCHEMA))
    atomic.write_json(cache / "dataset.json", {
        "dataset": "openimages", "root": "/data", "clip": CLIP, "random_weights": True, "labels": names,
        "splits": {"unseen": names[-UNSEEN:]}, "images": images, "failures": 0,
    })
    write_index(cache / "index.faiss", vectors)
    torch.manual_seed(seed)
    adapter = Adapter(AdapterConfig(dim=DIM, clip=CLIP, vocabulary=names[:-UNSEEN], hidden=512))
    torch.nn.init.normal_(adapter.mlp[-1].weight, std=0.02)
    save_adapter(root / "adapter", adapter)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=125_000)
    parser.add_argument("--labels", type=int, default=7586)
    parser.add_argument("--save-scores", default="top", choices=["top", "all"])
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, {len(load_templates())} prompt templates (pre-filled)")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = synthetic_run(Path(tmp), args.images, args.labels)
        print(f"synthetic run dir: {time.perf_counter() - t0:.1f} s")
        cfg = EvalConfig(run_dir=run, clip=CLIP, device="cpu", dataset="openimages", save_scores=args.save_scores)
        outcome, seconds, peak = measure(evaluate, cfg)
        out = run / eval_dir("openimages")
        sizes = {p.name: p.stat().st_size for p in out.glob("*.parquet")}
    print(f"eval: {args.images:,} images x {args.labels:,} labels (ZSL {UNSEEN}, GZSL {args.labels}), "
          f"--save-scores {args.save_scores}: {seconds:.1f} s wall, peak RSS {peak / 2**30:.2f} GiB")
    for key, value in outcome.summary.items():
        if "mAP" in key or "F1" in key:
            print(f"  {key}: {value}")
    for name, size in sorted(sizes.items()):
        print(f"  {name}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
