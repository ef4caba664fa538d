"""Labelled images as training data: an image cache's vectors, its labels restricted to the labels declared seen.

The zero-shot protocols (NUS-WIDE 925 seen / 81 unseen, the testbed's 7 / 3) train on images whose unseen labels
are not annotated: a label outside the seen list is dropped from every image here, so it never reaches the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovml.pipeline.errors import OvmlError
from ovml.pipeline.image_cache import read_image_cache
from ovml.pipeline.label_sets import LabelSets
from ovml.pipeline.vocabulary import DATASET_SPLIT, load_vocabulary


@dataclass
class LabelledImages:
    """The images one training run learns from: vectors and their seen positives, in cache row order."""

    vectors: np.ndarray  # [k, d] float32, L2-normalised CLIP image embeddings
    targets: LabelSets  # each image's positives, columns in `seen` order: labels outside it are dropped
    seen: list[str]  # the annotated labels: the cache's labels that were declared seen
    rows: np.ndarray  # [k] the cache rows used (all, or a sample per label)
    info: dict  # the cache's dataset.json

    def positives(self) -> list[list[str]]:
        """Each image's seen positives by name (a Python list per image: for inspection, not for 1M images)."""
        return [[self.seen[c] for c in self.targets.indices[start:end]]
                for start, end in zip(self.targets.offsets[:-1], self.targets.offsets[1:], strict=True)]


def seen_label_list(spec: str, info: dict, default: list[str] | None) -> tuple[list[str], list[Path]]:
    """(labels declared seen, files that define them) from --seen-labels: a label file, `<dataset>:<split>` naming
    a label split of the cache's own dataset.json, or "" for `default` (the caption vocabulary)."""
    if not spec:
        if default is None:
            raise OvmlError("no caption vocabulary to take the seen labels from; pass --seen-labels FILE or "
                            f"--seen-labels {info.get('dataset', 'DATASET')}:seen")
        return list(default), []
    if not Path(spec).exists() and DATASET_SPLIT.fullmatch(spec):
        dataset, _, split = spec.partition(":")
        splits = info.get("splits") or {}
        if dataset != info.get("dataset") or split not in splits:
            raise OvmlError(f"--seen-labels {spec}: the image cache is {info.get('dataset')} with label splits "
                            f"{', '.join(splits) or 'none'}; name one of them as {info.get('dataset')}:SPLIT")
        return list(splits[split]), []
    vocabulary = load_vocabulary(spec)
    return vocabulary.labels, vocabulary.sources


def read_labelled_images(directory: Path, seen: list[str], per_label: int | None, seed: int) -> LabelledImages:
    """The cache at `directory` with positives outside `seen` dropped; with `per_label`, a seeded sample of that
    many images per seen label (fewer where the cache has fewer), the few-shot setting."""
    vectors, items, info = read_image_cache(directory)
    cache_labels = set(info.get("labels") or [])
    annotated = [label for label in seen if label in cache_labels]
    if not annotated:
        raise OvmlError(f"none of the {len(seen)} seen labels is a label of {directory} (it has e.g. "
                        f"{sorted(cache_labels)[:3]}); check --seen-labels")
    targets, _ = LabelSets.from_lists(items.column("positives"), annotated)
    del items
    if per_label is None:  # every image: no copy of the vectors (a 1M-image cache is 2 GB of them)
        return LabelledImages(vectors, targets, annotated, np.arange(len(vectors)), info)
    rows = _sample_per_label(targets, per_label, seed)
    return LabelledImages(vectors[rows], targets.take(rows), annotated, rows, info)


def _sample_per_label(targets: LabelSets, per_label: int, seed: int) -> np.ndarray:
    """Sorted rows: for each label in turn, `per_label` of its positive images drawn at random (an image drawn
    for one label counts for the others it shows too, so a label may end up with more)."""
    rng = np.random.default_rng(seed)
    row_of_entry = np.repeat(np.arange(len(targets)), np.diff(targets.offsets))
    chosen: set[int] = set()
    for label in range(targets.n_labels):
        candidates = row_of_entry[targets.indices == label]
        chosen.update(rng.choice(candidates, min(per_label, len(candidates)), replace=False).tolist())
    return np.array(sorted(chosen), dtype=np.int64)


def pseudo_labels(scores: np.ndarray, iterations: int = 50) -> np.ndarray:
    """bool [images, labels]: per label, the images in the upper component of a two-Gaussian mixture fitted (EM)
    to that label's scores over the unlabelled images. A label's share of positives is unknown on new images and
    an adapter's sigmoid is not calibrated there, so each label's own score distribution sets its threshold."""
    z = np.asarray(scores, dtype=np.float64)
    low, high = np.percentile(z, 25, axis=0), np.percentile(z, 90, axis=0)
    spread = np.maximum(z.std(axis=0), 1e-6)
    mean = np.stack([low, high])  # [2, labels]
    std = np.stack([spread, spread]) / 2
    weight = np.full((2, z.shape[1]), 0.5)
    for _ in range(iterations):
        log_density = (np.log(weight[:, None]) - np.log(std[:, None])
                       - 0.5 * ((z[None] - mean[:, None]) / std[:, None]) ** 2)  # [2, images, labels]
        upper = 1 / (1 + np.exp(np.clip(log_density[0] - log_density[1], -50, 50)))
        responsibility = np.stack([1 - upper, upper])
        total = responsibility.sum(axis=1) + 1e-9
        weight = total / len(z)
        mean = (responsibility * z[None]).sum(axis=1) / total
        std = np.sqrt((responsibility * (z[None] - mean[:, None]) ** 2).sum(axis=1) / total) + 1e-6
    return (upper > 0.5) & (z > mean[0])
