"""TaI-DPT beside the adapter on the testbed CLIP: accuracy, training CPU time and peak memory (issue 24).

    .venv/bin/python benchmarks/peers/bench_peer_accuracy.py            # -> docs/accuracy/peers.json + Markdown

Both methods learn from the same LLM caption pools and are scored on the same image cache with the same metrics:
1. caption pools, in `make accuracy`'s recipe (SmolLM2, `--per-label 30 --max-labels 3`, seed 0): **open**, the
   7 seen labels (shirt, sneaker, bag never named), and **closed**, all ten. A pool given with --open-pool /
   --closed-pool (a run dir holding captions/) is used as it is; a missing one is generated there;
2. embed-text --local of each pool (pooled embeddings for the adapter, word tokens for TaI-DPT's local
   prompt); embed-images --local of the 2,500 t10k 2x2 mosaics (global embeddings and 4x4 patches);
3. per vocabulary and seed, each in a fresh process (its CPU time, one thread, and peak RSS): the adapter at the stage
   defaults and at the best setting of docs/accuracy.md (`--loss bce`), through train-adapter and eval;
   TaI-DPT (benchmarks/peers/taidpt.py); the supervised ceiling, a linear probe trained **with labels** on
   8,000 2x2 mosaics of the train split's first 55,000 images (the testbed's training images, never t10k);
4. every method's scores go through one protocol function built on pipeline/metrics.py (eval's metrics code),
   which is checked against eval's own report on the zero-shot scores; mean ± std over seeds, and the share
   of the zero-shot-to-ceiling headroom each method recovers.
Nothing is tuned on t10k: TaI-DPT's learning rate and epoch are chosen on held-out captions, as the adapter's
epoch is. The numbers are the testbed model's, never CLIP's.
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import taidpt  # noqa: E402
from bench_accuracy import (  # noqa: E402 - make accuracy's recipe, one place
    DEFAULTS,
    LABEL_FILE,
    PROBE_IMAGES,
    PROBE_MOSAICS,
    TRAINING,
    VAL_IMAGES,
    VAL_MOSAICS,
    train_mosaics,
)
from peak_rss import measure  # noqa: E402

from ovml.pipeline import probe  # noqa: E402
from ovml.pipeline.artifacts import ADAPTER, CAPTIONS, TEXT_EMB, VOCABULARY, caption_parts, image_cache  # noqa: E402
from ovml.pipeline.clip import load_clip  # noqa: E402
from ovml.pipeline.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_ROOT  # noqa: E402
from ovml.pipeline.image_cache import read_image_cache, read_patches  # noqa: E402
from ovml.pipeline.label_embeddings import label_embeddings  # noqa: E402
from ovml.pipeline.label_sets import LabelSets  # noqa: E402
from ovml.pipeline.metrics import evaluate_scores  # noqa: E402
from ovml.pipeline.testbed import TestbedConfig  # noqa: E402
from ovml.pipeline.text_embeddings import read_text_embeddings, read_token_features  # noqa: E402
from ovml.pipeline.vocabulary import read_vocabulary_json  # noqa: E402
from ovml.stages.embed_images import EmbedImagesConfig, embed_images  # noqa: E402
from ovml.stages.embed_text import EmbedTextConfig, embed_text  # noqa: E402
from ovml.stages.evaluate import EvalConfig, evaluate  # noqa: E402
from ovml.stages.generate_text import GenerateTextConfig, generate_text  # noqa: E402
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter  # noqa: E402

DATASET = "fashion-mnist"
HELD_OUT = ["shirt", "sneaker", "bag"]
POOL_RECIPE = {"per_label": 30, "max_labels": 3, "seed": 0}  # bench_accuracy.py's generate-text call
# The adapter at the stage's defaults, and at the setting that won the open vocabulary on the validation mosaics of
# both testbeds (docs/accuracy.md, "Defaults"): chosen there, never on t10k.
ADAPTERS = {"adapter (defaults)": DEFAULTS,
            "adapter (sigma=0.32, best open-vocabulary setting)": {**DEFAULTS, "noise": 0.32}}
PROBE = {"mosaics": PROBE_MOSAICS, "val_mosaics": VAL_MOSAICS, "steps": probe.STEPS, "lr": probe.LR,
         "decays": list(probe.WEIGHT_DECAYS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--open-pool", type=Path, default=Path("runs/peers/pool-open"))
    parser.add_argument("--closed-pool", type=Path, default=Path("runs/peers/pool-closed"))
    parser.add_argument("--work", type=Path, default=Path("runs/peers"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--testbed", type=Path, default=TestbedConfig.out)
    parser.add_argument("--root", default=str(FASHION_MNIST_ROOT))
    parser.add_argument("--out", type=Path, default=Path("docs/accuracy/peers.json"))
    parser.add_argument("--count", type=int, default=None, help="use only each pool's first N captions")
    parser.add_argument("--pools-only", action="store_true", help="generate the missing pools, then stop")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, here and in every measured process (shared cores: 1 waits least)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    clip = f"{TestbedConfig.arch}:{args.testbed}"
    pool_dirs = {"open": args.open_pool, "closed": args.closed_pool}
    for vocab, pool in pool_dirs.items():
        generate_pool(pool, vocab, args.work)
    if args.pools_only:
        return
    images_dir = args.work / "images-local"
    print(embed_images(EmbedImagesConfig(run_dir=images_dir, clip=clip, dataset=DATASET, root=args.root, mosaic=2,
                                         local=True)), flush=True)
    cache = images_dir / image_cache(DATASET)
    vectors, items, _ = read_image_cache(cache)
    patches = np.asarray(read_patches(cache), dtype=np.float32)
    truth = np.array([[label in row for label in FASHION_MNIST_CLASSES] for row in items["positives"].to_pylist()])

    results, pools = [], {}
    ceiling_seconds, ceiling_scores, ceiling_peak = ceiling(clip, args.root, cache, args.work, args.threads)
    for vocab, pool in pool_dirs.items():
        pools[vocab] = {"path": str(pool), **embed_pool(pool, args.work / f"tokens-{vocab}", clip, args.count)}
    for seed in args.seeds:  # seed by seed, so that a run cut short has every vocabulary
        for vocab in pool_dirs:
            tokens_dir = args.work / f"tokens-{vocab}"
            # one ceiling (it has no seed), listed with every seed's rows
            results.append(row(vocab, "supervised ceiling (linear probe, labelled train mosaics)", seed,
                               protocols(ceiling_scores, truth, pools[vocab]["vocabulary"]), ceiling_seconds,
                               ceiling_peak))
            for name, settings in ADAPTERS.items():
                run_dir = args.work / "runs" / f"{vocab}-{name.split()[1].strip('()=,')}-seed{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.copytree(tokens_dir, run_dir, ignore=shutil.ignore_patterns(ADAPTER, "eval", ".lock", "images"))
                shutil.copytree(cache, run_dir / image_cache(DATASET))
                cfg = TrainAdapterConfig(run_dir=run_dir, clip=clip, seed=seed, **settings, **TRAINING)
                cpu, seconds, peak = measure(adapter_job, cfg, args.threads)
                report = evaluate(EvalConfig(run_dir=run_dir, clip=clip, dataset=DATASET)).summary
                zero_shot = (torch.from_numpy(vectors) @ torch.from_numpy(zero_shot_embeddings(clip)).T).numpy()
                check_protocols(report, zero_shot, truth, pools[vocab]["vocabulary"])
                results.append(row(vocab, name, seed, {k: v["adapter"] for k, v in report.items()
                                                       if isinstance(v, dict) and "adapter" in v}, cpu, peak,
                                   wall_seconds=round(seconds, 2)))
                if name == next(iter(ADAPTERS)):
                    results.append(row(vocab, "zero-shot", seed, {k: v["zero-shot"] for k, v in report.items()
                                                                  if isinstance(v, dict) and "zero-shot" in v}, 0, 0))
            contexts = args.work / "runs" / f"{vocab}-taidpt-seed{seed}.safetensors"
            log, seconds, peak = measure(taidpt_job, clip, str(tokens_dir), seed, str(contexts),
                                       args.threads)
            learner = load_learner(clip, contexts)
            scores = taidpt.score_images(learner, FASHION_MNIST_CLASSES, vectors, patches)
            for stream, name in (("merged", "TaI-DPT (global + local)"), ("global", "TaI-DPT global prompt only")):
                results.append(row(vocab, name, seed, protocols(scores[stream], truth, pools[vocab]["vocabulary"]),
                                   log["cpu"], peak, wall_seconds=round(seconds, 2), best=log["best"],
                                   seconds_per_lr=log["seconds_per_lr"]))
            print(f"{vocab} seed {seed}: " + json.dumps([r for r in results if r["seed"] == seed
                                                          and r["vocab"] == vocab])[:2000], flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)  # after every seed: a cut-short run keeps its rows
            args.out.write_text(json.dumps({"clip": clip, "pools": pools, "pool_recipe": POOL_RECIPE,
                                            "training": TRAINING, "probe": PROBE, "seeds": args.seeds,
                                            "results": results, "seconds": round(time.perf_counter() - t0, 1)},
                                           indent=1) + "\n")
    print(markdown(results))
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s")


def generate_pool(pool: Path, vocab: str, work: Path) -> None:
    """make accuracy's caption pool for this vocabulary, unless `pool` already holds captions."""
    if caption_parts(pool):
        return
    labels_file = work / f"labels-{vocab}.txt"
    labels_file.parent.mkdir(parents=True, exist_ok=True)
    labels_file.write_text("".join(line + "\n" for line in LABEL_FILE.read_text().splitlines()
                                   if line and not line.startswith("#")
                                   and (vocab == "closed" or line.split(":")[0] not in HELD_OUT)))
    print(generate_text(GenerateTextConfig(run_dir=pool, labels=str(labels_file), **POOL_RECIPE)), flush=True)


