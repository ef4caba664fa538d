"""train-adapter: a residual MLP trained on noise-perturbed caption embeddings -> adapter/.

With --images it also learns from labelled images of an image cache (their labels restricted to the seen ones,
no noise: they already are image embeddings), or from those images alone with --no-captions.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from ovml.pipeline import atomic, losses
from ovml.pipeline.adapter import Adapter, AdapterConfig, perturb, save_adapter
from ovml.pipeline.artifacts import (
    ADAPTER,
    CAPTIONS,
    LABEL_CACHE,
    TEXT_EMB,
    TRAIN_LABELS,
    TRAIN_LOG,
    VOCABULARY,
    caption_parts,
    image_cache,
)
from ovml.pipeline.clip import load_clip
from ovml.pipeline.device import pick_device, return_freed_memory
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.image_cache import read_dataset_info, read_image_cache, read_patches
from ovml.pipeline.image_training import pseudo_labels, read_labelled_images, seen_label_list
from ovml.pipeline.label_embeddings import label_embeddings
from ovml.pipeline.label_sets import LabelSets
from ovml.pipeline.metrics import average_precision, column_blocks, mean_average_precision
from ovml.pipeline.progress import progress_bar
from ovml.pipeline.rundir import RunDir, StageOutcome, check_same_clip, run_stage
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
    captions: int | None = None  # training rows [0, captions) are captions and get noise, the rest images; None: all
    patches: np.ndarray | None = None  # the image cache's patch features, [cached images, patches, d] (query head)
    patch_rows: np.ndarray | None = None  # image i (training row captions + i) is patches row patch_rows[i]
    sources: dict = field(default_factory=dict)  # what each source contributed, for the adapter's config.json


def train_adapter(cfg: TrainAdapterConfig) -> StageOutcome:
    check(cfg)
    run_dir = RunDir(cfg.run_dir)
    cfg = replace(cfg, clip=run_dir.clip(cfg.clip))
    inputs = []
    if cfg.captions:
        run_dir.require(VOCABULARY, produced_by="generate_text")
        run_dir.require(TEXT_EMB, produced_by="embed_text")
        run_dir.require(TRAIN_LABELS, produced_by="embed_text")
        inputs = [*caption_parts(run_dir.path), *text_embedding_parts(run_dir / TEXT_EMB), run_dir / TRAIN_LABELS,
                  run_dir / VOCABULARY]
    if cfg.local or (cfg.head == "query" and cfg.captions):
        check_token_features(run_dir / TEXT_EMB)
    images = _check_images(run_dir, cfg) if cfg.images else None
    if images is not None:
        inputs += images[1]
    unlabelled = _check_cache(run_dir, cfg.unlabelled, cfg.clip) if cfg.unlabelled else None
    if unlabelled is not None:
        inputs += [unlabelled / name for name in ("index.faiss", "dataset.json")]
    params = as_params(cfg)
    if not cfg.local:  # adapters trained before --local existed keep their fingerprint
        for name in ("local", "local_pooling", "local_top_k"):
            del params[name]
    if not cfg.images:  # and those trained before --images
        for name in ("images", "seen_labels", "images_per_label", "captions", "distill"):
            del params[name]
    if cfg.head != "query":  # and before the query head
        del params["queries"]
    if not cfg.unlabelled:
        del params["unlabelled"]

    def body(out: Path, resume: bool) -> dict:
        return_freed_memory()
        data = _read_training_data(run_dir, cfg.store_dtype, cfg.local or cfg.head == "query") if cfg.captions else None
        if images is not None:
            data = _with_images(data, images[0], cfg, run_dir)
        if unlabelled is not None:  # self-training: a first model labels the images, the second learns from them
            data = _with_pseudo_labels(data, _fit(cfg, data)[0].eval(), unlabelled, cfg)
        return _train(cfg, out, data)

    return run_stage(run_dir, "train_adapter", params=params, inputs=inputs, outputs=[ADAPTER], body=body,
                     force=cfg.force, models={"clip": cfg.clip})


def check(cfg: TrainAdapterConfig) -> None:
    """Every setting is checked before the stage touches anything, so a typo never costs the old adapter (and
    `ovml run` checks every stage's before the first runs). Not the CLIP spec: this stage never imports open_clip."""
    check_settings(cfg)
    pick_device(cfg.device)
    if not cfg.images and (not cfg.captions or cfg.seen_labels or cfg.images_per_label is not None):
        raise OvmlError("--no-captions, --seen-labels and --images-per-label describe image training; "
                        "add --images CACHE (an image cache made by embed-images, e.g. fashion-mnist-train)")
    if (cfg.images or cfg.unlabelled) and cfg.local:
        raise OvmlError("--local trains on caption word tokens only; drop --local (or --images / --unlabelled)")
    if cfg.head == "query" and cfg.local:
        raise OvmlError("the query head already attends over tokens and patches; drop --local")
    if cfg.unlabelled and cfg.head == "query":
        raise OvmlError("--unlabelled pseudo-labels with the global head; drop --head query or --unlabelled")
    if cfg.distill and not cfg.images:
        raise OvmlError(f"--distill needs --images (it keeps adapted image features near CLIP's), got "
                        f"--distill {cfg.distill} without it")


def _check_images(run_dir: RunDir, cfg: TrainAdapterConfig) -> tuple[Path, list[Path]]:
    """(the image cache, the files that define it and its seen labels: the stage's inputs), checked before
    anything is read: it exists and holds embeddings of the adapter's CLIP model."""
    cache = _check_cache(run_dir, cfg.images, cfg.clip)
    info = read_dataset_info(cache)
    _, seen_files = seen_label_list(cfg.seen_labels, info, _caption_vocabulary(run_dir))
    if cfg.head == "query" and read_patches(cache) is None:
        raise OvmlError(f"--head query attends over image patches, and {cache} has none; re-run embed-images with "
                        "--local --force")
    return cache, [cache / name for name in ("index.faiss", "items.parquet", "dataset.json")] + seen_files


def _check_cache(run_dir: RunDir, name: str, clip: str) -> Path:
    """images/<name>/ of the run, checked to hold an image cache embedded by the adapter's CLIP model."""
    cache = run_dir / image_cache(name)
    if not (cache / "index.faiss").is_file():
        raise OvmlError(f"{cache} holds no image cache; run `ovml embed-images` for it first (e.g. "
                        "`--dataset fashion-mnist --split train` makes images/fashion-mnist-train)")
    check_same_clip(read_dataset_info(cache).get("clip"), clip, cache)
    return cache


def _caption_vocabulary(run_dir: RunDir) -> list[str] | None:
    return read_vocabulary_json(run_dir / VOCABULARY) if (run_dir / VOCABULARY).is_file() else None


def _read_training_data(run_dir: RunDir, store_dtype: str, local: bool) -> TrainingData:
    """Captions' verified labels as targets, joined to their text embeddings by caption_id (no copy of them)."""
    vocabulary = read_vocabulary_json(run_dir / VOCABULARY)
    labels = atomic.read_parquet(run_dir / TRAIN_LABELS, f"ovml embed-text --force --run-dir {run_dir.path}",
                                 columns=["label", "embedding"])
    label_templates = (labels.schema.metadata or {}).get(b"templates", b"pool").decode()
    if labels.column("label").to_pylist() != vocabulary:
        raise OvmlError(f"{run_dir / TRAIN_LABELS} does not list the labels of captions/vocabulary.json in "
                        f"order (the vocabulary changed since embed-text ran); run `ovml embed-text --run-dir "
                        f"{run_dir.path}` again")
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


def _with_images(data: TrainingData | None, cache: Path, cfg: TrainAdapterConfig, run_dir: RunDir) -> TrainingData:
    """The training set with the cache's labelled images appended after the captions (or alone): one embedding
    matrix, the vocabulary extended by seen image labels the captions never name, embedded as its labels were."""
    info = read_dataset_info(cache)
    seen, _ = seen_label_list(cfg.seen_labels, info, _caption_vocabulary(run_dir))
    images = read_labelled_images(cache, seen, cfg.images_per_label, cfg.seed)
    vocabulary = data.vocabulary if data is not None else []
    extra = [label for label in images.seen if label not in set(vocabulary)]
    templates = data.label_templates if data is not None else "pool"
    label_emb = data.label_emb if data is not None else torch.empty((0, images.vectors.shape[1]))
    if extra:
        encoder = load_clip(cfg.clip, "cpu")
        label_emb = torch.cat([label_emb, torch.from_numpy(
            label_embeddings(encoder, extra, templates, cache_dir=run_dir / LABEL_CACHE))])
    vocabulary = vocabulary + extra
    column = {label: i for i, label in enumerate(vocabulary)}
    image_targets = images.targets.with_columns(np.array([column[label] for label in images.seen]), len(vocabulary))
    vectors = torch.from_numpy(images.vectors.astype(cfg.store_dtype, copy=False))
    sources = {"images": {"cache": cfg.images, "dataset": info.get("dataset"), "split": info.get("image_split"),
                          "images": len(images.rows), "seen_labels": len(images.seen),
                          "per_label": cfg.images_per_label}}
    patches = read_patches(cache) if cfg.head == "query" else None
    if data is None:
        return TrainingData(vectors, torch.arange(len(vectors)), image_targets, label_emb, vocabulary, templates,
                            captions=0, sources=sources, patches=patches, patch_rows=images.rows)
    caption_targets = data.targets.with_columns(np.arange(data.targets.n_labels), len(vocabulary))
    image_rows = len(data.embeddings) + torch.arange(len(vectors))
    return TrainingData(
        torch.cat([data.embeddings, vectors]), torch.cat([data.rows, image_rows]),
        LabelSets.concat([caption_targets, image_targets]), label_emb, vocabulary, templates, tokens=data.tokens,
        captions=len(data.rows), sources={"captions": len(data.rows), **sources}, patches=patches,
        patch_rows=images.rows)


def _with_pseudo_labels(data: TrainingData, teacher: Adapter, cache: Path, cfg: TrainAdapterConfig) -> TrainingData:
    """The training set with every image of `cache` appended, its labels ignored: the teacher's pseudo-labels
    over the training vocabulary (image_training.pseudo_labels) take their place; no noise on them."""
    vectors, _, info = read_image_cache(cache)
    scores = teacher.score(torch.from_numpy(vectors).to(pick_device(cfg.device)), data.label_emb.to(
        pick_device(cfg.device)))
    positive = pseudo_labels(scores)
    rows, cols = np.nonzero(positive)
    targets = LabelSets(np.concatenate([[0], np.cumsum(positive.sum(axis=1))]).astype(np.int64),
                        cols.astype(np.int32), len(data.vocabulary))
    captions = len(data.rows) if data.captions is None else data.captions
    sources = {**(data.sources or {"captions": captions}),
               "unlabelled": {"cache": cfg.unlabelled, "dataset": info.get("dataset"),
                              "split": info.get("image_split"), "images": len(vectors),
                              "pseudo_positives_per_image": round(float(positive.sum(axis=1).mean()), 3)}}
    image_rows = len(data.embeddings) + torch.arange(len(vectors))
    return TrainingData(
        torch.cat([data.embeddings, torch.from_numpy(vectors.astype(cfg.store_dtype))]),
        torch.cat([data.rows, image_rows]), LabelSets.concat([data.targets, targets]), data.label_emb,
        data.vocabulary, data.label_templates, captions=captions, sources=sources)


def _targets(labels: pa.ChunkedArray, vocabulary: list[str]) -> LabelSets:
    targets, unknown = LabelSets.from_lists(labels, vocabulary)
    if unknown:
        raise OvmlError(f"captions name labels outside captions/vocabulary.json (e.g. {unknown[:3]}); "
                        "re-run generate-text so both come from the same vocabulary")
    return targets


def _fit(cfg: TrainAdapterConfig, data: TrainingData) -> tuple[Adapter, list[dict], dict]:
    """(the model at its best epoch, the log row of each epoch, the best epoch's record)."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    order = np.random.default_rng(cfg.seed).permutation(len(data.rows))
    n_val = round(cfg.val_fraction * len(order))
    val, train = torch.from_numpy(order[:n_val]), torch.from_numpy(order[n_val:])
    if len(train) == 0:
        raise OvmlError(f"nothing left to train on after holding out --val-fraction {cfg.val_fraction}")
    x_all, rows = data.embeddings.to(device), data.rows.to(device)
    label_emb = data.label_emb.to(device)
    config = AdapterConfig(
        dim=int(x_all.shape[1]), clip=cfg.clip, vocabulary=data.vocabulary, label_templates=data.label_templates,
        hidden=cfg.hidden, dropout=cfg.dropout, alpha=cfg.alpha, head=cfg.head, scale=cfg.scale, queries=cfg.queries,
        local_pooling=cfg.local_pooling if cfg.local else None, local_top_k=cfg.local_top_k,
        training={**{k: v for k, v in as_params(cfg).items() if k not in MODEL_SETTINGS},
                  "captions": len(order) if data.captions is None else data.captions,
                  **({"sources": data.sources} if data.sources else {})},
        ovml_version=metadata.version("ovml"),
    )
    model = Adapter(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch))
    loss_fn = LOSSES[cfg.loss]
    head_logits = model.query_logits if cfg.head == "query" else model.logits

    def val_features(batch: torch.Tensor) -> torch.Tensor:
        batch_rows = rows[batch.to(device)]
        return _features(model, x_all[batch_rows].float(), batch, batch_rows, data, cfg, None)
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
                x = _perturb_text(x_all[batch_rows].float(), batch, data.captions, cfg, noise_rng)
                y = torch.from_numpy(data.targets.dense(batch.numpy())).to(device)  # bool: 1 byte per entry
                loss = loss_fn(head_logits(_features(model, x, batch, batch_rows, data, cfg, noise_rng), label_emb), y)
                if cfg.distill:
                    loss = loss + cfg.distill * _distillation(model, x, batch, data.captions)
                if cfg.local:  # the local head, on the same captions' word tokens
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
                val_map, val_map_local = _validation_map(model, val_features, head_logits, rows[val.to(device)],
                                                         data.targets, val, label_emb,
                                                         data.tokens if cfg.local else None)
            except FloatingPointError:
                raise _diverged(cfg, epoch, "the held-out captions' scores became NaN or infinite") from None
            log.append({"epoch": epoch, "loss": total / len(train), "val_mAP": val_map, "val_mAP_local": val_map_local,
                        "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0})
            progress.update(task, description=f"epoch {epoch}/{cfg.epochs} loss {log[-1]['loss']:.4g} "
                                              f"val mAP {val_map:.4f}"
                                              + (f" local {val_map_local:.4f}" if cfg.local else ""))
            # with a local head both heads count: the weights of one epoch serve both at eval
            signal = (val_map + val_map_local) / 2 if cfg.local else val_map
            if math.isnan(signal) or signal > best["signal"]:
                best = {"signal": signal, "epoch": epoch, "state": copy.deepcopy(model.state_dict()),
                        "val_mAP": val_map, "val_mAP_local": val_map_local}
            elif epoch - best["epoch"] >= cfg.patience:
                break
    model.load_state_dict(best["state"])
    return model, log, best


def _train(cfg: TrainAdapterConfig, out: Path, data: TrainingData) -> dict:
    model, log, best = _fit(cfg, data)
    config = model.config
    best_map = None if math.isnan(best["val_mAP"]) else best["val_mAP"]
    config.training.update(best_epoch=best["epoch"], best_val_mAP=best_map)
    if cfg.local:
        config.training.update(best_val_mAP_local=None if math.isnan(best["val_mAP_local"]) else
                               best["val_mAP_local"])
    save_adapter(out / ADAPTER, model)
    atomic.write_parquet(out / TRAIN_LOG, pa.Table.from_pylist(log, schema=TRAIN_LOG_SCHEMA))
    return {"captions": config.training["captions"],
            **({"images": len(data.rows) - data.captions} if data.sources else {}),
            "labels": len(data.vocabulary), "epochs_run": len(log),
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


def _perturb_text(x: torch.Tensor, batch: torch.Tensor, captions: int | None, cfg: TrainAdapterConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """Noise on the caption rows of a batch only: image rows are already where the adapter is applied."""
    if captions is None:
        return perturb(x, cfg.noise, cfg.renorm, generator)
    text = (batch < captions).to(x.device)
    if text.any():
        x = x.clone()
        x[text] = perturb(x[text], cfg.noise, cfg.renorm, generator)
    return x


def _features(model: Adapter, x: torch.Tensor, batch: torch.Tensor, batch_rows: torch.Tensor, data: TrainingData,
              cfg: TrainAdapterConfig, generator: torch.Generator | None) -> torch.Tensor:
    """What the head scores for training examples `batch` (inputs x): the adapted embeddings [n, d], or for the
    query head its query features [n, queries, d] over the examples' tokens (caption words, noised when a
    generator is given, as the captions are; image patches as cached)."""
    if cfg.head != "query":
        return model.features(x)
    captions = len(data.rows) if data.captions is None else data.captions
    text = (batch < captions).numpy()
    words = real = patches = None
    if text.any():
        words, real = data.tokens.padded(batch_rows.cpu().numpy()[text])
        words = torch.from_numpy(words).to(x.device).float()
        if generator is not None:
            words = perturb(words, cfg.noise, cfg.renorm, generator)
    if not text.all():
        patches = np.asarray(data.patches[data.patch_rows[batch.numpy()[~text] - captions]], dtype=np.float32)
    longest = max(0 if words is None else words.shape[1], 0 if patches is None else patches.shape[1])
    tokens = torch.zeros((len(batch), longest, x.shape[1]), device=x.device)
    mask = torch.zeros((len(batch), longest), dtype=torch.bool, device=x.device)
    if words is not None:
        tokens[torch.from_numpy(text), :words.shape[1]] = words
        mask[torch.from_numpy(text), :words.shape[1]] = torch.from_numpy(real).to(x.device)
    if patches is not None:
        tokens[torch.from_numpy(~text), :patches.shape[1]] = torch.from_numpy(patches).to(x.device)
        mask[torch.from_numpy(~text), :patches.shape[1]] = True
    return model.query_features(x, tokens, mask)


def _distillation(model: Adapter, x: torch.Tensor, batch: torch.Tensor, captions: int | None) -> torch.Tensor:
    """MKT's distillation term: mean 1 - cos(adapted image embedding, CLIP's) over the batch's image rows, so the
    adapter keeps what CLIP knows about labels no image was annotated with."""
    images = (batch >= (captions or 0)).to(x.device)
    if captions is None or not images.any():
        return x.new_zeros(())
    return (1 - F.cosine_similarity(model.features(x[images]), x[images], dim=-1)).mean()


def _warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.inference_mode()
def _validation_map(model: Adapter, features: Callable[[torch.Tensor], torch.Tensor],
                    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_rows: torch.Tensor,
                    targets: LabelSets, examples: torch.Tensor, label_emb: torch.Tensor, tokens: TokenFeatures | None
                    ) -> tuple[float, float | None]:
    """mAP on held-out examples (captions, and images when training on them), without noise, of the head and of
    the local head on the captions' word tokens (None without one): the early-stopping signal (NaN without a
    split). `features` gives the head's features of examples, `logits` scores them.

    Features are kept in float16 (0.1 GB for 100k held-out captions; scores move by ~1e-3, far below what
    early stopping can see) and scored a block of labels at a time, so memory is never [captions, labels]."""
    if len(x_rows) == 0:
        return math.nan, None if tokens is None else math.nan
    model.eval()
    chunks = [slice(start, start + VAL_CAPTIONS_PER_CHUNK) for start in range(0, len(x_rows), VAL_CAPTIONS_PER_CHUNK)]
    h = torch.cat([features(examples[chunk]).half() for chunk in chunks])  # never a copy of the held-out embeddings
    words = []  # per chunk: the local head's features of its captions' tokens, padded, and which are real
    for chunk in chunks if tokens is not None else []:
        padded, real = tokens.padded(x_rows[chunk].cpu().numpy())
        padded = torch.from_numpy(padded).to(x_rows.device).float()
        words.append((model.local_features(padded).half(), torch.from_numpy(real).to(x_rows.device)))
    ap, ap_local = [], []
    for cols in column_blocks(len(label_emb), VAL_LABELS_PER_BLOCK):
        block_emb = label_emb[torch.from_numpy(cols).to(label_emb.device)]
        truth = targets.dense(examples.numpy(), cols)
        scores = torch.cat([logits(h[chunk].float(), block_emb) for chunk in chunks])
        ap.append(average_precision(_finite(scores), truth))
        if words:
            scores = torch.cat([model.local_logits(w.float(), block_emb, real) for w, real in words])
            ap_local.append(average_precision(_finite(scores), truth))
    local = mean_average_precision(np.concatenate(ap_local)) if words else None
    return mean_average_precision(np.concatenate(ap)), local
