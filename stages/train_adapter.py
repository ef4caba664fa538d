"""train-adapter: a residual MLP trained on noise-perturbed caption embeddings -> adapter/."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ovml.pipeline import atomic, losses
from ovml.pipeline.adapter import Adapter, AdapterConfig, perturb, save_adapter
from ovml.pipeline.artifacts import ADAPTER, CAPTIONS, TEXT_EMB, TRAIN_LABELS, TRAIN_LOG, VOCABULARY, caption_parts
from ovml.pipeline.device import pick_device, return_freed_memory
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.label_sets import LabelSets
from ovml.pipeline.metrics import average_precision, column_blocks, mean_average_precision
from ovml.pipeline.progress import progress_bar
from ovml.pipeline.rundir import RunDir, StageOutcome, run_stage
from ovml.pipeline.settings import TrainAdapterConfig, as_params, check_settings
from ovml.pipeline.text_embeddings import (
    TokenFeatures,
    check_token_features,
    embedding_matrix,
    read_text_embeddings,
    read_token_features,
    text_embedding_parts,
)
from ovml.pipeline.vocabulary import read_vocabulary_json

# Settings the AdapterConfig holds as fields of its own; every other fingerprinted one goes into its `training`.
MODEL_SETTINGS = {*(f.name for f in dataclasses.fields(AdapterConfig)), "local"}
LOSSES = {"asl": losses.asl, "bce": losses.bce, "rank": losses.rank}
VAL_LABELS_PER_BLOCK = 64  # AP's working set is a few [held-out captions, block] arrays: 26 MB each at 100k
VAL_CAPTIONS_PER_CHUNK = 8192
TRAIN_LOG_SCHEMA = pa.schema([("epoch", pa.int64()), ("loss", pa.float64()), ("val_mAP", pa.float64()),
                              ("val_mAP_local", pa.float64()), ("lr", pa.float64()), ("seconds", pa.float64())])


@dataclass
class TrainingData:
    """Memory proportional to the data: one embedding matrix, and label indices rather than [n, L] targets."""

    embeddings: torch.Tensor  # [m, d] text_emb/ rows in part order, float32 or float16 (--store-dtype)
    rows: torch.Tensor  # [n] int64: caption i's row in embeddings
    targets: LabelSets  # n captions, columns in vocabulary order; densified one batch at a time
    label_emb: torch.Tensor  # [L, d]
    vocabulary: list[str]
    label_templates: str  # the prompt kind embed-text used for label_emb; eval and predict must use it too
    tokens: TokenFeatures | None = None  # word-token features of the embeddings' rows (--local only)


def train_adapter(cfg: TrainAdapterConfig) -> StageOutcome:
    check(cfg)
    run_dir = RunDir(cfg.run_dir)
    cfg = replace(cfg, clip=run_dir.clip(cfg.clip))
    run_dir.require(VOCABULARY, produced_by="generate_text")
    run_dir.require(TEXT_EMB, produced_by="embed_text")
    run_dir.require(TRAIN_LABELS, produced_by="embed_text")
    if cfg.local:
        check_token_features(run_dir / TEXT_EMB)
    params = as_params(cfg)
    if not cfg.local:  # adapters trained before --local existed keep their fingerprint
        for name in ("local", "local_pooling", "local_top_k"):
            del params[name]
    inputs = [*caption_parts(run_dir.path), *text_embedding_parts(run_dir / TEXT_EMB), run_dir / TRAIN_LABELS,
              run_dir / VOCABULARY]

    def body(out: Path, resume: bool) -> dict:
        return_freed_memory()
        return _train(cfg, params, out, _read_training_data(run_dir, cfg.store_dtype, cfg.local))

    return run_stage(run_dir, "train_adapter", params=params, inputs=inputs, outputs=[ADAPTER], body=body,
                     force=cfg.force, models={"clip": cfg.clip})


def check(cfg: TrainAdapterConfig) -> None:
    """Every setting is checked before the stage touches anything, so a typo never costs the old adapter (and
    `ovml run` checks every stage's before the first runs). Not the CLIP spec: this stage never imports open_clip."""
    check_settings(cfg)
    pick_device(cfg.device)


def _read_training_data(run_dir: RunDir, store_dtype: str, local: bool) -> TrainingData:
    """Captions' verified labels as targets, joined to their text embeddings by caption_id (no copy of them)."""
    vocabulary = read_vocabulary_json(run_dir / VOCABULARY)
    labels = atomic.read_parquet(run_dir / TRAIN_LABELS, f"ovml embed-text --force --run-dir {run_dir.path}",
                                 columns=["label", "embedding"])
    label_templates = (labels.schema.metadata or {}).get(b"templates", b"pool").decode()
    if labels.column("label").to_pylist() != vocabulary:
        raise OvmlError(f"{run_dir / TRAIN_LABELS} does not list the labels of captions/vocabulary.json in "
                        f"order; re-run `ovml embed-text --force --run-dir {run_dir.path}`")
    parts = caption_parts(run_dir.path)
    if not parts:
        raise OvmlError(f"no captions (part-*.parquet) in {run_dir / CAPTIONS}; run `ovml generate-text` first")
    captions = pa.concat_tables(atomic.read_parquet(p, f"ovml generate-text --run-dir {run_dir.path}",
                                                    columns=["caption_id", "labels"]) for p in parts)
    targets = _targets(captions.column("labels"), vocabulary)
    caption_ids = captions.column("caption_id")
    del captions  # the label lists go before the embedding matrix arrives (sizes: docs/benchmarks.md)
    text_ids, text_emb = read_text_embeddings(run_dir / TEXT_EMB, store_dtype)
    row = pc.index_in(caption_ids, value_set=text_ids.combine_chunks())
    del caption_ids, text_ids
    pa.default_memory_pool().release_unused()  # Arrow's allocator would keep the freed tables' pages for good
    if row.null_count:
        raise OvmlError(f"{row.null_count} captions have no text embedding; re-run "
                        f"`ovml embed-text --run-dir {run_dir.path}`")
    label_emb = embedding_matrix(labels.column("embedding"))
    if not np.isfinite(label_emb).all():
        raise OvmlError(f"{run_dir / TRAIN_LABELS} holds non-finite label embeddings (NaN or inf); remake it with "
                        f"`ovml embed-text --force --run-dir {run_dir.path}`")
    if label_emb.shape[1] != text_emb.shape[1]:
        raise OvmlError(f"label embeddings are {label_emb.shape[1]}-d but text embeddings {text_emb.shape[1]}-d; "
                        f"re-run `ovml embed-text --force --run-dir {run_dir.path}`")
    tokens = read_token_features(run_dir / TEXT_EMB) if local else None
    return TrainingData(torch.from_numpy(text_emb), torch.from_numpy(row.to_numpy().astype(np.int64)), targets,
                        torch.from_numpy(label_emb), vocabulary, label_templates, tokens)


def _targets(labels: pa.ChunkedArray, vocabulary: list[str]) -> LabelSets:
    targets, unknown = LabelSets.from_lists(labels, vocabulary)
    if unknown:
        raise OvmlError(f"captions name labels outside captions/vocabulary.json (e.g. {unknown[:3]}); "
                        "re-run generate-text so both come from the same vocabulary")
    return targets


def _train(cfg: TrainAdapterConfig, params: dict, out: Path, data: TrainingData) -> dict:
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    order = np.random.default_rng(cfg.seed).permutation(len(data.rows))
    n_val = round(cfg.val_fraction * len(order))
    val, train = torch.from_numpy(order[:n_val]), torch.from_numpy(order[n_val:])
    if len(train) == 0:
        raise OvmlError(f"no captions left to train on after holding out --val-fraction {cfg.val_fraction}")
    x_all, rows = data.embeddings.to(device), data.rows.to(device)
    label_emb = data.label_emb.to(device)
    config = AdapterConfig(
        dim=int(x_all.shape[1]), clip=cfg.clip, vocabulary=data.vocabulary, label_templates=data.label_templates,
        hidden=cfg.hidden, dropout=cfg.dropout, alpha=cfg.alpha, head=cfg.head, scale=cfg.scale,
        local_pooling=cfg.local_pooling if data.tokens is not None else None, local_top_k=cfg.local_top_k,
        training={**{k: v for k, v in params.items() if k not in MODEL_SETTINGS}, "captions": len(order)},
        ovml_version=metadata.version("ovml"),
    )
    model = Adapter(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch))
    loss_fn = LOSSES[cfg.loss]
    shuffle_rng = torch.Generator().manual_seed(cfg.seed)
    noise_rng = torch.Generator(device).manual_seed(cfg.seed)
    log: list[dict] = []
    best = {"signal": -math.inf, "epoch": 0, "state": None}
    with progress_bar("captions") as progress:
        task = progress.add_task("train-adapter", total=cfg.epochs * len(train))
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            total = 0.0
            for batch in train[torch.randperm(len(train), generator=shuffle_rng)].split(cfg.batch_size):
                batch_rows = rows[batch.to(device)]
                x = perturb(x_all[batch_rows].float(), cfg.noise, cfg.renorm, noise_rng)
                y = torch.from_numpy(data.targets.dense(batch.numpy())).to(device)  # bool: 1 byte per entry
                loss = loss_fn(model(x, label_emb), y)
                if data.tokens is not None:  # the local head, on the same captions' word tokens
                    words, real = data.tokens.padded(batch_rows.cpu().numpy())
                    words = perturb(torch.from_numpy(words).to(device).float(), cfg.noise, cfg.renorm, noise_rng)
                    loss = loss + loss_fn(model.local_logits(model.local_features(words), label_emb,
                                                             torch.from_numpy(real).to(device)), y)
                if not math.isfinite(loss.item()):
                    raise _diverged(cfg, epoch, f"the loss became {loss.item()}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(batch)
                progress.advance(task, len(batch))
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                raise _diverged(cfg, epoch, "some weights became NaN or infinite")
            try:
                val_map, val_map_local = _validation_map(model, x_all, rows[val.to(device)], data.targets,
                                                         val.numpy(), label_emb, data.tokens)
            except FloatingPointError:
                raise _diverged(cfg, epoch, "the held-out captions' scores became NaN or infinite") from None
            log.append({"epoch": epoch, "loss": total / len(train), "val_mAP": val_map, "val_mAP_local": val_map_local,
                        "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0})
            progress.update(task, description=f"epoch {epoch}/{cfg.epochs} loss {log[-1]['loss']:.4g} "
                                              f"val mAP {val_map:.4f}"
                                              + (f" local {val_map_local:.4f}" if data.tokens is not None else ""))
            # with a local head both heads count: the weights of one epoch serve both at eval
            signal = val_map if data.tokens is None else (val_map + val_map_local) / 2
            if math.isnan(signal) or signal > best["signal"]:
                best = {"signal": signal, "epoch": epoch, "state": copy.deepcopy(model.state_dict()),
                        "val_mAP": val_map, "val_mAP_local": val_map_local}
            elif epoch - best["epoch"] >= cfg.patience:
                break
    model.load_state_dict(best["state"])
    best_map = None if math.isnan(best["val_mAP"]) else best["val_mAP"]
    config.training.update(best_epoch=best["epoch"], best_val_mAP=best_map)
    if data.tokens is not None:
        config.training.update(best_val_mAP_local=None if math.isnan(best["val_mAP_local"]) else
                               best["val_mAP_local"])
    save_adapter(out / ADAPTER, model)
    atomic.write_parquet(out / TRAIN_LOG, pa.Table.from_pylist(log, schema=TRAIN_LOG_SCHEMA))
    return {"captions": len(order), "labels": len(data.vocabulary), "epochs_run": len(log),
            "best_epoch": best["epoch"], "best_val_mAP": best_map}


def _diverged(cfg: TrainAdapterConfig, epoch: int, what: str) -> OvmlError:
    """Training went non-finite: its inputs were checked finite when read, so the learning rate (or the logit
    scale) is the likely cause. Raised before anything is saved: the previous adapter stays."""
    return OvmlError(f"training diverged in epoch {epoch}: {what}; lower --lr (now {cfg.lr:g}) or --scale (now "
                     f"{cfg.scale:g}); nothing was saved")


def _finite(scores: torch.Tensor) -> np.ndarray:
    """Scores of finite weights can still overflow (float16 features, huge logits): training has diverged."""
    if not torch.isfinite(scores).all():
        raise FloatingPointError("non-finite validation scores")
    return scores.cpu().numpy()


def _warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.inference_mode()
def _validation_map(model: Adapter, x_all: torch.Tensor, x_rows: torch.Tensor, targets: LabelSets,
                    captions: np.ndarray, label_emb: torch.Tensor, tokens: TokenFeatures | None
                    ) -> tuple[float, float | None]:
    """Text-side mAP on held-out captions, without noise, of the global head and of the local head on the
    captions' word tokens (None without one): the early-stopping signal (NaN without a split).

    Features are kept in float16 (0.1 GB for 100k held-out captions; scores move by ~1e-3, far below what
    early stopping can see) and scored a block of labels at a time, so memory is never [captions, labels]."""
    if len(x_rows) == 0:
        return math.nan, None if tokens is None else math.nan
    model.eval()
    chunks = [slice(start, start + VAL_CAPTIONS_PER_CHUNK) for start in range(0, len(x_rows), VAL_CAPTIONS_PER_CHUNK)]
    h = torch.empty((len(x_rows), x_all.shape[1]), dtype=torch.float16, device=x_all.device)
    for chunk in chunks:  # never a copy of the held-out embeddings
        h[chunk] = model.features(x_all[x_rows[chunk]].float())
    words = []  # per chunk: the local head's features of its captions' tokens, padded, and which are real
    for chunk in chunks if tokens is not None else []:
        padded, real = tokens.padded(x_rows[chunk].cpu().numpy())
        padded = torch.from_numpy(padded).to(x_all.device).float()
        words.append((model.local_features(padded).half(), torch.from_numpy(real).to(x_all.device)))
    ap, ap_local = [], []
    for cols in column_blocks(len(label_emb), VAL_LABELS_PER_BLOCK):
        block_emb = label_emb[torch.from_numpy(cols).to(label_emb.device)]
        truth = targets.dense(captions, cols)
        scores = torch.cat([model.logits(h[chunk].float(), block_emb) for chunk in chunks])
        ap.append(average_precision(_finite(scores), truth))
        if words:
            scores = torch.cat([model.local_logits(w.float(), block_emb, real) for w, real in words])
            ap_local.append(average_precision(_finite(scores), truth))
    local = mean_average_precision(np.concatenate(ap_local)) if words else None
    return mean_average_precision(np.concatenate(ap)), local
