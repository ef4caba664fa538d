"""Ray engine overhead vs the local engine, same work and same output, for the three stages it runs.

    .venv/bin/python benchmarks/bench_ray.py [--images 256] [--parts 16] [--labels 10] [--actors 2]

Each stage runs once with --engine local and once with --engine ray (Ray already started: its start-up is
timed on its own line) into separate run directories, and the artifacts are compared byte for byte.
Wall time covers the whole stage: model loads, and on Ray the actors' start-up. Random CLIP weights cost
what the pretrained ones do and mean nothing as accuracy. The last table is the per-unit cost the driver
pays on any cluster (receiving and writing chunks), the ceiling for the paper estimate in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
from bench_embed_images import write_photos
from bench_embed_text import llm_style_captions

from ovml.pipeline import atomic
from ovml.pipeline.text_embeddings import embedding_array
from ovml.stages.embed_images import EmbedImagesConfig, embed_images
from ovml.stages.embed_text import EmbedTextConfig, embed_text
from ovml.stages.generate_text import CAPTION_SCHEMA, GenerateTextConfig, generate_text

LABELS = ["dog", "cat", "car", "tree", "boat", "horse", "chair", "bicycle", "person", "beach", "bus", "bird"]


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def timed(stage, cfg) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = stage(cfg).summary
    return time.perf_counter() - start, summary


def write_captions(run_dir: Path, parts: int, rows: int) -> None:
    """Captions parts in generate-text's schema, LLM-shaped text, for embed-text to read."""
    texts = llm_style_captions(parts * rows)
    for part in range(parts):
        batch = [{"caption_id": f"0-{part}-{i}", "text": texts[part * rows + i], "labels": ["dog"],
                  "requested": ["dog"], "prompt_id": "p0", "backend": "llama-cpp", "model": "m", "seed": i}
                 for i in range(rows)]
        atomic.write_parquet(run_dir / "captions" / f"part-{part:05d}.parquet",
                             pa.Table.from_pylist(batch, schema=CAPTION_SCHEMA))
    atomic.write_json(run_dir / "captions" / "vocabulary.json", {"labels": ["dog"], "synonyms": {}})


def driver_images_per_s(dim: int, batch: int, chunks: int, workdir: Path) -> float:
    """What the driver does per chunk on Ray (take the table, write chunk-*.parquet), without any model."""
    rng = np.random.default_rng(0)
    tables = [pa.table({"row": pa.array(range(i * batch, (i + 1) * batch), pa.int64()),
                        "error": pa.array([None] * batch, pa.string()),
                        "embedding": embedding_array(rng.standard_normal((batch, dim), dtype=np.float32))})
              for i in range(chunks)]
    start = time.perf_counter()
    for i, table in enumerate(tables):
        atomic.write_parquet(workdir / "driver" / f"chunk-{i * batch:09d}.parquet", table)
    return chunks * batch / (time.perf_counter() - start)


def decode_images_per_s(clip: str, csv_file: Path) -> float:
    """JPEG decode + CLIP preprocessing on one core: what an actor does before its model sees a chunk."""
    from ovml.pipeline.clip import load_clip
    from ovml.pipeline.datasets import read_dataset
    from ovml.stages.embed_images import _Pixels

    records = read_dataset("folder", csv_file).records
    pixels = _Pixels(records, list(range(len(records))), load_clip(clip, "cpu").preprocess)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    for i in range(len(records)):
        pixels[i]
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return len(records) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="ViT-B-32:random")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--parts", type=int, default=16, help="captions parts of 64 rows for embed-text")
    parser.add_argument("--labels", type=int, default=10, help="labels for generate-text, 2 captions each")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--only-ceilings", action="store_true", help="just the driver and decode rates")
    args = parser.parse_args()
    if args.only_ceilings:
        with tempfile.TemporaryDirectory() as tmp:
            csv_file = write_photos(Path(tmp), args.images)
            print(f"driver: {driver_images_per_s(512, 64, 200, Path(tmp)):,.0f} images/s; "
                  f"decode on one core: {decode_images_per_s(args.clip, csv_file):.0f} images/s")
        return

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), ray {ray.__version__}, {args.actors} actors, {args.clip}")
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    print(f"ray.init (local, 2 CPUs): {time.perf_counter() - start:.1f} s\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        csv_file = write_photos(work, args.images)
        labels = work / "labels.txt"
        labels.write_text("\n".join(LABELS[:args.labels]) + "\n")
        for engine in ("local", "ray"):
            write_captions(work / engine, args.parts, 64)
        stages = [
            ("embed-images", f"{args.images} JPEGs 500x375", "images", "images", embed_images,
             lambda e: EmbedImagesConfig(run_dir=work / e, clip=args.clip, device="cpu", dataset="folder",
                                         root=str(csv_file), batch_size=args.batch_size, workers=2, engine=e,
                                         ray_actors=args.actors)),
            ("embed-text", f"{args.parts * 64} captions in {args.parts} parts", "text_emb", "texts", embed_text,
             lambda e: EmbedTextConfig(run_dir=work / e, clip=args.clip, device="cpu", batch_size=64,
                                       templates="single", engine=e, ray_actors=args.actors)),
            ("generate-text", f"SmolLM2, {args.labels} labels x 2", "captions", "kept", generate_text,
             # its own run dirs: the synthetic caption parts above would be kept as the pool
             lambda e: GenerateTextConfig(run_dir=work / f"gen-{e}", labels=str(labels), per_label=2, part_size=8,
                                          engine=e, ray_actors=args.actors)),
        ]
        for name, work_text, folder, count, stage, config in stages:
            local_s, summary = timed(stage, config("local"))
            ray_s, _ = timed(stage, config("ray"))
            runs = ("gen-local", "gen-ray") if name == "generate-text" else ("local", "ray")
            same = tree_bytes(work / runs[0] / folder) == tree_bytes(work / runs[1] / folder)
            units = summary[count]
            rows.append(f"| {name} | {work_text} | {local_s:.1f} | {ray_s:.1f} | {ray_s - local_s:+.1f} | "
                        f"{units / local_s:.2f} | {units / ray_s:.2f} | {'yes' if same else 'NO'} |")
        driver = driver_images_per_s(512, 64, 200, work)
        decode = decode_images_per_s(args.clip, csv_file)
    ray.shutdown()
    print("| stage | work | local s | ray s | ray - local s | local units/s | ray units/s | same bytes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print(f"\ndriver alone, writing chunk files of 64 x 512 float32: {driver:,.0f} images/s")
    print(f"one core, JPEG decode + CLIP preprocessing (an actor's CPU share): {decode:.0f} images/s")


if __name__ == "__main__":
    main()
