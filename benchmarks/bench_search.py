"""ovml search: FAISS flat vs IVF on a synthetic image cache: build time, time per query, IVF recall@10.

    .venv/bin/python benchmarks/bench_search.py                     # 125,000 images
    .venv/bin/python benchmarks/bench_search.py --images 25000      # a second size, for the growth

The cache is bench_eval.py's (unit image vectors leaning towards 1-8 of 1,000 label embeddings, per-dimension
noise 0.05 so the images cluster like real CLIP embeddings do; recall depends on that structure); the queries
are 200 label embeddings, as `ovml search "label"` would embed them. Recall@10 = the share of the flat index's
top 10 that IVF also returns. Then one end-to-end `search` call through the adapter (ViT-B-16 with random
weights: CLIP load, the query's 86 prompts through the text tower, adapted vectors indexed on first use).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_eval import CLIP, synthetic_run

from ovml.pipeline.image_cache import flat_index, ivf_index, read_index
from ovml.pipeline.label_embeddings import label_embeddings
from ovml.stages.search import SearchConfig, search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=125_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.05,
                        help="per-dimension noise around the labels' directions: lower = tighter clusters")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, faiss threads: default")
    with tempfile.TemporaryDirectory() as tmp:
        run = synthetic_run(Path(tmp), args.images, 1000, noise=args.noise)
        vectors = read_index(run / "images/openimages/index.faiss")
        queries = np.ascontiguousarray(label_embeddings(
            _NoEncoder(), [f"label {i}" for i in range(1000)], cache_dir=run / "cache/labels")[:args.queries])
        t0 = time.perf_counter()
        flat = flat_index(vectors)
        flat_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        ivf = ivf_index(vectors)
        ivf_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, truth = flat.search(queries, 10)
        flat_query = (time.perf_counter() - t0) / len(queries)
        print(f"{args.images:,} images, d={vectors.shape[1]}, {len(queries)} queries")
        print(f"flat: build {flat_build:.2f} s, {flat_query * 1000:.2f} ms/query")
        print(f"ivf ({ivf.nlist} cells): build {ivf_build:.1f} s")
        for nprobe in (8, 16, 32, 64):
            ivf.nprobe = nprobe
            t0 = time.perf_counter()
            _, found = ivf.search(queries, 10)
            seconds = (time.perf_counter() - t0) / len(queries)
            recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
            print(f"  nprobe {nprobe:>2}: {seconds * 1000:.2f} ms/query, recall@10 vs flat {recall:.3f}")
        for index in ("flat", "ivf"):
            for attempt in ("first (builds the adapted index)", "second (cached)"):
                t0 = time.perf_counter()
                search(SearchConfig(run_dir=run, clip=CLIP, device="cpu", dataset="openimages", query="label 7",
                                    index=index))
                print(f"search --index {index}, {attempt}: {time.perf_counter() - t0:.1f} s end to end")


class _NoEncoder:
    """The label cache bench_eval pre-filled answers; nothing is encoded."""

    from ovml.pipeline.clip import ClipSpec

    spec = ClipSpec.parse(CLIP)
    dim = 512

    def encode_text(self, texts, progress=None):
        raise AssertionError("the label cache should have answered")


if __name__ == "__main__":
    main()
