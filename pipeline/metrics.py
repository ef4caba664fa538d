"""Multi-label ranking metrics as in the zero-shot papers: per-label AP / mAP and F1@K pooled over images.

All functions take scores [n_images, n_labels] (finite floats), positives [n, L] bool and an optional
ignored [n, L] bool mask (e.g. VOC 'difficult', Open Images 'unknown'). An ignored entry is removed from
the problem: it is neither a positive nor a negative for AP, and never one of an image's top-K.

Ties: AP treats tied scores as one threshold, exactly like sklearn's average_precision_score (every
positive of a tie group gets the precision at the end of the group). The top-K of an image breaks ties
by label order: among equal scores the label with the lower column index is predicted first.
"""

from __future__ import annotations

import numpy as np
import torch

_AP_LABELS_PER_CHUNK = 64  # bounds the working set to a few arrays of 64 x n_images
_F1_IMAGES_PER_CHUNK = 8192


def average_precision(scores: np.ndarray, positives: np.ndarray, ignored: np.ndarray | None = None) -> np.ndarray:
    """AP of each label (column); NaN for a label without a positive, so callers can leave it out of mAP.

    AP = mean over positives p of precision at threshold score(p) = #positives >= s / #entries >= s, which
    is sklearn's step-wise AP with ties grouped. One sort of a label's non-ignored scores plus binary searches for
    its positives (sparse), instead of an argsort and cumulative sums over every entry; labels without a
    positive are not sorted at all.
    """
    scores, positives, valid = _checked(scores, positives, ignored)
    n_labels = scores.shape[1]
    ap = np.full(n_labels, np.nan)
    for start in range(0, n_labels, _AP_LABELS_PER_CHUNK):
        cols = slice(start, start + _AP_LABELS_PER_CHUNK)
        block = np.ascontiguousarray(scores[:, cols].T)  # one label per row: contiguous for sort and mask
        block_valid = np.ascontiguousarray(valid[:, cols].T)
        relevant = np.ascontiguousarray(positives[:, cols].T) & block_valid
        for row, (label_scores, label_valid, hits) in enumerate(zip(block, block_valid, relevant, strict=True)):
            positive_scores = np.sort(label_scores[hits])
            if positive_scores.size:
                ranked = np.sort(label_scores[label_valid])  # ignored entries count for nothing: left out
                at_or_above = ranked.size - np.searchsorted(ranked, positive_scores, side="left")
                positives_at_or_above = positive_scores.size - np.searchsorted(
                    positive_scores, positive_scores, side="left")
                ap[start + row] = float(np.mean(positives_at_or_above / at_or_above))
    return ap


def mean_average_precision(ap: np.ndarray) -> float:
    """Mean over the labels that have at least one positive (the others are NaN in `ap`)."""
    defined = ap[~np.isnan(ap)]
    return float(defined.mean()) if defined.size else float("nan")


def top_k_mask(scores: np.ndarray, k: int, ignored: np.ndarray | None = None) -> np.ndarray:
    """[n, L] bool: each image's k best labels (ties -> lower label index; ignored entries never chosen)."""
    scores = np.asarray(scores)
    n, n_labels = scores.shape
    k = min(k, n_labels)
    chosen = np.zeros((n, n_labels), dtype=bool)
    if k == 0:
        return chosen
    for start in range(0, n, _F1_IMAGES_PER_CHUNK):
        block = scores[start:start + _F1_IMAGES_PER_CHUNK]
        if ignored is not None:
            block = np.where(ignored[start:start + _F1_IMAGES_PER_CHUNK], -np.inf, block)
        # the k-th largest value is the same whichever tied entries topk returns; torch's is ~10x np.partition's
        kth = torch.topk(torch.from_numpy(np.ascontiguousarray(block)), k, dim=1).values[:, -1:].numpy()
        take = block > kth
        tied = block == kth
        room = k - take.sum(axis=1)
        # rows where the tie at the k-th score must be cut; a tie at -inf is all ignored entries, dropped below
        overfull = np.flatnonzero((tied.sum(axis=1) > room) & (kth[:, 0] > -np.inf))
        tied[overfull] &= np.cumsum(tied[overfull], axis=1) <= room[overfull, None]
        take |= tied
        if ignored is not None:
            take &= ~ignored[start:start + _F1_IMAGES_PER_CHUNK]
        chosen[start:start + _F1_IMAGES_PER_CHUNK] = take
    return chosen


