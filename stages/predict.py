"""predict: open-vocabulary labels for images, with the trained adapter or zero-shot CLIP.

Not a pipeline stage: it reads the adapter and caches label embeddings in the run dir, but writes no
artifact of its own. Adapter scores are sigmoid(logit) (the adapter is trained as a multi-label
classifier); zero-shot scores are the cosine of image and label embeddings. With --local, the adapter's logit
is fused with its local head's pooled patch logit as in eval's adapter+local row (`fuse_local`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ovml.pipeline.adapter import fuse_local, load_adapter
from ovml.pipeline.artifacts import ADAPTER, ADAPTER_CONFIG, ADAPTER_WEIGHTS, LABEL_CACHE
from ovml.pipeline.clip import load_clip
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.label_embeddings import label_embeddings
from ovml.pipeline.rundir import RunDir
from ovml.pipeline.vocabulary import load_vocabulary

IMAGE_BATCH = 32


@dataclass
class PredictConfig:
    run_dir: Path = Path("runs/default")
    clip: str = "ViT-B-16:openai"
    device: str = "auto"
    images: list[str] = field(default_factory=list)
    labels: str | None = None
    labels_file: str | None = None
    top_k: int = 5
    zero_shot: bool = False
    local: bool = False  # fuse in the adapter's local head on the image patches (train-adapter --local)


def predict(cfg: PredictConfig) -> list[dict]:
    """Per image, in the order given: {image, method, random_weights, labels: [{label, score}] best first}."""
    labels = _labels(cfg)
    if cfg.top_k < 1:
        raise OvmlError(f"--top-k must be at least 1, got {cfg.top_k}")
    if not cfg.images:
        raise OvmlError("no image given; pass one or more image files, e.g. `ovml predict photo.jpg --labels ...`")
    if cfg.local and cfg.zero_shot:
        raise OvmlError("--local uses the adapter's local head; drop --zero-shot (or --local)")
    images = [_open(path) for path in cfg.images]
    run_dir = RunDir(cfg.run_dir)
    if not cfg.zero_shot:
        run_dir.require(ADAPTER, produced_by="train_adapter")
        run_dir.verified_hashes([p for p in (run_dir / ADAPTER_WEIGHTS, run_dir / ADAPTER_CONFIG) if p.is_file()])
    encoder = load_clip(cfg.clip, cfg.device)
    adapter, adapter_config = (None, None) if cfg.zero_shot else load_adapter(run_dir / ADAPTER, cfg.clip, encoder.dim)
    query = adapter_config is not None and adapter_config.head == "query"
    if cfg.local and query:
        raise OvmlError("the adapter's query head already scores the image patches; drop --local")
    if cfg.local and adapter_config.local_pooling is None:
        raise OvmlError(f"the adapter in {run_dir / ADAPTER} has no local head; train it with "
                        "`ovml train-adapter --local` (after `ovml embed-text --local`) or drop --local")
    batches = [torch.stack([encoder.preprocess(image) for image in images[i:i + IMAGE_BATCH]])
               for i in range(0, len(images), IMAGE_BATCH)]
    if cfg.local or query:
        global_and_patches = [encoder.encode_image_patches(batch) for batch in batches]
        vectors = np.concatenate([vectors for vectors, _ in global_and_patches])
        patches = torch.from_numpy(np.concatenate([patches for _, patches in global_and_patches]))
    else:
        vectors = np.concatenate([encoder.encode_image_batch(batch) for batch in batches])
    if cfg.zero_shot:
        label_emb = label_embeddings(encoder, labels, "pool", cache_dir=run_dir / LABEL_CACHE)
        method, scores = "zero-shot", vectors @ label_emb.T
    else:
        label_emb = label_embeddings(encoder, labels, adapter_config.label_templates, cache_dir=run_dir / LABEL_CACHE)
        if query:
            with torch.inference_mode():
                logits = adapter.query_logits(adapter.query_features(torch.from_numpy(vectors), patches),
                                              torch.from_numpy(label_emb))
        else:
            logits = torch.from_numpy(adapter.score(torch.from_numpy(vectors), torch.from_numpy(label_emb)))
        method = "adapter"
        if cfg.local:
            with torch.inference_mode():
                local = adapter.patch_logits(patches, torch.from_numpy(label_emb))
            logits, method = fuse_local(logits, local), "adapter+local"
        scores = torch.sigmoid(logits).numpy()
    best = np.argsort(-scores, axis=1, kind="stable")[:, :cfg.top_k]  # ties -> the label listed first
    return [
        {"image": path, "method": method, "random_weights": bool(encoder.random_weights),
         "labels": [{"label": labels[j], "score": round(float(row_scores[j]), 6)} for j in row_best]}
        for path, row_scores, row_best in zip(cfg.images, scores, best, strict=True)
    ]


def _labels(cfg: PredictConfig) -> list[str]:
    """The label list from --labels or --labels-file, in order, without blanks or repeats."""
    if (cfg.labels is None) == (cfg.labels_file is None):
        raise OvmlError('pass exactly one of --labels "a,b,c" or --labels-file FILE (one label per line)')
    if cfg.labels is not None:
        names = cfg.labels.split(",")
    else:
        path = Path(cfg.labels_file)
        if not path.is_file():
            raise OvmlError(f"labels file {path} does not exist; pass a text file with one label per line")
        names = load_vocabulary(str(path)).labels  # the format generate-text reads: comments, `label: synonyms`
    labels = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    if not labels:
        raise OvmlError("the label list is empty; give at least one label name")
    return labels


def _open(path: str) -> Image.Image:
    if not Path(path).is_file():
        raise OvmlError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError:
        raise OvmlError(f"image {path} has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, past Pillow's "
                        "decompression-bomb limit; downscale it first") from None
    except (UnidentifiedImageError, OSError) as e:
        raise OvmlError(f"cannot read image {path} ({type(e).__name__}); pass a readable image file") from None
