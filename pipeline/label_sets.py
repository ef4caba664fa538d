"""Label sets of many rows, stored sparse: what each caption or image is labelled with, as CSR offsets + indices.

A dense [rows x labels] matrix is 7.6 GB of bools at 1M captions x 7,586 Open Images labels, while the label
lists themselves are a few labels per row. Stages keep the sparse form and densify only the rows and columns
one batch or one block of labels needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class LabelSets:
    """Row i holds labels indices[offsets[i]:offsets[i + 1]] (column numbers into a label list of n_labels)."""

    offsets: np.ndarray  # [rows + 1] int64
    indices: np.ndarray  # [entries] int32
    n_labels: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @classmethod
    def from_lists(cls, label_lists: pa.ChunkedArray | pa.ListArray, labels: list[str]) -> tuple[LabelSets, list[str]]:
        """(label sets, names outside `labels`) from a list<string> column, without a loop per row.

        A null list counts as empty; names outside `labels` are left out (callers decide if that is an error).
        """
        lists = label_lists.combine_chunks() if isinstance(label_lists, pa.ChunkedArray) else label_lists
        names = pc.list_flatten(lists)
        cols = pc.index_in(names, value_set=pa.array(labels, pa.string()))
        unknown = pc.filter(names, pc.is_null(cols)).unique().to_pylist()
        known = pc.is_valid(cols).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(lists).to_numpy()[known]
        counts = np.bincount(parents, minlength=len(lists))
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        indices = cols.to_numpy(zero_copy_only=False)[known].astype(np.int32)
        return cls(offsets, indices, len(labels)), unknown

    @classmethod
    def concat(cls, parts: list[LabelSets]) -> LabelSets:
        """The rows of each part in turn; every part must count columns in the same label list."""
        if len({part.n_labels for part in parts}) != 1:
            raise ValueError("label sets over different label lists")
        starts = np.cumsum([0] + [len(part.indices) for part in parts[:-1]])
        offsets = np.concatenate([[0]] + [part.offsets[1:] + start for part, start in zip(parts, starts, strict=True)])
        return cls(offsets.astype(np.int64), np.concatenate([part.indices for part in parts]), parts[0].n_labels)

    def take(self, rows: np.ndarray) -> LabelSets:
        """The given rows, in that order."""
        starts, ends = self.offsets[rows], self.offsets[np.asarray(rows) + 1]
        lengths = ends - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        entry = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths) + np.repeat(starts, lengths)
        return LabelSets(offsets, self.indices[entry], self.n_labels)

    def with_columns(self, position: np.ndarray, n_labels: int) -> LabelSets:
        """The same sets over another label list: column c becomes position[c] among n_labels."""
        return LabelSets(self.offsets, np.asarray(position, dtype=np.int32)[self.indices], n_labels)

    def dense(self, rows: np.ndarray | slice | None = None, columns: np.ndarray | None = None) -> np.ndarray:
        """[len(rows), len(columns)] bool: the given rows (default all) restricted to the given label columns
        (default all, in order); a label listed twice in a row is simply True."""
        if rows is None or isinstance(rows, slice):
            rows = np.arange(len(self))[rows or slice(None)]
        rows = np.asarray(rows)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        out_row = np.repeat(np.arange(len(rows)), lengths)
        entry = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(starts, lengths)
        cols = self.indices[entry]
        if columns is None:
            out = np.zeros((len(rows), self.n_labels), dtype=bool)
            out[out_row, cols] = True
            return out
        position = np.full(self.n_labels, -1, dtype=np.int64)
        position[np.asarray(columns)] = np.arange(len(columns))
        out = np.zeros((len(rows), len(columns)), dtype=bool)
        kept = position[cols] >= 0
        out[out_row[kept], position[cols][kept]] = True
        return out
