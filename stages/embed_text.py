"""embed-text: CLIP text embeddings of captions (text_emb/) and of label prompt pools (labels/)."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ovml.pipeline import atomic
from ovml.pipeline.artifacts import CAPTIONS, TEXT_EMB, TRAIN_LABELS, VOCABULARY, caption_parts
from ovml.pipeline.clip import autocast_dtype, check_run_clip, load_clip, pick_device
from ovml.pipeline.engine import UNIT, check_engine, open_engine, unit_rows
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.label_embeddings import label_embeddings, load_templates, templates_digest
from ovml.pipeline.progress import progress_bar
from ovml.pipeline.rundir import RunDir, StageOutcome, run_stage
from ovml.pipeline.settings import EmbedTextConfig, as_params, check_settings
from ovml.pipeline.text_embeddings import (
    TOKENS,
    embedding_array,
    embedding_matrix,
    text_embedding_parts,
    token_array,
    write_text_embeddings,
)
from ovml.pipeline.vocabulary import read_vocabulary_json

TRUNCATED_KEY = "ovml_truncated"  # per-part count in the schema metadata, so a resumed run still totals it


def check(cfg: EmbedTextConfig) -> None:
    """The settings and the CLIP spec, before anything runs (`ovml run` checks every stage's before the first)."""
    check_settings(cfg)
    check_engine(cfg.engine)
    autocast_dtype(cfg.precision, pick_device(cfg.device))
    check_run_clip(cfg.run_dir, cfg.clip, cfg.device)


def embed_text(cfg: EmbedTextConfig) -> StageOutcome:
    """One text_emb part per captions part (same name), then the training vocabulary's label embeddings."""
    check(cfg)
    run_dir = RunDir(cfg.run_dir)
    cfg = replace(cfg, clip=run_dir.clip(cfg.clip))
    captions_dir = run_dir.require(CAPTIONS, produced_by="generate_text")
    parts = caption_parts(run_dir.path)
    if not parts:
        raise OvmlError(f"{captions_dir} has no part-*.parquet files; "
                        f"run `ovml generate-text --run-dir {run_dir.path}` first")
    run_dir.require(VOCABULARY, produced_by="generate_text")
    run_dir.verified_hashes([*parts, run_dir / VOCABULARY])  # before reading any (run_stage checks them again)
    labels = read_vocabulary_json(run_dir / VOCABULARY)
    params = as_params(cfg)
    if not cfg.local:
        del params["local"]  # text_emb/ made before --local existed keeps its fingerprint: no re-embedding
    params["label_templates_sha256"] = templates_digest(cfg.templates)
    earlier = {} if cfg.force else _earlier_parts(run_dir, params, parts)
    return run_stage(
        run_dir, "embed_text", params=params, inputs=[*parts, run_dir / VOCABULARY],
        outputs=[TEXT_EMB, TRAIN_LABELS], body=functools.partial(_embed_all, cfg, parts, labels, earlier),
        force=cfg.force, models={"clip": cfg.clip},
    )


def _earlier_parts(run_dir: RunDir, params: dict, parts: list[Path]) -> dict[str, Path]:
    """text_emb parts the last finished run made with these settings from caption parts still byte-identical,
    so a topped-up caption pool costs only its new parts."""
    record = run_dir.stage_record("embed_text") or {}
    if record.get("status") != "finished" or record.get("params") != params:
        return {}
    earlier = {}
    for part in parts:
        made = run_dir / TEXT_EMB / part.name
        if made.is_file() and record["inputs"].get(f"{CAPTIONS}/{part.name}") == atomic.sha256_file(part) \
                and record["outputs"].get(f"{TEXT_EMB}/{part.name}") == atomic.sha256_file(made):
            earlier[part.name] = made
    return earlier


def _embed_all(cfg: EmbedTextConfig, parts: list[Path], labels: list[str], earlier: dict[str, Path], out: Path,
               resume: bool) -> dict:
    """Parts already in out/text_emb/ were finished by an interrupted attempt with the same fingerprint, and
    `earlier` ones by the last finished run: both kept.

    Label prompts are embedded here on either engine: a few hundred per label, next to millions of captions.
    """
    resumed = sum((out / TEXT_EMB / p.name).exists() for p in parts)
    for name, made in earlier.items():
        atomic.link_or_copy(made, out / TEXT_EMB / name)
    todo = [p for p in parts if not (out / TEXT_EMB / p.name).exists()]
    with progress_bar("texts") as bar, open_engine(cfg.engine, address=cfg.ray_address, actors=cfg.ray_actors,
                                                    device=cfg.device) as engine:
        captions = {part.name: _read_captions(part) for part in todo}
        task = bar.add_task("captions", total=sum(len(texts) for _, texts in captions.values()))
        embedded, started = 0, time.perf_counter()
        items = [{UNIT: name, "texts": texts} for name, (_, texts) in captions.items()]
        expected = {name: len(texts) for name, (_, texts) in captions.items()}
        worker_args = (cfg.clip, cfg.device, cfg.batch_size, cfg.precision, cfg.local)
        for name, tables in engine.map(TextPartWorker, worker_args, items, expected=expected):
            table = unit_rows(tables)
            truncated = int(pc.sum(table["truncated"]).as_py() or 0)
            write_text_embeddings(out / TEXT_EMB / name, captions[name][0], embedding_matrix(table["embedding"]),
                                  cfg.store_dtype, metadata={TRUNCATED_KEY: str(truncated), "clip": cfg.clip},
                                  tokens=table[TOKENS] if cfg.local else None)
            embedded += table.num_rows
            bar.advance(task, table.num_rows)
        seconds = time.perf_counter() - started
        labels_task = bar.add_task("label prompts", total=len(labels) * len(load_templates(cfg.templates)))
        encoder = load_clip(cfg.clip, cfg.device)
        label_embeddings(encoder, labels, cfg.templates, cache_dir=(out / TRAIN_LABELS).parent,
                         name=Path(TRAIN_LABELS).stem, progress=lambda n: bar.advance(labels_task, n))
    written = [pq.ParquetFile(p) for p in text_embedding_parts(out / TEXT_EMB)]
    return {
        "texts": sum(f.metadata.num_rows for f in written),
        "truncated": sum(int(f.schema_arrow.metadata[TRUNCATED_KEY.encode()]) for f in written),
        "texts_per_s": round(embedded / seconds, 1) if embedded else None,  # writing parts included
        "resumed_parts": resumed,
        "reused_parts": len(parts) - len(todo) - resumed,
        "dim": encoder.dim,
        "store_dtype": cfg.store_dtype,
        "labels": len(labels),
    }


class TextPartWorker:
    """An engine worker: CLIP loaded once, then whole captions parts -> their embeddings, truncation flags and
    (with --local) word-token features. A part is embedded in one call: rows are sorted by length across it."""

    def __init__(self, clip: str, device: str, batch_size: int, precision: str, local: bool):
        self.encoder = load_clip(clip, device)
        self.batch_size, self.precision, self.local = batch_size, precision, local

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for unit, texts in zip(batch[UNIT].to_pylist(), batch["texts"].to_pylist(), strict=True):
            tokens, truncated = self.encoder.tokenize(texts)
            embeddings = self.encoder.encode_tokens(tokens, self.batch_size, precision=self.precision)
            columns = {UNIT: [unit] * len(texts), "embedding": embedding_array(embeddings),
                       "truncated": pa.array(truncated)}
            if self.local:  # run through the tower a second time: the pooled embeddings stay those without --local
                words = self.encoder.encode_token_features(tokens, self.batch_size)
                columns[TOKENS] = token_array(words, self.encoder.dim)
            yield pa.table(columns)


def _read_captions(part: Path) -> tuple[list[str], list[str]]:
    try:
        table = pq.read_table(part, columns=["caption_id", "text"])
    except (pa.ArrowInvalid, OSError):
        raise OvmlError(f"{part} is not a captions part with caption_id and text columns; "
                        "re-run `ovml generate-text --force`") from None
    texts = table["text"].to_pylist()
    if None in texts:
        raise OvmlError(f"{part} has captions without text; re-run `ovml generate-text --force`")
    return table["caption_id"].to_pylist(), texts
