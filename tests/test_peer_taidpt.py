"""The TaI-DPT peer of benchmarks/peers (benchmark code, not ovml): its scores, loss and chunked step."""

import math
import sys
from pathlib import Path

import torch

from ovml.pipeline.clip import load_clip

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "peers"))
import taidpt  # noqa: E402


def test_local_score_weights_each_token_by_a_softmax_of_its_cosine_and_ignores_padding():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # the third token is padding
    real = torch.tensor([[True, True, False]])
    label = torch.tensor([[1.0, 0.0]])
    w = torch.softmax(torch.tensor([2.0 * 1.0, 2.0 * 0.0]), dim=0)  # temperature 2 on cosines 1 and 0
    expected = taidpt.LOGIT_SCALE * (w[0] * 1.0 + w[1] * 0.0)
    got = taidpt.local_logits(tokens, real, label, temperature=2.0)
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-6)


def test_loss_is_the_ranking_hinge_over_positive_negative_pairs_of_both_streams():
    targets = torch.tensor([[True, False, False]])
    global_z = torch.tensor([[1.0, 0.5, -2.0]])  # pairs (0, 1): 1 - 1 + 0.5 = 0.5; (0, 2): 0
    local_z = torch.tensor([[0.0, 0.0, 0.0]])  # pairs (0, 1) and (0, 2): 1 each
    assert math.isclose(taidpt.loss(global_z, local_z, targets).item(), 0.5 + 2.0, rel_tol=1e-6)


def test_the_prompt_learner_scores_any_label_list_including_names_it_never_trained_on(tiny_clip):
    learner = taidpt.PromptLearner(load_clip(tiny_clip, "cpu"), n_ctx=4)
    global_w, local_w = learner.label_features(["sky", "dog", "a name never seen"])
    assert global_w.shape == local_w.shape == (3, 64)
    assert torch.allclose(global_w.norm(dim=1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(global_w, local_w)  # two contexts, two prompts per label


def test_a_step_with_the_labels_in_chunks_moves_the_contexts_as_one_pass_does(tiny_clip):
    encoder = load_clip(tiny_clip, "cpu")
    labels = ["sky", "dog", "cat", "tree", "road"]
    generator = torch.Generator().manual_seed(0)
    pooled = torch.nn.functional.normalize(torch.randn(4, 64, generator=generator), dim=-1)
    words = torch.nn.functional.normalize(torch.randn(4, 3, 64, generator=generator), dim=-1)
    real = torch.ones(4, 3, dtype=torch.bool)
    targets = torch.rand(4, 5, generator=generator) < 0.4
    contexts = []
    for chunk in (None, 2):
        learner = taidpt.PromptLearner(encoder, n_ctx=4, seed=0)
        optimizer = torch.optim.SGD(learner.parameters(), lr=1.0)
        taidpt.step(learner, optimizer, *learner.tokens(labels), pooled, words, real, targets, label_chunk=chunk)
        contexts.append(torch.cat([learner.global_ctx.data, learner.local_ctx.data]))
    start = taidpt.PromptLearner(encoder, n_ctx=4, seed=0)
    assert not torch.allclose(contexts[0], torch.cat([start.global_ctx.data, start.local_ctx.data]))
    assert torch.allclose(contexts[0], contexts[1], atol=1e-5)
