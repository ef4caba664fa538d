"""embed-images throughput (images/s) with 0 and N DataLoader workers, with and without --local (patch
features, stored float16 or as PQ codes), through the real stage; with --local also the patch bytes per image.

Random CLIP weights cost exactly what the pretrained ones do; the numbers say nothing about accuracy.

    .venv/bin/python benchmarks/bench_embed_images.py [--clip ViT-B-32:random] [--images 256] [--workers 0 2]
        [--local no float16 pq]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ovml.pipeline.clip import load_clip
from ovml.pipeline.image_cache import PATCH_CODES, PATCH_QUANTIZER, PATCHES
from ovml.stages.embed_images import EmbedImagesConfig, embed_images


def write_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """Photo-sized JPEGs (500x375, smooth colour fields like real scenes) and a folder-dataset CSV."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((500, 375), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)
        rows.append(f"{i:04d}.jpg,photo\n")
    (folder / "labels.csv").write_text("path,labels\n" + "".join(rows))
    return folder / "labels.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="ViT-B-32:random")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--local", choices=["no", "float16", "pq"], nargs="+", default=["no"],
                        help="no, or --local with this --local-store")
    args = parser.parse_args()

    load_clip(args.clip, "cpu")  # model creation is not part of the throughput
    print(f"{args.clip}, {args.images} JPEGs 500x375, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("| loader workers | --local | images/s | patch bytes/image |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        csv_file = write_photos(Path(tmp), args.images)
        for workers in args.workers:
            for local in args.local:
                run_dir = Path(tmp) / f"run-{workers}-{local}"
                outcome = embed_images(EmbedImagesConfig(
                    run_dir=run_dir, clip=args.clip, device="cpu", dataset="folder", root=str(csv_file),
                    batch_size=args.batch_size, workers=workers, local=local != "no",
                    local_store="float16" if local == "no" else local, force=True))
                files = [run_dir / "images" / "folder" / name for name in (PATCHES, PATCH_CODES, PATCH_QUANTIZER)]
                size = sum(f.stat().st_size for f in files if f.is_file())
                size = f"{size / args.images:,.0f}" if size else "-"
                print(f"| {workers} | {local} | {outcome.summary['images_per_s']:.1f} | {size} |")


if __name__ == "__main__":
    main()
