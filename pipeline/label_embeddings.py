"""Label embeddings from a prompt pool, for any label list (training vocabulary, eval sets, predict).

A label's embedding is the L2-normalised mean of its templates' normalised CLIP text embeddings: averaged
over ~85 phrasings ("a blurry photo of the {}.", ...), no single phrasing's quirks dominate. Results are
cached as parquet (label, embedding) whose schema metadata holds a fingerprint of the labels, the
templates and the model, so a cache is reused exactly when all three are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ovml.pipeline import atomic
from ovml.pipeline.clip import ClipEncoder
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.text_embeddings import embedding_array, embedding_matrix

TEMPLATE_KINDS = ("pool", "single")
FINGERPRINT_KEY = "ovml_fingerprint"


def load_templates(kind: str = "pool") -> list[str]:
    """The prompt pool from prompts/label_templates.txt; 'single' is its first line, "a photo of a {}."."""
    if kind not in TEMPLATE_KINDS:
        raise OvmlError(f"templates '{kind}' is not one of {', '.join(TEMPLATE_KINDS)}")
    text = files("ovml.prompts").joinpath("label_templates.txt").read_text(encoding="utf-8")
    pool = [line.strip() for line in text.splitlines() if line.strip()]
    return pool if kind == "pool" else pool[:1]


def templates_digest(kind: str = "pool") -> str:
    return hashlib.sha256("\n".join(load_templates(kind)).encode()).hexdigest()


def label_embeddings(encoder: ClipEncoder, labels: list[str], templates: str = "pool",
                     cache_dir: str | Path | None = None, name: str | None = None,
                     progress: Callable[[int], None] | None = None) -> np.ndarray:
    """float32 [len(labels), d], L2-normalised; cached in cache_dir/<name>.parquet when cache_dir is given
    (name defaults to the fingerprint, so distinct label lists never overwrite each other)."""
    phrasings = load_templates(templates)
    fingerprint = hashlib.sha256(json.dumps(
        {"labels": labels, "templates": phrasings, "clip": str(encoder.spec), "dim": encoder.dim}
    ).encode()).hexdigest()
    path = Path(cache_dir) / f"{name or 'labels-' + fingerprint[:16]}.parquet" if cache_dir is not None else None
    if path is not None:
        cached = _read_cache(path, fingerprint)
        if cached is not None:
            return cached
    texts = [template.replace("{}", label) for label in labels for template in phrasings]
    per_template = encoder.encode_text(texts, progress=progress).reshape(len(labels), len(phrasings), encoder.dim)
    mean = per_template.mean(axis=1)
    embeddings = (mean / np.linalg.norm(mean, axis=1, keepdims=True)).astype(np.float32)
    if path is not None:
        table = pa.table({"label": pa.array(labels, pa.string()), "embedding": embedding_array(embeddings)})
        try:
            atomic.write_parquet(path, table.replace_schema_metadata({
                FINGERPRINT_KEY: fingerprint, "clip": str(encoder.spec), "templates": templates,
                "n_templates": str(len(phrasings)),
            }))
        except OSError:
            if name is not None:  # a named file is an artifact (labels/train.parquet): its write must not fail
                raise
            # an unnamed one is only a cache: a full disk or read-only run dir must not stop eval or predict
    return embeddings


def _read_cache(path: Path, fingerprint: str) -> np.ndarray | None:
    """The cached matrix, or None when it is absent, unreadable or made from other labels/templates/model."""
    if not path.is_file():
        return None
    try:
        if (pq.read_schema(path).metadata or {}).get(FINGERPRINT_KEY.encode()) != fingerprint.encode():
            return None
        matrix = embedding_matrix(pq.read_table(path, columns=["embedding"])["embedding"])
    except (pa.ArrowInvalid, OSError):
        return None
    return matrix if np.isfinite(matrix).all() else None
