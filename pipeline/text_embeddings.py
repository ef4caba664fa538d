"""Embedding columns on disk: fixed_size_list<float32|float16>[d], read back as one float32 matrix.

text_emb/part-NNNNN.parquet holds (caption_id, embedding), one part per captions part. float16 storage
halves the disk; readers get float32 (what training and FAISS compute in) unless they ask to hold float16.
`embed-text --local` adds a `tokens` column: each caption's word-token features, list<fixed_size_list<float16>[d]>.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ovml.pipeline import atomic
from ovml.pipeline.errors import OvmlError

STORE_DTYPES = ("float32", "float16")
TOKENS = "tokens"


def embedding_array(matrix: np.ndarray, store_dtype: str = "float32") -> pa.FixedSizeListArray:
    if store_dtype not in STORE_DTYPES:
        raise OvmlError(f"store dtype '{store_dtype}' is not one of {', '.join(STORE_DTYPES)}")
    values = pa.array(np.ascontiguousarray(matrix, dtype=store_dtype).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(values, matrix.shape[1])


def embedding_matrix(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """float32 [n, d] from a fixed_size_list column, converted by Arrow in bulk (no loop per row)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    # float32 comes back as a read-only view of Arrow's buffer; callers hand it to torch, which needs writable
    return (values if values.flags.writeable else values.copy()).reshape(-1, column.type.list_size)


def write_text_embeddings(path: Path, caption_ids: list[str], embeddings: np.ndarray, store_dtype: str,
                          metadata: dict[str, str] | None = None,
                          tokens: list[np.ndarray] | pa.Array | None = None) -> None:
    """`tokens`: each caption's word-token features with --local, as arrays or already as token_array's column."""
    columns = {"caption_id": pa.array(caption_ids, pa.string()), "embedding": embedding_array(embeddings, store_dtype)}
    if tokens is not None:
        columns[TOKENS] = tokens if isinstance(tokens, pa.Array) else token_array(tokens, embeddings.shape[1])
    table = pa.table(columns)
    atomic.write_parquet(path, table.replace_schema_metadata(metadata))


def token_array(tokens: list[np.ndarray], dim: int) -> pa.ListArray:
    """Each caption's [words, d] token features as one list of float16 vectors."""
    offsets = np.zeros(len(tokens) + 1, dtype=np.int32)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    values = np.concatenate([np.asarray(t, np.float16).reshape(-1, dim) for t in tokens]) if tokens else \
        np.empty((0, dim), np.float16)
    return pa.ListArray.from_arrays(pa.array(offsets), embedding_array(values, "float16"))


@dataclass(frozen=True)
class TokenFeatures:
    """Word-token features of many captions, CSR-style: caption i's are values[offsets[i]:offsets[i + 1]]."""

    offsets: np.ndarray  # [captions + 1] int64
    values: np.ndarray  # [words, d] float16

    def padded(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([len(rows), longest, d] float16 features zero-padded, [len(rows), longest] bool: a real token)."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        longest = max(int(lengths.max(initial=0)), 1)
        mask = np.arange(longest) < lengths[:, None]
        out = np.zeros((len(rows), longest, self.values.shape[1]), dtype=np.float16)
        before = np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[mask] = self.values[np.arange(lengths.sum()) - before + np.repeat(starts, lengths)]
        return out, mask


def check_token_features(text_emb_dir: str | Path) -> list[pq.ParquetFile]:
    """The text_emb parts, opened; a one-line error unless every one holds token features (embed-text --local)."""
    files = [_open_part(p) for p in text_embedding_parts(Path(text_emb_dir))]
    if not files or any(TOKENS not in f.schema_arrow.names for f in files):
        raise OvmlError(f"{text_emb_dir} has no caption token features; re-run `ovml embed-text --local` first")
    return files


def read_token_features(text_emb_dir: str | Path) -> TokenFeatures:
    """The `tokens` column of every part, in part order (rows line up with `read_text_embeddings`)."""
    lengths, values = [], []
    for f in check_token_features(text_emb_dir):
        column = f.read(columns=[TOKENS]).column(TOKENS).combine_chunks()
        lengths.append(pc.list_value_length(column).to_numpy(zero_copy_only=False))
        values.append(column.flatten().flatten().to_numpy(zero_copy_only=False).reshape(
            -1, column.type.value_type.list_size))
    offsets = np.zeros(sum(len(n) for n in lengths) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return TokenFeatures(offsets, np.concatenate(values).astype(np.float16, copy=False))


def text_embedding_parts(text_emb_dir: Path) -> list[Path]:
    return sorted(Path(text_emb_dir).glob("part-*.parquet"))


def _open_part(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, pre_buffer=False)
    except pa.ArrowInvalid as e:
        raise OvmlError(f"{path} is damaged or not a parquet file ({str(e)[:120]}); remake it with "
                        "`ovml embed-text --force`") from None


def read_text_embeddings(text_emb_dir: str | Path, dtype: str = "float32") -> tuple[pa.ChunkedArray, np.ndarray]:
    """All parts, in part order: caption ids and one contiguous [n, d] matrix of `dtype`, filled batch by batch.

    Memory is the matrix plus one batch (ids stay Arrow strings): reading whole parts made Arrow's allocator keep
    ~2x the matrix, and a Python list of 1M ids costs ~100 MB.
    """
    parts = text_embedding_parts(Path(text_emb_dir))
    if not parts:
        raise OvmlError(f"no text embeddings (part-*.parquet) in {text_emb_dir}; run `ovml embed-text` first")
    files = [_open_part(p) for p in parts]
    dims = sorted({f.schema_arrow.field("embedding").type.list_size for f in files})
    if len(dims) != 1:
        raise OvmlError(f"text embedding parts in {text_emb_dir} mix widths {dims}; "
                        "re-run `ovml embed-text --force`")
    matrix = np.empty((sum(f.metadata.num_rows for f in files), dims[0]), dtype=dtype)
    caption_ids: list[pa.Array] = []
    row = 0
    for path, f in zip(parts, files, strict=True):
        for batch in f.iter_batches(batch_size=8192, columns=["caption_id", "embedding"]):
            block = matrix[row:row + batch.num_rows]
            block[:] = embedding_matrix(batch.column("embedding"))
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():  # training on it would make every weight NaN
                raise OvmlError(f"{path} holds non-finite embeddings (NaN or inf; caption "
                                f"{batch.column('caption_id')[int(np.argmin(finite))]} is the first); remake it "
                                f"with `ovml embed-text --force --run-dir {Path(text_emb_dir).parent}`")
            caption_ids.append(batch.column("caption_id"))
            row += batch.num_rows
        pa.default_memory_pool().release_unused()  # else Arrow's allocator keeps the part's decoding buffers
    return pa.chunked_array(caption_ids, pa.string()), matrix
