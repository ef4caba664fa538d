"""Local scoring on the testbed: global vs patch-pooled vs fused, for the adapter and zero-shot CLIP.

    python benchmarks/bench_local.py            # after `make accuracy` (reuses its caption pool)

1. embed-images --local of the Fashion-MNIST 2x2 test mosaics with the testbed CLIP (4x4 patches of 14 px);
2. per seed: train-adapter on the accuracy benchmark's caption pool (its default variant, held-out labels
   shirt, sneaker, bag unseen), then eval for every fusion weight and top-k pooling;
3. mean and std over seeds of mAP on `unseen` and `all` -> docs/accuracy/local.json, printed as Markdown.
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
from ovml.stages.evaluate import EvalConfig, evaluate  # noqa: E402
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter  # noqa: E402

WEIGHTS = [0.0, 0.25, 0.5, 0.75, 1.0]
TOP_KS = [1, 2, 4, 16]  # 16 = every patch of the testbed's 4x4 grid: mean pooling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, default=Path("runs/accuracy/pool-uniform"))
    parser.add_argument("--work", type=Path, default=Path("runs/local"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--root", default=str(FASHION_MNIST_ROOT))
    parser.add_argument("--out", type=Path, default=Path("docs/accuracy/local.json"))
    args = parser.parse_args()
    clip = f"{TestbedConfig.arch}:{TestbedConfig.out}"
    images = args.work / "images-local"
    print(embed_images(EmbedImagesConfig(run_dir=images, clip=clip, dataset="fashion-mnist", root=args.root,
                                         mosaic=2, local=True)), flush=True)
    rows = []
    for seed in args.seeds:
        run_dir = args.work / f"seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(args.pool, run_dir, ignore=shutil.ignore_patterns("images", "adapter", "eval"))
        shutil.copytree(images / image_cache("fashion-mnist"), run_dir / image_cache("fashion-mnist"))
        train_adapter(TrainAdapterConfig(run_dir=run_dir, clip=clip, seed=seed, **DEFAULT, **TRAINING))
        for top_k in TOP_KS:
            for weight in WEIGHTS:
                summary = evaluate(EvalConfig(run_dir=run_dir, clip=clip, dataset="fashion-mnist",
                                              local_weight=weight, local_top_k=top_k)).summary
                for method in ("adapter", "zero-shot"):
                    rows.append({"seed": seed, "top_k": top_k, "weight": weight, "method": method,
                                 "unseen": summary["unseen mAP"][f"{method}+local"],
                                 "all": summary["all mAP"][f"{method}+local"]})
                print(seed, top_k, weight, rows[-2:], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=1) + "\n")
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| method | top-k | weight | mAP unseen | mAP all |", "|---|---|---|---|---|"]
    for method in ("adapter", "zero-shot"):
        for top_k in TOP_KS:
            for weight in WEIGHTS:
                cell = [r for r in rows if (r["method"], r["top_k"], r["weight"]) == (method, top_k, weight)]
                if not cell:
                    continue
                stats = [f"{100 * np.mean([r[m] for r in cell]):.2f} ± {100 * np.std([r[m] for r in cell]):.2f}"
                         for m in ("unseen", "all")]
                lines.append(f"| {method} | {top_k} | {weight} | {stats[0]} | {stats[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
