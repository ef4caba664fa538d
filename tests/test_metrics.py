"""Metrics match scikit-learn's AP and the pooled F1@K of the zero-shot multi-label papers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from ovml.pipeline.metrics import (
    MicroPR,
    average_precision,
    column_blocks,
    evaluate_scores,
    f1_at_k,
    f1_counts,
    f1_from_counts,
    mean_average_precision,
    micro_pr_curve,
    top_k_mask,
)


def _random_problem(seed: int, n: int = 120, n_labels: int = 17, levels: int | None = None):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, (n, n_labels)) if levels else rng.standard_normal((n, n_labels))
    positives = rng.random((n, n_labels)) < 0.2
    return scores.astype(np.float32), positives, rng


def test_ap_matches_sklearn_per_label():
    scores, positives, _ = _random_problem(0)
    expected = [average_precision_score(positives[:, j], scores[:, j]) for j in range(scores.shape[1])]
    np.testing.assert_allclose(average_precision(scores, positives), expected)


def test_ap_matches_sklearn_when_scores_tie():
    scores, positives, _ = _random_problem(1, levels=4)
    expected = [average_precision_score(positives[:, j], scores[:, j]) for j in range(scores.shape[1])]
    np.testing.assert_allclose(average_precision(scores, positives), expected)


def test_ap_leaves_ignored_entries_out():
    scores, positives, rng = _random_problem(2, levels=6)
    ignored = rng.random(scores.shape) < 0.15
    expected = []
    for j in range(scores.shape[1]):
        kept = ~ignored[:, j]
        expected.append(average_precision_score(positives[kept, j], scores[kept, j]))
    np.testing.assert_allclose(average_precision(scores, positives, ignored), expected)


def test_label_without_positives_has_no_ap_and_is_left_out_of_map():
    scores, positives, _ = _random_problem(3, n_labels=5)
    positives[:, 2] = False
    ap = average_precision(scores, positives)
    assert np.isnan(ap[2])
    assert mean_average_precision(ap) == pytest.approx(np.mean(np.delete(ap, 2)))


def test_positive_that_is_ignored_does_not_count():
    scores = np.array([[0.9], [0.8], [0.1]], dtype=np.float32)
    positives = np.array([[True], [False], [True]])
    ignored = np.array([[True], [False], [False]])
    # ranking without the ignored image: 0.8 (neg), 0.1 (pos) -> AP = 1/2
    assert average_precision(scores, positives, ignored)[0] == pytest.approx(0.5)


def test_f1_at_k_by_hand():
    scores = np.array([[0.9, 0.8, 0.1, 0.0],
                       [0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    positives = np.array([[True, False, True, False],
                          [False, False, False, True]])
    # top-2: image 0 -> labels 0, 1 (1 hit); image 1 -> labels 3, 2 (1 hit); 2 hits, 4 predicted, 3 positives
    result = f1_at_k(scores, positives, 2)
    assert result["P@2"] == pytest.approx(2 / 4)
    assert result["R@2"] == pytest.approx(2 / 3)
    assert result["F1@2"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))


def test_top_k_breaks_ties_by_lower_label_index():
    scores = np.array([[0.5, 0.7, 0.5, 0.5, 0.1]], dtype=np.float32)
    assert top_k_mask(scores, 3).tolist() == [[True, True, True, False, False]]


def test_f1_at_k_with_ties_counts_only_the_k_chosen():
    scores = np.zeros((1, 4), dtype=np.float32)
    positives = np.array([[False, False, True, True]])
    # all tied: top-2 are labels 0 and 1, neither positive
    assert f1_at_k(scores, positives, 2) == {"F1@2": 0.0, "P@2": 0.0, "R@2": 0.0}


def test_top_k_never_picks_ignored_entries():
    scores = np.array([[0.9, 0.8, 0.1]], dtype=np.float32)
    ignored = np.array([[True, False, False]])
    assert top_k_mask(scores, 2, ignored).tolist() == [[False, True, True]]


def test_top_k_matches_a_stable_sort_on_random_ties():
    scores, _, _ = _random_problem(4, levels=3)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    expected = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(expected, order, True, axis=1)
    np.testing.assert_array_equal(top_k_mask(scores, 5), expected)


def test_evaluate_scores_reports_map_and_each_k():
    scores, positives, _ = _random_problem(5)
    metrics, ap = evaluate_scores(scores, positives, None, (3, 5))
    assert set(metrics) == {"mAP", "F1@3", "P@3", "R@3", "F1@5", "P@5", "R@5"}
    assert metrics["mAP"] == pytest.approx(np.nanmean(ap))


def test_non_finite_scores_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        average_precision(np.array([[np.nan]]), np.array([[True]]))


def test_f1_counts_summed_over_chunks_of_images_give_the_whole_matrix_f1():
    rng = np.random.default_rng(3)
    scores, positives = rng.random((100, 12)).astype(np.float32), rng.random((100, 12)) < 0.2
    ignored = rng.random((100, 12)) < 0.1
    counts = sum(f1_counts(scores[s:s + 7], positives[s:s + 7], 3, ignored[s:s + 7]) for s in range(0, 100, 7))
    assert f1_from_counts(counts, 3) == f1_at_k(scores, positives, 3, ignored)


def test_ap_over_column_blocks_is_the_ap_of_the_whole_matrix():
    rng = np.random.default_rng(4)
    scores, positives = rng.random((80, 30)).astype(np.float32), rng.random((80, 30)) < 0.15
    ignored = rng.random((80, 30)) < 0.1
    blocks = column_blocks(30, 8)
    assert [len(b) for b in blocks] == [8, 8, 8, 6]
    by_blocks = np.concatenate([average_precision(scores[:, b], positives[:, b], ignored[:, b]) for b in blocks])
    np.testing.assert_array_equal(by_blocks, average_precision(scores, positives, ignored))


def test_micro_pr_accumulated_over_blocks_is_the_whole_matrix_curve():
    rng = np.random.default_rng(5)
    scores, positives = rng.random((60, 20)).astype(np.float32), rng.random((60, 20)) < 0.2
    curve = MicroPR(float(scores.min()), float(scores.max()))
    for block in column_blocks(20, 6):
        curve.add(scores[:, block], positives[:, block])
    for got, expected in zip(curve.curve(), micro_pr_curve(scores, positives), strict=True):
        np.testing.assert_array_equal(got, expected)
