"""Accuracy on the testbed CLIP: does the text-trained adapter beat zero-shot on images? (`make accuracy`)

1. trains (or reuses) the testbed CLIP on Fashion-MNIST train mosaics (pipeline/testbed.py);
2. SmolLM2 writes captions for the seen classes only (all ten but --held-out), uniform and similar sampling;
3. embed-text with the testbed model; embed-images on 2x2 mosaics of the t10k **test** split;
4. per variant and seed: train-adapter + eval in a copy of the base run, through the real stages;
5. tables (mean +- std over seeds, zero-shot as the baseline row) for mAP and F1 on `unseen` and `all`,
   the modality gap of the testbed, and a plot of mAP against sigma -> docs/accuracy/ (results.json, results.png).

Nothing here is tuned on the test split: every variant is a fixed setting chosen before the run, and all are
reported. The numbers are the testbed model's, never CLIP's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ovml.pipeline.artifacts import ADAPTER, CAPTIONS, TEXT_EMB, image_cache
from ovml.pipeline.clip import load_clip
from ovml.pipeline.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT
from ovml.pipeline.image_cache import read_image_cache
from ovml.pipeline.testbed import CaptionGrammar, TestbedConfig, train_testbed
from ovml.pipeline.text_embeddings import read_text_embeddings
from ovml.stages.embed_images import EmbedImagesConfig, embed_images
from ovml.stages.embed_text import EmbedTextConfig, embed_text
from ovml.stages.evaluate import EvalConfig, evaluate
from ovml.stages.generate_text import GenerateTextConfig, generate_text
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter

LABEL_FILE = Path("examples/fashion_labels.txt")
SIGMAS = [0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16]
DEFAULT = {"noise": 0.04, "renorm": False, "head": "cosine", "loss": "asl"}
# Adapter settings for a few hundred captions (the stage defaults are sized for 100k).
TRAINING = {"epochs": 40, "hidden": 256, "batch_size": 16, "val_fraction": 0.2, "patience": 10}


def variants() -> list[tuple[str, str, str, dict]]:
    """(table, name, caption pool, train-adapter settings); the pool's name says its sampling and templates."""
    rows = [("noise", f"sigma={s} renorm={r}", "uniform", {**DEFAULT, "noise": s, "renorm": r})
            for r in (False, True) for s in SIGMAS]
    rows += [("head", "head=magnitude", "uniform", {**DEFAULT, "head": "magnitude"}),
             ("loss", "loss=bce", "uniform", {**DEFAULT, "loss": "bce"}),
             ("loss", "loss=rank", "uniform", {**DEFAULT, "loss": "rank"}),
             ("templates", "templates=single", "uniform-single", DEFAULT),
             ("sampling", "sampling=similar", "similar", DEFAULT)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-out", default="shirt,sneaker,bag",
                        help="classes the captions never mention (the unseen labels)")
    parser.add_argument("--per-label", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("runs/accuracy"))
    parser.add_argument("--testbed", type=Path, default=TestbedConfig.out)
    parser.add_argument("--root", default=str(FASHION_MNIST_ROOT))
    parser.add_argument("--out", type=Path, default=Path("docs/accuracy/results.json"))
    args = parser.parse_args()
    t0 = time.perf_counter()

    held_out = [name.strip() for name in args.held_out.split(",") if name.strip()]
    unknown = set(held_out) - set(FASHION_MNIST_CLASSES)
    if unknown:
        sys.exit(f"--held-out names unknown classes {sorted(unknown)}; choose among {FASHION_MNIST_CLASSES}")
    print(train_testbed(TestbedConfig(out=args.testbed, root=args.root)), flush=True)
    clip = f"{TestbedConfig.arch}:{args.testbed}"
    args.work.mkdir(parents=True, exist_ok=True)
    labels_file = args.work / "labels-seen.txt"
    labels_file.write_text("".join(line + "\n" for line in LABEL_FILE.read_text().splitlines()
                                   if line and not line.startswith("#") and line.split(":")[0] not in held_out))

    images_dir = args.work / "images-run"
    print(embed_images(EmbedImagesConfig(run_dir=images_dir, clip=clip, dataset="fashion-mnist", root=args.root,
                                         mosaic=2)), flush=True)
    pools = {}
    for pool, sampling, templates in [("uniform", "uniform", "pool"), ("similar", "similar", "pool"),
                                      ("uniform-single", "uniform", "single")]:
        run_dir = args.work / f"pool-{pool}"
        print(generate_text(GenerateTextConfig(run_dir=run_dir, labels=str(labels_file), per_label=args.per_label,
                                               max_labels=3, sampling=sampling, clip=clip, seed=0)), flush=True)
        print(embed_text(EmbedTextConfig(run_dir=run_dir, clip=clip, templates=templates)), flush=True)
        _copy(images_dir / image_cache("fashion-mnist"), run_dir / image_cache("fashion-mnist"))
        pools[pool] = run_dir

    results = []
    for table, name, pool, settings in variants():
        for seed in args.seeds:
            run_dir = args.work / "variants" / f"{name.replace(' ', '_')}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(pools[pool], run_dir, ignore=shutil.ignore_patterns(ADAPTER, "eval", ".lock"))
            train_adapter(TrainAdapterConfig(run_dir=run_dir, clip=clip, seed=seed, **settings, **TRAINING))
            report = evaluate(EvalConfig(run_dir=run_dir, clip=clip, dataset="fashion-mnist")).summary
            results.append({"table": table, "variant": name, "seed": seed, "report": report})
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v}" for k, v in report.items() if "@" in k
                                                       or "mAP" in k), flush=True)

    gap = modality_gap(clip, images_dir, pools["uniform"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"held_out": held_out, "per_label": args.per_label, "seeds": args.seeds,
                                    "clip": clip, "training": TRAINING, "gap": gap, "results": results,
                                    "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    print(markdown(results, gap))
    plot_sigma(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {time.perf_counter() - t0:.0f} s")


def _copy(src: Path, dst: Path) -> None:
    if not dst.exists():
        shutil.copytree(src, dst)


def modality_gap(clip: str, images_dir: Path, pool: Path) -> dict:
    """Liang et al. 2022's gap on the test mosaics: centroid distance, matched vs unmatched cosine.

    Captions for the mosaics come from the testbed grammar (each names exactly its mosaic's items); the
    distance between the LLM captions' centroid and the images' centroid is what the adapter must cross.
    """
    vectors, items, _ = read_image_cache(images_dir / image_cache("fashion-mnist"))
    rng = np.random.default_rng(0)
    grammar = CaptionGrammar.load()
    index = {label: i for i, label in enumerate(FASHION_MNIST_CLASSES)}
    texts = [grammar.caption([index[label] for label in labels], rng) for labels in items["positives"].to_pylist()]
    captions = load_clip(clip).encode_text(texts)
    shuffled = captions[rng.permutation(len(captions))]
    _, llm = read_text_embeddings(pool / TEXT_EMB)
    return {
        "images": len(vectors),
        "centroid_distance_grammar_captions": float(np.linalg.norm(vectors.mean(0) - captions.mean(0))),
        "centroid_distance_llm_captions": float(np.linalg.norm(vectors.mean(0) - llm.mean(0))),
        "matched_cosine": float((vectors * captions).sum(1).mean()),
        "unmatched_cosine": float((vectors * shuffled).sum(1).mean()),
        "image_image_cosine": float((vectors * vectors[rng.permutation(len(vectors))]).sum(1).mean()),
        "text_text_cosine": float((captions * shuffled).sum(1).mean()),
        "llm_captions": len(llm),
        "llm_caption_example": pq.read_table(next((pool / CAPTIONS).glob("part-*.parquet")))["text"][0].as_py(),
    }


def _metric(report: dict, key: str, method: str) -> float | None:
    value = report.get(key, {}).get(method)
    return None if value is None else 100 * value


def _cell(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def markdown(results: list[dict], gap: dict) -> str:
    keys = sorted({k for r in results for k in r["report"] if "mAP" in k or "F1@" in k},
                  key=lambda k: (not k.startswith("unseen"), k))
    lines = []
    for table in dict.fromkeys(r["table"] for r in results):
        rows = [r for r in results if r["table"] == table]
        lines += ["", f"### {table}", "", "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        first = rows[0]["variant"]
        zero_shot = [r for r in rows if r["variant"] == first]
        lines.append("| zero-shot | " + " | ".join(_cell([_metric(r["report"], k, "zero-shot") for r in zero_shot])
                                                    for k in keys) + " |")
        for variant in dict.fromkeys(r["variant"] for r in rows):
            runs = [r for r in rows if r["variant"] == variant]
            lines.append(f"| adapter {variant} | " + " | ".join(
                _cell([_metric(r["report"], k, "adapter") for r in runs]) for k in keys) + " |")
    lines += ["", "### modality gap (test mosaics)", ""] + [f"- {k}: {v}" for k, v in gap.items()]
    return "\n".join(lines)


def plot_sigma(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for renorm in (False, True):
        for protocol, style in (("unseen", "-"), ("all", "--")):
            means = []
            for sigma in SIGMAS:
                runs = [r for r in results if r["variant"] == f"sigma={sigma} renorm={renorm}"]
                means.append(statistics.mean(_metric(r["report"], f"{protocol} mAP", "adapter") for r in runs))
            ax.plot(range(len(SIGMAS)), means, style, marker="o", label=f"adapter {protocol}, renorm={renorm}")
    for protocol, style in (("unseen", "-"), ("all", "--")):
        zero = [_metric(r["report"], f"{protocol} mAP", "zero-shot") for r in results if r["table"] == "noise"]
        ax.axhline(statistics.mean(zero), color="grey", linestyle=style, label=f"zero-shot {protocol}")
    ax.set_xticks(range(len(SIGMAS)), [str(s) for s in SIGMAS])
    ax.set_xlabel("noise sigma (per dimension)")
    ax.set_ylabel("mAP (%)")
    ax.set_title("testbed CLIP, Fashion-MNIST 2x2 test mosaics, mean of seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
