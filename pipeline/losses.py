"""Multi-label losses on logits [n, L] and 0/1 targets [n, L].

Each is summed over labels and averaged over captions, so the learning rate does not depend on the batch
size, and the three are interchangeable behind `--loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def asl(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
        clip: float = 0.05, eps: float = 1e-8) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al.): a caption names a few of ~1,000 labels, so the flood of easy
    negatives is down-weighted (focusing, gamma_neg) and the easiest are dropped entirely (shift, clip)."""
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    loss_pos = targets * (1 - p) ** gamma_pos * torch.log(p.clamp(min=eps))
    loss_neg = (1 - targets) * p_neg ** gamma_neg * torch.log((1 - p_neg).clamp(min=eps))
    return -(loss_pos + loss_neg).sum(dim=1).mean()


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1).mean()


def rank(logits: torch.Tensor, targets: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """MKT's pairwise ranking loss: sum over (positive p, negative n) of max(0, margin + z_n - z_p).

    The [n, L, L] pair tensor would be 2 GB for a 512 x 1,006 batch, so each positive's hinge sum is read
    off the sorted negatives instead: count and sum of the negatives above z_p - margin (O(L log L)).
    """
    positive = targets > 0
    negatives = torch.where(positive, float("inf"), logits).sort(dim=1).values  # positives last, as +inf
    prefix = F.pad(torch.where(torch.isinf(negatives), 0.0, negatives).cumsum(dim=1), (1, 0))
    n_neg = (~positive).sum(dim=1, keepdim=True)
    at_or_below = torch.searchsorted(negatives.detach(), (logits - margin).detach(), right=True)
    above_count = n_neg - at_or_below
    above_sum = prefix.gather(1, n_neg) - prefix.gather(1, at_or_below)
    hinge = above_count * (margin - logits) + above_sum
    return (hinge * positive).sum(dim=1).mean()