def embed_pool(pool: Path, tokens_dir: Path, clip: str, count: int | None) -> dict:
    """The pool's (first `count`) captions in a run dir of their own, embedded with their word tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ovml.pipeline import atomic
    from ovml.pipeline.artifacts import part_name

    shutil.rmtree(tokens_dir, ignore_errors=True)
    table = pa.concat_tables(pq.read_table(p) for p in caption_parts(pool))
    table = table.slice(0, count) if count else table
    atomic.write_parquet(tokens_dir / CAPTIONS / part_name(0), table.replace_schema_metadata(None))
    shutil.copy(pool / VOCABULARY, tokens_dir / VOCABULARY)
    print(embed_text(EmbedTextConfig(run_dir=tokens_dir, clip=clip, local=True)), flush=True)
    return {"vocabulary": read_vocabulary_json(tokens_dir / VOCABULARY), "captions": table.num_rows}


def zero_shot_embeddings(clip: str) -> np.ndarray:
    return label_embeddings(load_clip(clip), FASHION_MNIST_CLASSES, "pool")


def protocols(scores: np.ndarray, truth: np.ndarray, vocabulary: list[str]) -> dict[str, float]:
    """eval's protocols for fashion-mnist: `all` (ten labels, every mosaic, F1@3) and, when the vocabulary lacks
    some labels, `unseen` (those labels only, over the mosaics holding one, F1@K for K below their count, else
    F1@1). Values in [0, 1], keyed as eval's summary is."""
    out = {}
    metrics, _ = evaluate_scores(scores, truth, None, (3,))
    out.update({f"all {k}": v for k, v in metrics.items() if k == "mAP" or k.startswith("F1@")})
    unseen = [i for i, label in enumerate(FASHION_MNIST_CLASSES) if label not in vocabulary]
    if unseen:
        rows = truth[:, unseen].any(axis=1)
        ks = tuple(k for k in (3,) if k < len(unseen)) or (1,)
        metrics, _ = evaluate_scores(scores[rows][:, unseen], truth[rows][:, unseen], None, ks)
        out.update({f"unseen {k}": v for k, v in metrics.items() if k == "mAP" or k.startswith("F1@")})
    return out


