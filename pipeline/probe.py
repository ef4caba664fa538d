"""The supervised ceiling: a linear probe trained WITH labels on labelled image embeddings.

It answers "how far can a head on these image features get?", so that a text-trained adapter's gain over
zero-shot can be read as a share of the possible one: headroom recovered = (method - zero-shot) / (ceiling -
zero-shot). It uses labels the adapter never sees; it is a reference row, never a method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ovml.pipeline.metrics import average_precision, mean_average_precision

WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)  # chosen among on held-out labelled images, never on the evaluated ones
STEPS = 500
LR = 0.05
HELD_OUT_FRACTION = 0.2


@dataclass
class LinearProbe:
    """Per-label logistic regression: scores = x @ weight.T + bias."""

    weight: np.ndarray  # [labels, d]
    bias: np.ndarray  # [labels]
    weight_decay: float

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        return vectors @ self.weight.T + self.bias


def fit_probe(vectors: np.ndarray, positives: np.ndarray, weight_decay: float, seed: int = 0) -> LinearProbe:
    """BCE on every label at once, full batch, Adam: deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(vectors.shape[1], positives.shape[1])
    with torch.no_grad():
        bound = 1 / vectors.shape[1] ** 0.5
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    optimizer = torch.optim.Adam(layer.parameters(), lr=LR, weight_decay=weight_decay)
    inputs = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    targets = torch.from_numpy(positives.astype(np.float32))
    for _ in range(STEPS):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(layer(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return LinearProbe(layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy(), weight_decay)


def fit_ceiling(vectors: np.ndarray, positives: np.ndarray, held_out: tuple[np.ndarray, np.ndarray] | None = None,
                seed: int = 0) -> LinearProbe:
    """The probe whose weight decay scores best (mAP) on `held_out` labelled images, or on a held-out fifth of
    these when none are given; the chosen decay is then refitted on all of `vectors`."""
    if held_out is None:
        order = np.random.default_rng(seed).permutation(len(vectors))
        cut = max(1, int(len(vectors) * HELD_OUT_FRACTION))
        (val_x, val_y), (fit_x, fit_y) = ((vectors[order[:cut]], positives[order[:cut]]),
                                          (vectors[order[cut:]], positives[order[cut:]]))
    else:
        (val_x, val_y), (fit_x, fit_y) = held_out, (vectors, positives)

    def held_out_map(decay: float) -> float:
        value = mean_average_precision(average_precision(fit_probe(fit_x, fit_y, decay, seed).scores(val_x), val_y))
        return -np.inf if np.isnan(value) else value

    return fit_probe(vectors, positives, max(WEIGHT_DECAYS, key=held_out_map), seed)


def headroom_recovered(method: float, zero_shot: float, ceiling: float) -> float | None:
    """(method - zero-shot) / (ceiling - zero-shot); None when the ceiling is not above zero-shot."""
    return (method - zero_shot) / (ceiling - zero_shot) if ceiling > zero_shot else None
