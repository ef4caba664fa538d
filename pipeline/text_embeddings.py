"""Embedding columns on disk: fixed_size_list<float32|float16>[d], read back as one float32 matrix.

text_emb/part-NNNNN.parquet holds (caption_id, embedding), one part per captions part. float16 storage
halves the disk; readers always get float32, because training and FAISS want it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ovml.pipeline import atomic
from ovml.pipeline.errors import OvmlError

STORE_DTYPES = ("float32", "float16")


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
                          metadata: dict[str, str] | None = None) -> None:
    table = pa.table({"caption_id": pa.array(caption_ids, pa.string()),
                      "embedding": embedding_array(embeddings, store_dtype)})
    atomic.write_parquet(path, table.replace_schema_metadata(metadata))


def text_embedding_parts(text_emb_dir: Path) -> list[Path]:
    return sorted(Path(text_emb_dir).glob("part-*.parquet"))


def _open_part(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except pa.ArrowInvalid as e:
        raise OvmlError(f"{path} is damaged or not a parquet file ({str(e)[:120]}); remake it with "
                        "`ovml embed-text --force`") from None


def read_text_embeddings(text_emb_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """All parts, in part order: caption ids and one contiguous float32 [n, d] matrix, filled in place."""
    parts = text_embedding_parts(Path(text_emb_dir))
    if not parts:
        raise OvmlError(f"no text embeddings (part-*.parquet) in {text_emb_dir}; run `ovml embed-text` first")
    files = [_open_part(p) for p in parts]
    dims = sorted({f.schema_arrow.field("embedding").type.list_size for f in files})
    if len(dims) != 1:
        raise OvmlError(f"text embedding parts in {text_emb_dir} mix widths {dims}; "
                        "re-run `ovml embed-text --force`")
    matrix = np.empty((sum(f.metadata.num_rows for f in files), dims[0]), dtype=np.float32)
    caption_ids: list[str] = []
    row = 0
    for f in files:
        table = f.read(columns=["caption_id", "embedding"])
        matrix[row:row + table.num_rows] = embedding_matrix(table["embedding"])
        caption_ids.extend(table["caption_id"].to_pylist())
        row += table.num_rows
    return caption_ids, matrix