def f1_at_k(scores: np.ndarray, positives: np.ndarray, k: int, ignored: np.ndarray | None = None) -> dict[str, float]:
    """Precision, recall and F1 of the top-k labels of every image, pooled over all images.

    P = hits / (k * images), R = hits / positives, F1 = 2PR / (P + R): the protocol of the NUS-WIDE and
    Open Images zero-shot papers (Zhang et al. 2016, Huynh & Elhamifar 2020, MKT).
    """
    return f1_from_counts(f1_counts(scores, positives, k, ignored), k)


def f1_counts(scores: np.ndarray, positives: np.ndarray, k: int, ignored: np.ndarray | None = None) -> np.ndarray:
    """[hits, predictions, relevant] of a block of images: pooled F1@K is a sum, so blocks of images add up."""
    scores, positives, valid = _checked(scores, positives, ignored)
    relevant = positives & valid
    hits = int((top_k_mask(scores, k, ~valid) & relevant).sum())
    n_images, n_labels = scores.shape
    return np.array([hits, min(k, n_labels) * n_images, int(relevant.sum())], dtype=np.int64)


def f1_from_counts(counts: np.ndarray, k: int) -> dict[str, float]:
    hits, n_predicted, n_relevant = (int(c) for c in counts)
    precision = hits / n_predicted if n_predicted else 0.0
    recall = hits / n_relevant if n_relevant else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {f"F1@{k}": f1, f"P@{k}": precision, f"R@{k}": recall}


def column_blocks(n_labels: int, width: int = 256) -> list[np.ndarray]:
    """Column numbers in blocks of `width`: AP is per column, so AP block by block is AP of the whole matrix."""
    return [np.arange(start, min(start + width, n_labels)) for start in range(0, n_labels, width)]


def evaluate_scores(scores: np.ndarray, positives: np.ndarray, ignored: np.ndarray | None,
                    ks: tuple[int, ...]) -> tuple[dict[str, float], np.ndarray]:
    """({mAP, F1@K, P@K, R@K for each k}, per-label AP) of one method on one protocol."""
    ap = average_precision(scores, positives, ignored)
    metrics = {"mAP": mean_average_precision(ap)}
    for k in ks:
        metrics.update(f1_at_k(scores, positives, k, ignored))
    return metrics, ap


def micro_pr_curve(scores: np.ndarray, positives: np.ndarray, ignored: np.ndarray | None = None,
                   bins: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) over all image-label pairs at `bins` score thresholds: O(n) for the plots."""
    scores, positives, valid = _checked(scores, positives, ignored)
    values = scores[valid]
    if values.size == 0:
        return np.zeros(0), np.zeros(0)
    curve = MicroPR(float(values.min()), float(values.max()), bins)
    curve.add(scores, positives, ignored)
    return curve.curve()


class MicroPR:
    """micro_pr_curve accumulated block by block: fixed edges from the global score range, summed histograms."""

    def __init__(self, low: float, high: float, bins: int = 1024):
        self.edges = np.linspace(low, high, bins + 1) if low <= high else None
        self.counted = np.zeros(bins, dtype=np.int64)
        self.true_pos = np.zeros(bins, dtype=np.int64)

    def add(self, scores: np.ndarray, positives: np.ndarray, ignored: np.ndarray | None = None) -> None:
        scores, positives, valid = _checked(scores, positives, ignored)
        if self.edges is not None:  # clipped: a block's float rounding may differ from the pass that set the range
            scores = np.clip(scores, self.edges[0], self.edges[-1])
            self.counted += np.histogram(scores[valid], self.edges)[0]
            self.true_pos += np.histogram(scores[positives & valid], self.edges)[0]

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        counted, true_pos = np.cumsum(self.counted[::-1]), np.cumsum(self.true_pos[::-1])
        if self.edges is None or counted[-1] == 0:
            return np.zeros(0), np.zeros(0)
        keep = counted > 0
        n_pos = max(int(true_pos[-1]), 1)
        return true_pos[keep] / counted[keep], true_pos[keep] / n_pos


def _checked(scores, positives, ignored) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    positives = np.asarray(positives, dtype=bool)
    if scores.ndim != 2 or positives.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must be the same [n, L] shape")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    valid = np.ones(scores.shape, dtype=bool) if ignored is None else ~np.asarray(ignored, dtype=bool)
    if valid.shape != scores.shape:
        raise ValueError(f"ignored {valid.shape} must have the shape of scores {scores.shape}")
    return scores, positives, valid
