"""Multi-label losses on logits [n, L] and 0/1 targets [n, L] (bool or float).

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
    return _AsymmetricLoss.apply(logits, targets, gamma_neg, gamma_pos, clip, eps)


class _AsymmetricLoss(torch.autograd.Function):
    """ASL with its gradient written out, worked through a few rows at a time.

    Autograd through the textbook formula keeps about ten [batch, labels] intermediates for the backward pass
    (0.15 GB at 512 x 7,586); here the forward pass keeps only d loss / d logits, and the intermediates live
    for one chunk of rows (tests/test_losses.py checks both against autograd of the formula).
    """

    ROWS_PER_CHUNK = 64

    @staticmethod
    def forward(ctx, logits, targets, gamma_neg, gamma_pos, clip, eps):
        total = logits.new_zeros((), dtype=torch.float64)
        grad = torch.empty_like(logits)
        for start in range(0, len(logits), _AsymmetricLoss.ROWS_PER_CHUNK):
            rows = slice(start, start + _AsymmetricLoss.ROWS_PER_CHUNK)
            loss, grad[rows] = _asl_and_gradient(logits[rows].detach(), targets[rows] > 0, gamma_neg, gamma_pos,
                                                 clip, eps)
            total += loss
        n = max(len(logits), 1)
        ctx.save_for_backward(grad.div_(n))
        return (total / n).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        grad, = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None


def _asl_and_gradient(z: torch.Tensor, positive: torch.Tensor, gamma_neg: float, gamma_pos: float, clip: float,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, d loss / d z) of a chunk. With p = sigmoid(z), dp/dz = p (1 - p); a clamped log or shift
    passes no gradient where it clamps, as autograd's clamp does.

    Every entry is first treated as a negative, then the few positives (a caption names ~3 of 1,000s of
    labels) are recomputed on their own; whole focusing powers are products, not pow() (several times faster)."""
    p = torch.sigmoid(z)
    # negatives: -p_m^gamma_neg log(1 - p_m), p_m = max(p - clip, 0)
    p_m = (p - clip).clamp_(min=0) if clip > 0 else p.clone()
    q = 1 - p_m  # >= clip: only a clip below eps lets the log's clamp act
    log_q = torch.log(q.clamp(min=eps) if clip < eps else q)
    below, focus = _focus(p_m, gamma_neg)  # p_m^(gamma_neg - 1) (None for gamma_neg 0), p_m^gamma_neg
    grad = focus / q
    if clip < eps:
        grad.masked_fill_(q < eps, 0.0)
    if below is not None:
        if gamma_neg < 1:  # p_m^(gamma - 1) is infinite where p_m = 0, where the shift passes no gradient anyway
            below.masked_fill_(p_m == 0, 0.0)
        grad -= gamma_neg * below * log_q
    if clip > 0:
        grad.masked_fill_(p < clip, 0.0)
    loss = focus.mul_(log_q).neg_()
    # positives: -(1 - p)^gamma_pos log p
    rows, cols = positive.nonzero(as_tuple=True)
    p_pos = p[rows, cols]
    log_p = torch.log(p_pos.clamp(min=eps))
    below_pos, focus_pos = _focus(1 - p_pos, gamma_pos)
    grad_pos = torch.where(p_pos >= eps, -focus_pos / p_pos, 0.0)
    if below_pos is not None:
        grad_pos += gamma_pos * below_pos * log_p
    loss[rows, cols] = -focus_pos * log_p
    grad[rows, cols] = grad_pos
    return loss.sum(dtype=torch.float64), grad.mul_(p * (1 - p))


def _focus(x: torch.Tensor, gamma: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(x^(gamma - 1) or None when gamma is 0, x^gamma); a small whole gamma by products (torch's pow is slow)."""
    if gamma == 0:
        return None, torch.ones_like(x)
    if gamma == int(gamma) and gamma <= 8:
        below = torch.ones_like(x) if gamma == 1 else x.clone()
        for _ in range(int(gamma) - 2):
            below.mul_(x)
        return below, below * x
    return x ** (gamma - 1), x ** gamma


def bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none").sum(dim=1).mean()


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
