"""LabelSets: label lists held as CSR offsets + indices, densified only for the rows and columns asked for."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ovml.pipeline.label_sets import LabelSets

LABELS = ["cat", "dog", "bird", "fish"]
LISTS = pa.chunked_array([[["dog", "cat"], [], None], [["fish", "unicorn", "dog"], ["bird", "bird"]]],
                         pa.list_(pa.string()))
DENSE = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=bool)


def test_dense_of_every_row_is_the_multi_hot_matrix():
    sets, _ = LabelSets.from_lists(LISTS, LABELS)
    np.testing.assert_array_equal(sets.dense(), DENSE)


def test_names_outside_the_labels_are_reported_and_left_out():
    sets, unknown = LabelSets.from_lists(LISTS, LABELS)
    assert unknown == ["unicorn"]
    assert len(sets.indices) == 6


def test_a_batch_of_rows_in_any_order_densifies_to_those_rows():
    sets, _ = LabelSets.from_lists(LISTS, LABELS)
    batch = np.array([4, 0, 3, 0])
    np.testing.assert_array_equal(sets.dense(batch), DENSE[batch])


def test_a_block_of_columns_densifies_to_those_columns_in_the_given_order():
    sets, _ = LabelSets.from_lists(LISTS, LABELS)
    columns = np.array([3, 1])
    np.testing.assert_array_equal(sets.dense(np.array([0, 3]), columns), DENSE[[0, 3]][:, columns])


def test_random_batches_and_blocks_match_the_dense_matrix_exactly():
    rng = np.random.default_rng(0)
    dense = rng.random((300, 40)) < 0.1
    names = [f"l{i}" for i in range(40)]
    lists = pa.array([[names[j] for j in rng.permutation(np.flatnonzero(row))] for row in dense])
    sets, _ = LabelSets.from_lists(lists, names)
    for _ in range(20):
        rows, columns = rng.choice(300, size=64), rng.choice(40, size=7, replace=False)
        np.testing.assert_array_equal(sets.dense(rows, columns), dense[rows][:, columns])
    np.testing.assert_array_equal(sets.dense(slice(10, 20)), dense[10:20])


def test_take_keeps_the_given_rows_in_the_given_order():
    sets, _ = LabelSets.from_lists(LISTS, LABELS)
    np.testing.assert_array_equal(sets.take(np.array([4, 0, 3])).dense(), DENSE[[4, 0, 3]])


def test_concat_stacks_the_rows_of_each_part():
    sets, _ = LabelSets.from_lists(LISTS, LABELS)
    np.testing.assert_array_equal(LabelSets.concat([sets, sets.take(np.array([3]))]).dense(), DENSE[[0, 1, 2, 3, 4, 3]])


def test_with_columns_moves_each_label_to_its_place_in_a_longer_list():
    sets, _ = LabelSets.from_lists(LISTS, LABELS)
    moved = sets.with_columns(np.array([5, 0, 2, 1]), 6).dense()
    np.testing.assert_array_equal(moved[:, [5, 0, 2, 1]], DENSE)
    assert not moved[:, [3, 4]].any()
