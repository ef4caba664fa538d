"""Images as training data on the testbed CLIP (issue 23): what a few labelled images, and unlabelled ones, buy.

1. the testbed CLIP must exist (`ovml train-testbed`; trained on Fashion-MNIST train mosaics);
2. 1,000 distinct grammar captions (prompts/testbed_grammar.json, the testbed's own caption grammar: in-domain
   words, exact labels) naming 1-3 of the 7 seen classes, written in generate-text's schema (SmolLM2 would have
   cost ~30 min of LLM time on the shared cores of this session); embed-text --local (word tokens for the query
   head);
3. embed-images --local on the 2,500 t10k mosaics (evaluation only) and on the 15,000 **train**-split mosaics
   (--split train: the only images any row trains on, labelled with the seen labels or unlabelled);
4. per row and seed {0, 1, 2}: train-adapter + eval (--save-scores all) in a hard-linked copy of the base run,
   through the real stages;
5. a table (mean +- std over seeds) of unseen and all mAP / F1, with zero-shot and the supervised ceiling (the
   cosine head trained on every train mosaic with all ten labels, no captions) -> docs/accuracy/images.json.

The ceiling's adapter knows every label, so eval has no `unseen` protocol for it; its unseen numbers are computed
here from its scores.parquet exactly as eval's protocol does (the 3 held-out labels ranked among themselves over
the mosaics holding one of them), and the captions row is computed both ways as a check.
Nothing is tuned on the test split: every row's settings were fixed before the run and all rows are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from bench_accuracy import copy_captions, grammar_pool  # a sibling script: benchmarks/ is on sys.path

from ovml.pipeline.artifacts import ADAPTER, caption_parts
from ovml.pipeline.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT
from ovml.pipeline.image_cache import read_image_cache
from ovml.pipeline.metrics import evaluate_scores
from ovml.pipeline.testbed import TestbedConfig
from ovml.stages.embed_images import EmbedImagesConfig, embed_images
from ovml.stages.embed_text import EmbedTextConfig, embed_text
from ovml.stages.evaluate import EvalConfig, evaluate
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter

LABEL_FILE = Path("examples/fashion_labels.txt")  # seen-label file for the image-only rows: its 7 seen lines
TRAIN_CACHE = "fashion-mnist-train"
# bench_accuracy's adapter settings (batch 16) for rows of up to ~1,000 examples; a batch of 128 for rows of
# thousands, so that 40 epochs stay a few thousand steps.
SMALL = {"epochs": 40, "hidden": 256, "batch_size": 16, "val_fraction": 0.2, "patience": 10}
LARGE = {**SMALL, "batch_size": 128}


def rows(seen_file: str) -> list[tuple[str, str, dict]]:
    """(group, row name, train-adapter settings); every row fixed before any run, listed in the order they run
    (the rows the issue's targets name first: on a shared machine the last ones may not be reached)."""
    images = {"images": TRAIN_CACHE}
    alone = {**images, "captions": False, "seen_labels": seen_file}
    return [
        ("text", "captions only", SMALL),
        ("ceiling", "supervised ceiling (all ten labels, all train images)",
         {**LARGE, "images": TRAIN_CACHE, "captions": False, "seen_labels": "fashion-mnist:all"}),
        ("images + captions", "captions + seen images, all 15,000", {**LARGE, **images}),
        ("unlabelled", "captions + unlabelled train images", {**LARGE, "unlabelled": TRAIN_CACHE}),
        ("seen images", "seen images only, all 15,000", {**LARGE, **alone}),
        ("images + captions", "captions + seen images, 100/label", {**LARGE, **images, "images_per_label": 100}),
        ("seen images", "seen images only, 100/label", {**SMALL, **alone, "images_per_label": 100}),
        ("images + captions", "captions + seen images, 10/label", {**SMALL, **images, "images_per_label": 10}),
        ("seen images", "seen images only, 10/label", {**SMALL, **alone, "images_per_label": 10}),
        ("query head", "query head, captions + seen images, 100/label",
         {**LARGE, **images, "images_per_label": 100, "head": "query"}),
        ("distillation", "captions + seen images, 100/label, distill 1",
         {**LARGE, **images, "images_per_label": 100, "distill": 1.0}),
        ("images + captions", "captions + seen images, 1000/label", {**LARGE, **images, "images_per_label": 1000}),
        ("seen images", "seen images only, 1000/label", {**LARGE, **alone, "images_per_label": 1000}),
        ("query head", "query head, captions only", {**SMALL, "head": "query"}),
        ("unlabelled", "captions + seen images, 100/label + unlabelled train images",
         {**LARGE, **images, "images_per_label": 100, "unlabelled": TRAIN_CACHE}),
        # added after the first LLM-caption run, to tell the images' effect from the batch size's (SMALL vs LARGE)
        ("batch check", "captions only, batch 128", LARGE),
        ("batch check", "captions + seen images, 10/label, batch 128", {**LARGE, **images, "images_per_label": 10}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-out", default="shirt,sneaker,bag")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--captions", type=int, default=1000, help="captions the adapter learns from")
    parser.add_argument("--pool", type=Path, default=None, help="a generate-text run dir over the seen labels "
                        "whose first --captions captions to use (make accuracy's SmolLM2 pool); default: "
                        "grammar captions written here")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-images"))
    parser.add_argument("--testbed", type=Path, default=TestbedConfig.out)
    parser.add_argument("--root", default=str(FASHION_MNIST_ROOT))
    parser.add_argument("--only", nargs="*", default=[], help="run only rows whose name contains one of these")
    parser.add_argument("--epochs", type=int, default=None, help="override every row's epochs (a quicker look)")
    parser.add_argument("--out", type=Path, default=Path("docs/accuracy/images.json"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    held_out = [name.strip() for name in args.held_out.split(",") if name.strip()]
    if not args.testbed.is_file():
        sys.exit(f"{args.testbed} does not exist; train it first with `ovml train-testbed --out {args.testbed}`")
    clip = f"{TestbedConfig.arch}:{args.testbed}"
    base = args.work / "base"
    base.mkdir(parents=True, exist_ok=True)
    seen_file = (args.work / "labels-seen.txt").resolve()
    seen_file.write_text("".join(line + "\n" for line in LABEL_FILE.read_text().splitlines()
                                 if line and not line.startswith("#") and line.split(":")[0] not in held_out))
    if args.pool is None:
        grammar_pool(base, [label for label in FASHION_MNIST_CLASSES if label not in held_out], args.captions)
    elif not caption_parts(base):
        copy_captions(args.pool, args.captions, base)
    for stage in (
        lambda: embed_text(EmbedTextConfig(run_dir=base, clip=clip, local=True)),
        lambda: embed_images(EmbedImagesConfig(run_dir=base, clip=clip, dataset="fashion-mnist", root=args.root,
                                               local=True)),
        lambda: embed_images(EmbedImagesConfig(run_dir=base, clip=clip, dataset="fashion-mnist", root=args.root,
                                               split="train", local=True)),
    ):
        print(stage(), flush=True)

    previous = json.loads(args.out.read_text())["results"] if args.out.is_file() else []
    # a run already in --out is kept (an interrupted benchmark resumes); --only re-runs the rows it names
    results = [r for r in previous if not any(part in r["row"] for part in args.only)]
    done = {(r["row"], r["seed"]) for r in results}
    for group, name, settings in rows(str(seen_file)):
        if args.only and not any(part in name for part in args.only):
            continue
        if args.epochs is not None:
            settings = {**settings, "epochs": args.epochs}
            name = f"{name} (epochs {args.epochs})"
        for seed in args.seeds:
            if (name, seed) in done:
                continue
            run_dir = args.work / "rows" / f"{name.replace(' ', '_').replace('/', '-').replace(',', '')}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(base, run_dir, copy_function=os.link, ignore=shutil.ignore_patterns(ADAPTER, "eval",
                                                                                                ".lock"))
            started = time.perf_counter()
            trained = train_adapter(TrainAdapterConfig(run_dir=run_dir, clip=clip, seed=seed, **settings)).summary
            report = evaluate(EvalConfig(run_dir=run_dir, clip=clip, dataset="fashion-mnist",
                                         save_scores="all")).summary
            metrics = scores_metrics(run_dir, held_out)
            results.append({"group": group, "row": name, "seed": seed, "settings": settings, "train": trained,
                            "report": report, "computed": metrics,
                            "seconds": round(time.perf_counter() - started, 1)})
            print(f"{name} seed {seed}: {metrics}", flush=True)
            shutil.rmtree(run_dir / "images", ignore_errors=True)  # hard links: the base keeps the caches
            args.out.parent.mkdir(parents=True, exist_ok=True)  # after every run: a long benchmark keeps its rows
            args.out.write_text(json.dumps({"held_out": held_out, "seeds": args.seeds, "clip": clip,
                                            "results": results, "seconds": round(time.perf_counter() - t0, 1)},
                                           indent=1))
    print(markdown(results))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")




def scores_metrics(run_dir: Path, held_out: list[str]) -> dict[str, float]:
    """unseen and all mAP / F1 per method from eval's scores.parquet, by eval's protocols: `unseen` ranks the
    held-out labels over the mosaics with one of them (F1@1), `all` ranks the ten over every mosaic (F1@3)."""
    _, items, _ = read_image_cache(run_dir / "images" / "fashion-mnist")
    report = json.loads((run_dir / "eval" / "fashion-mnist" / "report.json").read_text())
    labels = report["protocols"]["all"]["labels"]
    index = {image_id: i for i, image_id in enumerate(items["image_id"].to_pylist())}
    truth = np.array([[label in row for label in labels] for row in items["positives"].to_pylist()])
    table = pq.read_table(run_dir / "eval" / "fashion-mnist" / "scores.parquet").to_pylist()
    unseen = [labels.index(label) for label in held_out]
    with_unseen = truth[:, unseen].any(axis=1)
    out = {}
    for method in ("adapter", "zero-shot"):
        scores = np.zeros(truth.shape, dtype=np.float32)
        for row in table:
            if row["method"] == method:
                scores[index[row["image_id"]]] = row["scores"]
        every, _ = evaluate_scores(scores, truth, None, (3,))
        held, _ = evaluate_scores(scores[with_unseen][:, unseen], truth[with_unseen][:, unseen], None, (1,))
        out |= {f"{method} unseen mAP": 100 * held["mAP"], f"{method} unseen F1@1": 100 * held["F1@1"],
                f"{method} all mAP": 100 * every["mAP"], f"{method} all F1@3": 100 * every["F1@3"]}
    return out


KEYS = ("unseen mAP", "unseen F1@1", "all mAP", "all F1@3")


def _cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else \
        f"{values[0]:.2f}"


def markdown(results: list[dict]) -> str:
    lines = ["| method | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    zero = [r for r in results if r["row"] == results[0]["row"]]
    lines.append("| zero-shot | " + " | ".join(_cell([r["computed"][f"zero-shot {k}"] for r in zero]) for k in KEYS)
                 + " |")
    for name in dict.fromkeys(r["row"] for r in results):
        runs = [r for r in results if r["row"] == name]
        lines.append(f"| {name} | " + " | ".join(_cell([r["computed"][f"adapter {k}"] for r in runs]) for k in KEYS)
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
