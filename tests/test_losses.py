"""The three training losses against values worked out by hand."""

import math

import pytest
import torch

from ovml.pipeline.losses import asl, bce, rank


def test_asl_keeps_positive_log_loss_and_shrinks_negatives_by_focusing_and_clipping():
    logits = torch.tensor([[0.0, 0.0, -4.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    positive = -math.log(0.5)  # gamma_pos = 0: plain log loss
    negative = 0.45 ** 4 * -math.log(1 - 0.45)  # p = 0.5 shifted by clip 0.05, focused by gamma_neg = 4
    # the third label (p = sigmoid(-4) = 0.018 < clip) costs nothing
    assert math.isclose(asl(logits, targets).item(), positive + negative, rel_tol=1e-5)


def textbook_asl(logits, targets, gamma_neg, gamma_pos, clip, eps=1e-8):
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    loss_pos = targets * (1 - p) ** gamma_pos * torch.log(p.clamp(min=eps))
    loss_neg = (1 - targets) * p_neg ** gamma_neg * torch.log((1 - p_neg).clamp(min=eps))
    return -(loss_pos + loss_neg).sum(dim=1).mean()


@pytest.mark.parametrize("gamma_neg, gamma_pos, clip", [(4.0, 0.0, 0.05), (2.0, 1.0, 0.0), (0.0, 0.0, 0.0),
                                                        (0.5, 2.0, 0.2)])
def test_asl_and_its_gradient_match_autograd_of_the_textbook_formula(gamma_neg, gamma_pos, clip):
    generator = torch.Generator().manual_seed(0)
    # 150 rows: more than one chunk of rows; logits out to +-40 so the clamps and the shift are crossed
    logits = (8 * torch.randn(150, 30, generator=generator)).clamp(-40, 40).requires_grad_()
    targets = torch.rand(150, 30, generator=generator) < 0.2
    reference = textbook_asl(logits, targets.float(), gamma_neg, gamma_pos, clip)
    lean = asl(logits, targets, gamma_neg, gamma_pos, clip)
    assert torch.allclose(lean, reference, rtol=1e-5)
    grad_lean, = torch.autograd.grad(lean, logits)
    grad_reference, = torch.autograd.grad(reference, logits)
    assert torch.allclose(grad_lean, grad_reference, rtol=1e-4, atol=1e-7)


def test_asl_gradient_is_finite_where_the_sigmoid_saturates():
    logits = torch.tensor([[-200.0, 200.0, -200.0, 200.0]], requires_grad=True)
    targets = torch.tensor([[True, True, False, False]])
    asl(logits, targets, clip=0.0).backward()
    assert torch.isfinite(logits.grad).all()


def test_bce_sums_over_labels_and_averages_over_captions():
    logits = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    first = math.log(2) + math.log(1 + math.e ** 2)
    second = 2 * math.log(2)
    assert math.isclose(bce(logits, targets).item(), (first + second) / 2, rel_tol=1e-6)


def test_rank_is_the_hinge_over_positive_negative_pairs():
    logits = torch.tensor([[0.2, 0.5, -1.0, 0.1]])
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # pairs (0,1): 1 + 0.5 - 0.2 = 1.3; (0,2): 1 - 1 - 0.2 < 0; (3,1): 1 + 0.5 - 0.1 = 1.4; (3,2): < 0
    assert math.isclose(rank(logits, targets).item(), 2.7, rel_tol=1e-6)


def test_rank_matches_the_explicit_pair_sum_and_its_gradient_on_a_random_batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=generator, requires_grad=True)
    targets = (torch.rand(6, 9, generator=generator) < 0.3).float()
    pairs = targets[:, :, None] * (1 - targets[:, None, :])  # [n, positive, negative]
    explicit = (pairs * (1 + logits[:, None, :] - logits[:, :, None]).clamp(min=0)).sum(dim=(1, 2)).mean()
    fast = rank(logits, targets)
    assert torch.allclose(fast, explicit)
    grad_fast, = torch.autograd.grad(fast, logits)
    grad_explicit, = torch.autograd.grad(explicit, logits)
    assert torch.allclose(grad_fast, grad_explicit, atol=1e-6)


def test_rank_of_a_caption_without_labels_is_zero():
    assert rank(torch.randn(1, 5), torch.zeros(1, 5)).item() == 0.0