def check_protocols(report: dict, zero_shot_scores: np.ndarray, truth: np.ndarray, vocabulary: list[str]) -> None:
    """The protocol function must give eval's own zero-shot numbers, or the rows are not comparable."""
    mine = protocols(zero_shot_scores, truth, vocabulary)
    theirs = {k: v["zero-shot"] for k, v in report.items() if isinstance(v, dict) and "zero-shot" in v}
    if set(mine) != set(theirs) or any(abs(mine[k] - theirs[k]) > 1e-4 for k in mine):
        raise SystemExit(f"protocol mismatch with eval: {mine} vs {theirs}")


def row(vocab: str, method: str, seed: int, metrics: dict, cpu: float, peak: int, **extra) -> dict:
    return {"vocab": vocab, "method": method, "seed": seed, "metrics": metrics, "train_cpu_seconds": round(cpu, 2),
            "peak_rss_gib": round(peak / 2**30, 3), **extra}


def read_captions(tokens_dir: Path) -> tuple[list[str], taidpt.Captions]:
    """A pool's captions as TaI-DPT trains on them: pooled embedding, word tokens + end token, label targets."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vocabulary = read_vocabulary_json(tokens_dir / VOCABULARY)
    captions = pa.concat_tables(pq.read_table(p, columns=["caption_id", "labels"]) for p in caption_parts(tokens_dir))
    ids, pooled = read_text_embeddings(tokens_dir / TEXT_EMB)
    if ids.to_pylist() != captions["caption_id"].to_pylist():
        raise SystemExit(f"{tokens_dir}: text_emb rows are not in caption order")
    targets, unknown = LabelSets.from_lists(captions["labels"], vocabulary)
    assert not unknown, unknown
    words, real = read_token_features(tokens_dir / TEXT_EMB).padded(np.arange(len(pooled)))
    lengths = real.sum(axis=1)
    words = np.concatenate([words, np.zeros_like(words[:, :1])], axis=1).astype(np.float32)
    words[np.arange(len(words)), lengths] = pooled  # the end token's output is the pooled embedding
    real = np.arange(words.shape[1]) <= lengths[:, None]
    return vocabulary, taidpt.Captions(torch.from_numpy(pooled), torch.from_numpy(words), torch.from_numpy(real),
                                       torch.from_numpy(targets.dense(np.arange(len(pooled)))))


def adapter_job(cfg: TrainAdapterConfig, threads: int) -> float:
    """CPU seconds of train-adapter (shared cores: wall time would count other jobs)."""
    torch.set_num_threads(threads)
    cpu = time.process_time()
    train_adapter(cfg)
    return time.process_time() - cpu


def taidpt_job(clip: str, tokens_dir: str, seed: int, out: str, threads: int) -> dict:
    """In a fresh process (peak_rss.measure): read the captions, train, save the contexts as safetensors."""
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    cpu = time.process_time()
    vocabulary, captions = read_captions(Path(tokens_dir))
    cfg = taidpt.TrainConfig(seed=seed, epochs=TRAINING["epochs"], batch_size=TRAINING["batch_size"],
                             val_fraction=TRAINING["val_fraction"])
    learner = taidpt.train(load_clip(clip), vocabulary, captions, cfg)
    save_file({"global_ctx": learner.global_ctx.data.contiguous(), "local_ctx": learner.local_ctx.data.contiguous()},
              out)
    best = max(cfg.log, key=lambda r: r["val_mAP"])
    return {"log": cfg.log, "best": best, "seconds_per_lr": cfg.seconds, "cpu": time.process_time() - cpu}


def load_learner(clip: str, path: Path) -> taidpt.PromptLearner:
    from safetensors.torch import load_file

    learner = taidpt.PromptLearner(load_clip(clip))
    contexts = load_file(str(path))
    learner.global_ctx.data, learner.local_ctx.data = contexts["global_ctx"], contexts["local_ctx"]
    return learner


def ceiling(clip: str, root: str, cache: Path, work: Path, threads: int) -> tuple[float, np.ndarray, int]:
    """(training CPU seconds, t10k scores, peak RSS) of the supervised ceiling, kept in `work` for re-runs."""
    saved = work / "ceiling.npz"
    if not saved.is_file():
        (seconds, scores, decay), _, peak = measure(_probe, clip, root, str(cache), str(work), threads)
        np.savez(saved, seconds=seconds, scores=scores, decay=decay, peak=peak)
    with np.load(saved) as data:
        PROBE["weight_decay"] = float(data["decay"])
        return float(data["seconds"]), data["scores"], int(data["peak"])


def _probe(clip: str, root: str, cache: str, work: str, threads: int) -> tuple[float, np.ndarray, float]:
    """(training CPU seconds, t10k scores, weight decay) of the ceiling: `make accuracy`'s (bench_accuracy's mosaics,
    pipeline/probe.py's fit): a linear probe on 8,000 labelled 2x2 train mosaics of train[0:55000], its weight
    decay picked on 1,250 mosaics of train[55000:60000]; t10k labels are never looked at."""
    torch.set_num_threads(threads)
    train_x, train_y = train_mosaics(clip, root, Path(work) / "probe-mosaics.npz", PROBE_IMAGES, PROBE_MOSAICS, seed=0)
    val_x, val_y = train_mosaics(clip, root, Path(work) / "val-mosaics.npz", VAL_IMAGES, VAL_MOSAICS, seed=1)
    cpu = time.process_time()
    fitted = probe.fit_ceiling(train_x, train_y, held_out=(val_x, val_y))
    seconds = time.process_time() - cpu
    vectors, _, _ = read_image_cache(Path(cache))
    return seconds, fitted.scores(vectors), fitted.weight_decay


def _cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    values = [100 * v for v in values]
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def markdown(results: list[dict]) -> str:
    lines = []
    for vocab in dict.fromkeys(r["vocab"] for r in results):
        rows = [r for r in results if r["vocab"] == vocab]
        keys = sorted({k for r in rows for k in r["metrics"]}, key=lambda k: (not k.startswith("unseen"), k))
        mean = {(r["method"], k): statistics.mean(x["metrics"][k] for x in rows if x["method"] == r["method"])
                for r in rows for k in keys}
        gains = [k for k in keys if k.endswith("mAP")]
        lines += ["", f"### {vocab} vocabulary", "",
                  "| method | " + " | ".join(keys) + " | " + " | ".join(f"headroom {k}" for k in gains)
                  + " | train CPU s | peak RSS GiB |", "|---" * (len(keys) + len(gains) + 3) + "|"]
        ceiling = next(r["method"] for r in rows if r["method"].startswith("supervised"))
        for method in dict.fromkeys(r["method"] for r in rows):
            runs = [r for r in rows if r["method"] == method]
            headroom = [(mean[(method, k)] - mean[("zero-shot", k)]) / (mean[(ceiling, k)] - mean[("zero-shot", k)])
                        for k in gains]
            cost = ("-", "-") if method == "zero-shot" else (
                f"{statistics.mean(r['train_cpu_seconds'] for r in runs):.1f}",
                f"{statistics.mean(r['peak_rss_gib'] for r in runs):.2f}")
            lines.append(f"| {method} | " + " | ".join(_cell([r["metrics"][k] for r in runs]) for k in keys)
                         + " | " + " | ".join(f"{100 * h:.0f} %" for h in headroom) + f" | {cost[0]} | {cost[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
