"""train-adapter wall time and peak memory, and the paper's cost argument: one adapter step vs one prompt-tuning step.

    .venv/bin/python benchmarks/bench_train_adapter.py                 # 100,000 captions x 1,006 labels
    .venv/bin/python benchmarks/bench_train_adapter.py --captions 10000 --prompt-labels 128   # quick look
    .venv/bin/python benchmarks/bench_train_adapter.py --captions 1000000 --labels 7586 --epochs 1 --no-steps
                                                                       # Open Images scale: peak RSS, s/epoch
    .venv/bin/python benchmarks/bench_train_adapter.py --captions 1000 --images 1000000 --labels 7586 --epochs 1 \
        --no-steps                    # image-supervised (train-adapter --images): 1M labelled images beside
                                      # 1,000 captions (whose labels/train.parquet names the 7,586 labels)

Synthetic data (random unit label embeddings, captions = their labels' sum plus noise): the cost is that of
real data of the same shape; the val mAP printed says nothing about real accuracy. Prompt tuning is CoOp
style: 16 learnable context tokens in front of every label name, pushed through the ViT-B-16 text tower
(random weights, same FLOPs) and back; the labels go through in chunks with gradient accumulation, which
is the same step as one big batch, in bounded memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from peak_rss import measure

from ovml.pipeline.adapter import Adapter, AdapterConfig, perturb
from ovml.pipeline.artifacts import part_name
from ovml.pipeline.clip import load_clip
from ovml.pipeline.losses import asl
from ovml.pipeline.text_embeddings import embedding_array, write_text_embeddings
from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter

DIM = 512
N_CTX = 16


def unit(m: np.ndarray) -> np.ndarray:
    return (m / np.linalg.norm(m, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_run(root: Path, captions: int, labels: int, seed: int = 0, part_size: int = 50_000,
                  dim: int = DIM) -> Path:
    """captions/ and text_emb/ in parts of part_size, as generate-text and embed-text write them, never holding
    a [captions, labels] matrix (1M x 7,586 would be 30 GB as float32)."""
    rng = np.random.default_rng(seed)
    vocabulary = pa.array([f"label {i}" for i in range(labels)])
    label_emb = unit(rng.normal(size=(labels, dim)))
    (root / "captions").mkdir(parents=True)
    for part, start in enumerate(range(0, captions, part_size)):
        n = min(part_size, captions - start)
        per_caption = rng.integers(1, 5, size=n)
        chosen = rng.integers(0, labels, size=(n, 4))  # the first per_caption of each row; a repeat is rare
        used = np.arange(4) < per_caption[:, None]
        text = unit((label_emb[chosen] * used[..., None]).sum(axis=1) + 0.05 * rng.normal(size=(n, dim)))
        ids = [f"c{i:07d}" for i in range(start, start + n)]
        offsets = pa.array(np.concatenate([[0], np.cumsum(per_caption)]).astype(np.int32))
        caption_labels = pa.ListArray.from_arrays(offsets, vocabulary.take(pa.array(chosen[used])))
        pq.write_table(pa.table({"caption_id": ids, "labels": caption_labels}), root / f"captions/{part_name(part)}")
        write_text_embeddings(root / f"text_emb/{part_name(part)}", ids, text, "float32")
    (root / "captions/vocabulary.json").write_text(json.dumps({"labels": vocabulary.to_pylist(), "synonyms": {}}))
    (root / "labels").mkdir()
    pq.write_table(pa.table({"label": vocabulary, "embedding": embedding_array(label_emb)}),
                   root / "labels/train.parquet")
    return root


def synthetic_images(root: Path, images: int, labels: int, seed: int = 1, chunk: int = 100_000) -> None:
    """images/synthetic/ as embed-images writes it: `images` unit vectors, each the sum of its 1-4 labels'
    embeddings (those of synthetic_run) plus noise, their labels in items.parquet."""
    from ovml.pipeline.image_cache import FAILURES_SCHEMA, ITEMS_SCHEMA, write_image_cache

    label_emb = unit(np.random.default_rng(0).normal(size=(labels, DIM)))  # synthetic_run's, same seed
    vocabulary = pa.array([f"label {i}" for i in range(labels)])
    rng = np.random.default_rng(seed)
    vectors = np.empty((images, DIM), dtype=np.float32)
    positives = []
    for start in range(0, images, chunk):
        n = min(chunk, images - start)
        per_image = rng.integers(1, 5, size=n)
        chosen = rng.integers(0, labels, size=(n, 4))
        used = np.arange(4) < per_image[:, None]
        vectors[start:start + n] = unit((label_emb[chosen] * used[..., None]).sum(axis=1)
                                        + 0.05 * rng.normal(size=(n, DIM)))
        offsets = pa.array(np.concatenate([[0], np.cumsum(per_image)]).astype(np.int32))
        positives.append(pa.ListArray.from_arrays(offsets, vocabulary.take(pa.array(chosen[used]))))
    ids = pa.array([f"i{i:07d}" for i in range(images)])
    items = pa.table({"row": pa.array(np.arange(images)), "image_id": ids, "path": ids,
                      "positives": pa.chunked_array(positives), "negatives": pa.nulls(images, pa.list_(pa.string())),
                      "ignored": pa.chunked_array([pa.array([[]] * images, pa.list_(pa.string()))])},
                     schema=ITEMS_SCHEMA)
    write_image_cache(root / "images" / "synthetic", vectors, items, FAILURES_SCHEMA.empty_table(), {
        "dataset": "folder", "root": str(root), "clip": "ViT-B-16:random", "random_weights": True,
        "labels": vocabulary.to_pylist(), "splits": {"all": vocabulary.to_pylist()}, "images": images,
        "failures": 0})


def adapter_step_seconds(cfg: TrainAdapterConfig, labels: int, repeats: int = 20) -> float:
    torch.manual_seed(0)
    model = Adapter(AdapterConfig(dim=DIM, clip=cfg.clip, vocabulary=[], hidden=cfg.hidden, dropout=cfg.dropout,
                                  alpha=cfg.alpha, head=cfg.head, scale=cfg.scale)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    label_emb = F.normalize(torch.randn(labels, DIM), dim=-1)
    x = F.normalize(torch.randn(cfg.batch_size, DIM), dim=-1)
    targets = (torch.rand(cfg.batch_size, labels) < 3 / labels).float()
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats + 3):
        t0 = time.perf_counter()
        loss = asl(model(perturb(x, cfg.noise, cfg.renorm, generator), label_emb), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[3:]))


def prompt_tuning_step_seconds(labels: int, batch: int, chunk: int) -> float:
    """One CoOp step: every label's prompt through the text tower, ASL against a batch of image features."""
    encoder = load_clip("ViT-B-16:random", device="cpu")
    model = encoder.model
    for p in model.parameters():
        p.requires_grad_(False)
    context = torch.nn.Parameter(0.02 * torch.randn(N_CTX, model.token_embedding.embedding_dim))
    optimizer = torch.optim.AdamW([context], lr=2e-3)
    tokens = encoder.tokenizer([" ".join(["X"] * N_CTX) + f" label {i}." for i in range(labels)])
    images = F.normalize(torch.randn(batch, DIM), dim=-1)
    targets = (torch.rand(batch, labels) < 3 / labels).float()
    t0 = time.perf_counter()
    optimizer.zero_grad()
    for start in range(0, labels, chunk):
        chunk_tokens = tokens[start:start + chunk]
        x = model.token_embedding(chunk_tokens)
        x = torch.cat([x[:, :1], context.expand(len(x), -1, -1), x[:, 1 + N_CTX:]], dim=1)
        x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
        x = model.ln_final(x)[torch.arange(len(x)), chunk_tokens.argmax(dim=-1)] @ model.text_projection
        logits = 100 * images @ F.normalize(x, dim=-1).T
        # ASL sums over labels, so per-chunk losses add up to the full-batch loss: exact accumulation
        asl(logits, targets[:, start:start + chunk]).backward()
    optimizer.step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=100_000)
    parser.add_argument("--labels", type=int, default=1006)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=0, help="also train on this many labelled synthetic images")
    parser.add_argument("--store-dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--no-steps", action="store_true", help="only the stage: skip the step comparison")
    parser.add_argument("--prompt-labels", type=int, default=1006,
                        help="labels pushed through the text tower in the prompt-tuning step")
    parser.add_argument("--prompt-chunk", type=int, default=64)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    cfg = TrainAdapterConfig(clip="ViT-B-16:random", device="cpu", epochs=args.epochs, patience=args.epochs,
                             store_dtype=args.store_dtype, images="synthetic" if args.images else "")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = synthetic_run(Path(tmp), args.captions, args.labels)
        if args.images:
            synthetic_images(run, args.images, args.labels)
        print(f"synthetic run dir: {time.perf_counter() - t0:.1f} s")
        cfg.run_dir = run
        outcome, _, peak = measure(train_adapter, cfg)  # a fresh process: its peak RSS is the stage's alone
        log = pq.read_table(run / "adapter/train_log.parquet").to_pylist()
    epoch_seconds = [r["seconds"] for r in log]
    print(f"train-adapter: {args.captions:,} captions + {args.images:,} images x {args.labels:,} labels, d={DIM}, "
          f"hidden={cfg.hidden}, "
          f"batch {cfg.batch_size}, --store-dtype {args.store_dtype}, {len(log)} epochs: {outcome.seconds:.1f} s "
          f"wall (epochs {sum(epoch_seconds):.1f} s, {np.mean(epoch_seconds):.1f} s/epoch incl. val mAP; "
          f"best val mAP {outcome.summary['best_val_mAP']:.3f}); peak RSS {peak / 2**30:.2f} GiB")
    if args.no_steps:
        return
    adapter_step = adapter_step_seconds(cfg, args.labels)
    print(f"one adapter step (batch {cfg.batch_size}, {args.labels} labels): {adapter_step * 1000:.1f} ms")
    prompt_step = prompt_tuning_step_seconds(args.prompt_labels, cfg.batch_size, args.prompt_chunk)
    print(f"one prompt-tuning step through ViT-B-16 text tower ({args.prompt_labels} labels, "
          f"{N_CTX} context tokens, fwd+bwd): {prompt_step:.1f} s")
    full_step = prompt_step * args.labels / args.prompt_labels  # the tower's cost is linear in the prompts
    print(f"  -> for {args.labels} labels: {full_step:.1f} s = {full_step / adapter_step:,.0f}x the adapter step"
          + ("" if args.prompt_labels == args.labels else " (scaled linearly)"))


if __name__ == "__main__":
    main()
