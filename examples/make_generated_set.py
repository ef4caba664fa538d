"""A generated stand-in for Fashion-MNIST when the Debian package is missing: 2x2 grids of drawn silhouettes.

    python examples/make_generated_set.py runs/demo-images     # writes images/*.png and images.csv

Crude outlines, not photos: enough to run `make demo` end to end offline, nothing more. For the real
photos install the Debian package `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist).
"""

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

TILE = 32
SHAPES = {  # polygons on a 32x32 tile
    "t-shirt": [(4, 8), (11, 4), (21, 4), (28, 8), (25, 13), (22, 11), (22, 28), (10, 28), (10, 11), (7, 13)],
    "trouser": [(9, 3), (23, 3), (25, 29), (18, 29), (16, 12), (14, 29), (7, 29)],
    "pullover": [(3, 26), (5, 8), (11, 4), (21, 4), (27, 8), (29, 26), (24, 26), (22, 14), (22, 28), (10, 28),
                 (10, 14), (8, 26)],
    "dress": [(12, 3), (20, 3), (19, 11), (26, 29), (6, 29), (13, 11)],
    "coat": [(3, 28), (6, 7), (12, 3), (20, 3), (26, 7), (29, 28), (24, 28), (23, 16), (23, 30), (9, 30), (9, 16),
             (8, 28)],
    "sandal": [(3, 22), (29, 22), (29, 26), (3, 26), (3, 22), (8, 16), (12, 22), (18, 15), (22, 22)],
    "shirt": [(5, 9), (12, 4), (16, 8), (20, 4), (27, 9), (24, 14), (22, 12), (22, 29), (10, 29), (10, 12), (8, 14)],
    "sneaker": [(3, 20), (10, 14), (17, 16), (29, 21), (29, 26), (3, 26)],
    "bag": [(5, 12), (27, 12), (27, 29), (5, 29)],
    "ankle boot": [(8, 3), (18, 3), (19, 17), (29, 22), (29, 28), (6, 28)],
}


def tile(label: str, rng: random.Random) -> Image.Image:
    image = Image.new("L", (TILE, TILE), 0)
    shade = rng.randint(120, 255)
    draw = ImageDraw.Draw(image)
    draw.polygon(SHAPES[label], fill=shade)
    if label == "bag":
        draw.arc((10, 4, 22, 18), 180, 360, fill=shade, width=2)
    return image


def main(out: Path, count: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    for i in range(count):
        labels = [rng.choice(list(SHAPES)) for _ in range(4)]
        grid = Image.new("L", (2 * TILE, 2 * TILE), 0)
        for k, label in enumerate(labels):
            grid.paste(tile(label, rng), ((k % 2) * TILE, (k // 2) * TILE))
        grid.convert("RGB").save(out / "images" / f"{i:04d}.png")
        rows.append(f"images/{i:04d}.png,{'|'.join(sorted(set(labels)))}")
    (out / "images.csv").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo-images"))
