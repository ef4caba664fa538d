"""The supervised ceiling (pipeline/probe.py): a linear probe trained with labels, the reference above zero-shot."""

from __future__ import annotations

import numpy as np

from ovml.pipeline.metrics import average_precision, mean_average_precision
from ovml.pipeline.probe import WEIGHT_DECAYS, fit_ceiling, fit_probe, headroom_recovered


def separable(n=300, d=16, labels=4, seed=0):
    """Each label owns a direction; an image is the sum of its labels' directions plus noise."""
    rng = np.random.default_rng(seed)
    positives = rng.random((n, labels)) < 0.3
    directions = rng.standard_normal((labels, d))
    vectors = (positives @ directions + 0.3 * rng.standard_normal((n, d))).astype(np.float32)
    return vectors, positives


def test_the_probe_ranks_held_out_images_of_a_learnable_problem_almost_perfectly():
    vectors, positives = separable()
    probe = fit_probe(vectors[:200], positives[:200], weight_decay=0.0)
    assert mean_average_precision(average_precision(probe.scores(vectors[200:]), positives[200:])) > 0.95


def test_the_same_data_and_seed_give_the_same_probe():
    vectors, positives = separable()
    first, second = fit_probe(vectors, positives, 1e-3), fit_probe(vectors, positives, 1e-3)
    np.testing.assert_array_equal(first.weight, second.weight)
    np.testing.assert_array_equal(first.bias, second.bias)


def test_the_ceiling_takes_the_weight_decay_best_on_the_held_out_images_it_is_given():
    vectors, positives = separable(n=120, d=32)  # few images, many dimensions: the decay matters
    fit, held_out = (vectors[:60], positives[:60]), (vectors[60:], positives[60:])

    def held_out_map(decay):
        return mean_average_precision(average_precision(fit_probe(*fit, decay).scores(held_out[0]), held_out[1]))

    assert fit_ceiling(*fit, held_out=held_out).weight_decay == max(WEIGHT_DECAYS, key=held_out_map)


def test_headroom_recovered_is_the_share_of_the_zero_shot_to_ceiling_gap():
    assert abs(headroom_recovered(0.75, 0.6, 0.9) - 0.5) < 1e-12
    assert headroom_recovered(0.5, 0.6, 0.9) < 0  # below zero-shot: a negative share
    assert headroom_recovered(0.7, 0.6, 0.6) is None  # no headroom to recover
