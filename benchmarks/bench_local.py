"""Local scoring on the testbed: global vs patch-pooled vs fused, with and without a local head trained on tokens.

    python benchmarks/bench_local.py            # after `make accuracy` (reuses its caption pool)

1. embed-images --local of the Fashion-MNIST 2x2 test mosaics with the testbed CLIP (4x4 patches of 14 px);
   embed-text --local of the accuracy benchmark's caption pool (its default variant, held-out labels shirt,
   sneaker, bag unseen): the captions' word-token features;
2. per seed:
   - the global adapter (train-adapter without --local), eval'd with its global head on the patches, top-k
     pooled, for every top-k and fusion weight (what eval does for an adapter without a local head);
   - an adapter with a local head (train-adapter --local) for each pooling, eval'd for every fusion weight;
     its `zero-shot+local` row pools the zero-shot patch cosines the same way, without training;
3. the accuracy cost of compressing the patches: the same adapters eval'd on a `--local-store pq` cache;
4. mean and std over seeds of mAP on `unseen` and `all` -> docs/accuracy/local.json, printed as Markdown.
Weight 0 is the global row and weight 1 the patch-only score, so one grid answers global vs local vs fused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_accuracy import DEFAULT, TRAINING  # noqa: E402 - the accuracy benchmark's adapter recipe

from ovml.pipeline.artifacts import image_cache  # noqa: E402
from ovml.pipeline.datasets import FASHION_MNIST_ROOT  # noqa: E402
from ovml.pipeline.testbed import TestbedConfig  # noqa: E402
from ovml.stages.embed_images import EmbedImagesConfig, embed_images  # noqa: E402
from ovml.stages.embed_text import EmbedTextConfig, embed_text  # noqa: E402
from ovml.stages.evaluate import EvalConfig, evaluate  # noqa: E402
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter  # noqa: E402

WEIGHTS = [0.0, 0.25, 0.5, 0.75, 1.0]
TOP_KS = [4]  # the global head on patches (eval's default k; 1, 2 and 16 were measured in the previous stop)
LOCAL_POOLINGS = [("softmax", 2), ("top-k", 1), ("top-k", 4)]  # the local head: (pooling, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, default=Path("runs/accuracy/pool-uniform"))
    parser.add_argument("--work", type=Path, default=Path("runs/local"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default=str(FASHION_MNIST_ROOT))
    parser.add_argument("--out", type=Path, default=Path("docs/accuracy/local.json"))
    args = parser.parse_args()
    clip = f"{TestbedConfig.arch}:{TestbedConfig.out}"
    images = {store: args.work / f"images-{store}" for store in ("float16", "pq")}
    for store, run_dir in images.items():
        print(embed_images(EmbedImagesConfig(run_dir=run_dir, clip=clip, dataset="fashion-mnist", root=args.root,
                                             mosaic=2, local=True, local_store=store)), flush=True)
    pool = args.work / "pool-tokens"
    shutil.rmtree(pool, ignore_errors=True)
    shutil.copytree(args.pool, pool, ignore=shutil.ignore_patterns("images", "adapter", "eval"))
    print(embed_text(EmbedTextConfig(run_dir=pool, clip=clip, local=True)), flush=True)
    rows = []
    grid = [("float16", "global", f"top-{k}", {}, {"local_top_k": k}, WEIGHTS) for k in TOP_KS]
    grid += [("float16", "local", f"{pooling} {k}" if pooling == "top-k" else pooling,
              {"local": True, "local_pooling": pooling, "local_top_k": k}, {}, WEIGHTS)
             for pooling, k in LOCAL_POOLINGS]
    grid += [("pq", "global", "top-4", {}, {"local_top_k": 4}, [0.25, 1.0]),
             ("pq", "local", "softmax", {"local": True, "local_pooling": "softmax"}, {}, [0.25, 1.0])]
    for seed in args.seeds:
        for store in images:
            run_dir = args.work / f"seed{seed}-{store}"
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(pool, run_dir)
            shutil.copytree(images[store] / image_cache("fashion-mnist"), run_dir / image_cache("fashion-mnist"))
        for store, head, pooling, train_settings, eval_settings, weights in grid:
            run_dir = args.work / f"seed{seed}-{store}"
            train_adapter(TrainAdapterConfig(run_dir=run_dir, clip=clip, seed=seed, **DEFAULT, **TRAINING,
                                             **train_settings))
            for weight in weights:
                summary = evaluate(EvalConfig(run_dir=run_dir, clip=clip, dataset="fashion-mnist",
                                              local_weight=weight, **eval_settings)).summary
                for method in ("adapter", "zero-shot"):
                    rows.append({"seed": seed, "store": store, "head": head, "pooling": pooling, "weight": weight,
                                 "method": method, "unseen": summary["unseen mAP"][f"{method}+local"],
                                 "all": summary["all mAP"][f"{method}+local"]})
                print(seed, store, head, pooling, weight, rows[-2:], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=1) + "\n")
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| patches | adapter head on patches | method | pooling | weight | mAP unseen | mAP all |",
             "|---|---|---|---|---|---|---|"]

    def key(row: dict) -> tuple:
        return row["store"], row["head"], row["method"], row["pooling"], row["weight"]

    for cell_key in dict.fromkeys(map(key, rows)):
        cell = [r for r in rows if key(r) == cell_key]
        stats = [f"{100 * np.mean([r[m] for r in cell]):.2f} ± {100 * np.std([r[m] for r in cell]):.2f}"
                 for m in ("unseen", "all")]
        lines.append("| " + " | ".join(map(str, cell_key)) + f" | {stats[0]} | {stats[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
