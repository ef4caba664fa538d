"""eval: adapter vs zero-shot CLIP on a cached dataset, with the published protocols -> eval/<dataset>/.

The command is `ovml eval`; the module is `evaluate` (`eval` is a Python builtin) and its config EvalConfig.
Both methods score the same cached image vectors, so the report compares the adapter and zero-shot CLIP and
nothing else. Each dataset's protocols (label split, K values, which images count) are declared once, in
pipeline/datasets.py DATASETS: NUS-WIDE ZSL/GZSL with F1@3/5, Open Images ZSL/GZSL with F1@10/20, the others
all labels with F1@3. In the zero-shot protocols an image counts only if it has a positive among the
protocol's labels, as in the papers; elsewhere every image counts. A cache made with `embed-images --local`
adds the `adapter+local` and `zero-shot+local` rows (LocalScorer): global and pooled patch scores fused; they
did not beat the global rows on the testbed (docs/accuracy.md). `--ceiling CACHE` adds the supervised ceiling: a
linear probe trained with the labels of another cache's images (e.g. `embed-images --split train`), and the
share of the headroom between zero-shot and it that the adapter recovers.

Memory is bounded by the chunk and block sizes, not by images x labels (125,000 x 7,586 for Open Images): no
score matrix is ever held whole. F1@K is pooled counts, summed over chunks of images; AP is per label, computed
over blocks of labels with every image's score; both equal the values of the whole matrix exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ovml.pipeline import atomic
from ovml.pipeline.adapter import Adapter, AdapterConfig, fuse_local, load_adapter, pool_tokens
from ovml.pipeline.artifacts import ADAPTER, LABEL_CACHE, eval_dir, image_cache
from ovml.pipeline.clip import check_run_clip, load_clip
from ovml.pipeline.datasets import DATASETS, Protocol, open_vocabulary_protocol
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.image_cache import read_dataset_info, read_image_cache, read_patches
from ovml.pipeline.label_embeddings import label_embeddings
from ovml.pipeline.label_sets import LabelSets
from ovml.pipeline.metrics import (
    MicroPR,
    average_precision,
    column_blocks,
    f1_counts,
    f1_from_counts,
    mean_average_precision,
    top_k_mask,
)
from ovml.pipeline.probe import fit_ceiling
from ovml.pipeline.report import eval_markdown, plot_ap_scatter, plot_pr_curves
from ovml.pipeline.rundir import RunDir, StageOutcome, check_same_clip, files_under, run_stage
from ovml.pipeline.settings import EvalConfig, as_params, check_settings

IMAGES_PER_CHUNK = 4096  # scores of [chunk, labels] at a time: 124 MB at 7,586 labels
LABELS_PER_BLOCK = 256  # scores of [images, block] at a time for AP: 128 MB at 125,000 images
TOP_SCORES = 50  # labels per image and method that scores.parquet keeps unless --save-scores all


def check(cfg: EvalConfig) -> None:
    """The settings and the CLIP spec, before anything runs (`ovml run` checks every stage's before the first)."""
    check_settings(cfg)
    if cfg.dataset not in DATASETS:
        raise OvmlError(f"unknown dataset '{cfg.dataset}'; choose one of: {', '.join(DATASETS)}")
    check_run_clip(cfg.run_dir, cfg.clip, cfg.device)


def evaluate(cfg: EvalConfig) -> StageOutcome:
    check(cfg)
    run_dir = RunDir(cfg.run_dir)
    cfg = replace(cfg, clip=run_dir.clip(cfg.clip))
    cache = image_cache(cfg.dataset)
    if not (run_dir / cache / "dataset.json").is_file():
        raise OvmlError(f"{run_dir / cache} holds no image cache; run `ovml embed-images --dataset {cfg.dataset} "
                        f"--root DIR --run-dir {run_dir.path}` first")
    run_dir.require(ADAPTER, produced_by="train_adapter")
    inputs = files_under(run_dir.path, [cache, ADAPTER])
    run_dir.verified_hashes(inputs)  # before anything is read from them (run_stage checks them again, locked)
    info = read_dataset_info(run_dir / cache)
    if not info.get("images"):
        raise OvmlError(f"{run_dir / cache} holds no image (all {info.get('failures', 0)} failed to read or the "
                        f"dataset lists none); fix the images under --root and re-run `ovml embed-images --force`")
    check_same_clip(info["clip"], cfg.clip, run_dir / cache)
    caches = [cache]
    if cfg.ceiling is not None:
        caches.append(_check_ceiling_cache(run_dir, cfg))
    params = as_params(cfg)
    if cfg.ceiling is None:  # reports made before --ceiling existed keep their fingerprint
        del params["ceiling"]
    output = eval_dir(cfg.dataset)
    return run_stage(
        run_dir, f"eval/{cfg.dataset}", params=params,
        inputs=files_under(run_dir.path, [*caches, ADAPTER]), outputs=[output],
        body=lambda out, resume: _evaluate(cfg, run_dir, run_dir / cache, out / output),
        force=cfg.force, models={"clip": cfg.clip},
    )


def _check_ceiling_cache(run_dir: RunDir, cfg: EvalConfig) -> str:
    """--ceiling names a labelled image cache of this run dir, embedded by the same CLIP, that is not the one
    evaluated (the ceiling must never see the test images' labels)."""
    cache = image_cache(cfg.ceiling)
    if cfg.ceiling == cfg.dataset or not (run_dir / cache / "dataset.json").is_file():
        raise OvmlError(f"--ceiling {cfg.ceiling}: {run_dir / cache} holds no other image cache; embed labelled "
                        f"training images first, e.g. `ovml embed-images --dataset {cfg.dataset} --split train`")
    run_dir.verified_hashes(files_under(run_dir.path, [cache]))  # before anything is read from it
    check_same_clip(read_dataset_info(run_dir / cache).get("clip"), cfg.clip, run_dir / cache)
    return cache


def _ceiling_scorer(cache: Path, images: torch.Tensor, score_labels: list[str]) -> tuple[Scorer, dict[str, Any]]:
    """A linear probe trained with the labels of another cache's images (scores [x, 1] @ [weight, bias]), and
    what the report says of it."""
    vectors, items, _ = read_image_cache(cache)
    positives, _ = ground_truth(items, score_labels).dense(np.arange(len(items)), np.arange(len(score_labels)))
    missing = [label for label, n in zip(score_labels, positives.sum(axis=0), strict=True) if n == 0]
    if missing:
        raise OvmlError(f"--ceiling: {cache} has no image of {', '.join(missing[:5])}"
                        f"{' and more' if len(missing) > 5 else ''}; the ceiling needs every evaluated label")
    probe = fit_ceiling(vectors, positives)
    with_one = torch.cat([images, torch.ones(len(images), 1)], dim=1)
    weights = torch.from_numpy(np.concatenate([probe.weight, probe.bias[:, None]], axis=1))
    about = {"cache": cache.name, "images": len(items), "weight_decay": probe.weight_decay}
    return Scorer(with_one, weights, lambda h, w: h @ w.T), about


def _adapter_summary(config: AdapterConfig) -> dict[str, Any]:
    """The adapter's config for the report, its vocabulary shown by size (it can hold thousands of labels)."""
    return {**asdict(config), "vocabulary": {"size": len(config.vocabulary)}}


def _evaluate(cfg: EvalConfig, run_dir: RunDir, cache: Path, out: Path) -> dict[str, Any]:
    vectors, items, info = read_image_cache(cache)
    encoder = load_clip(cfg.clip, cfg.device)
    adapter, adapter_config = load_adapter(run_dir / ADAPTER, cfg.clip, encoder.dim)
    protocols = _protocols(cfg.dataset, info, adapter_config.vocabulary)
    score_labels = _score_labels(protocols)
    # Zero-shot CLIP is defined with the prompt pool; the adapter scores against label embeddings made the
    # way its training labels were (its label_templates), so train and test labels are embedded alike.
    zero_shot_emb = label_embeddings(encoder, score_labels, "pool", cache_dir=run_dir / LABEL_CACHE)
    adapter_emb = label_embeddings(encoder, score_labels, adapter_config.label_templates,
                                   cache_dir=run_dir / LABEL_CACHE)
    images = torch.from_numpy(vectors)
    patches = read_patches(cache)
    if patches is not None and len(patches) != len(items):
        raise OvmlError(f"{cache} is inconsistent ({len(items)} items, {len(patches)} patch rows); re-run "
                        "`ovml embed-images --local --force`")
    query = adapter_config.head == "query"
    if query and patches is None:
        raise OvmlError(f"the adapter has a query head, which attends over image patches, and {cache} has none; "
                        f"re-run `ovml embed-images --local --force --dataset {cfg.dataset}`")
    # the query head's features are its queries' [images, queries, d], computed once and scored against any labels
    scorers = {"adapter": Scorer(adapter.all_query_features(images, patches, np.arange(len(images))),
                                 torch.from_numpy(adapter_emb), adapter.query_logits) if query else
               Scorer(adapter.all_features(images), torch.from_numpy(adapter_emb), adapter.logits),
               "zero-shot": Scorer(images, torch.from_numpy(zero_shot_emb), lambda h, w: h @ w.T)}
    if patches is not None:
        for method, patch_scores in _patch_pooling(adapter, cfg.local_top_k).items():
            if query and method == "adapter":  # the query head already scores the patches
                continue
            scorers[f"{method}+local"] = LocalScorer(scorers[method], patches, np.arange(len(patches)), patch_scores,
                                                     cfg.local_weight)
    ceiling = None
    if cfg.ceiling is not None:
        scorers["ceiling"], ceiling = _ceiling_scorer(run_dir / image_cache(cfg.ceiling), images, score_labels)
    truth = ground_truth(items, score_labels)
    column = {label: i for i, label in enumerate(score_labels)}

    report: dict[str, Any] = {
        "dataset": cfg.dataset, "clip": cfg.clip, "random_weights": bool(encoder.random_weights),
        "model": encoder.description,
        "images": len(items), "failures": int(info.get("failures", 0)),
        "adapter": _adapter_summary(adapter_config), "protocols": {},
    }
    if ceiling is not None:
        report["ceiling"] = ceiling
    if patches is not None:
        head = adapter_config.local_pooling is not None
        report["local"] = {"weight": cfg.local_weight, "patches": int(patches.shape[1]), "local_head": head,
                           "pooling": adapter_config.local_pooling if head else "top-k",
                           "top_k": adapter_config.local_top_k if head else cfg.local_top_k}
    selections = []
    for protocol, labels in protocols:
        cols = np.array([column[label] for label in labels])
        rows = _protocol_rows(truth, cols, len(items), protocol.images_with_a_positive_only)
        selections.append(Selection(protocol, labels, cols, rows))
    with _scores_writer(out / "scores.parquet", items["image_id"].combine_chunks(), score_labels,
                        cfg.save_scores) as write_scores:
        by_method = {method: _score_method(method, scorer, truth, selections, write_scores)
                     for method, scorer in scorers.items()}
    per_label = []
    for i, (protocol, labels) in enumerate(protocols):
        rows = selections[i].rows
        results = {method: by_method[method][i] for method in scorers}
        ap = {method: result.ap for method, result in results.items()}
        plots = {"ap": f"ap_{protocol.name}.png", "pr": f"pr_{protocol.name}.png"}
        title = f"{cfg.dataset} {protocol.name}"
        plot_ap_scatter(out / plots["ap"], ap["adapter"], ap["zero-shot"], f"{title}: AP per label")
        plot_pr_curves(out / plots["pr"], {m: r.curve for m, r in results.items()}, f"{title}: micro precision-recall")
        report["protocols"][protocol.name] = {
            "labels": labels, "ks": list(protocol.ks), "images": len(rows),
            "images_with_a_positive_only": protocol.images_with_a_positive_only,
            "labels_with_positives": int((~np.isnan(ap["adapter"])).sum()),
            "metrics": {m: {k: _json_float(v) for k, v in r.metrics.items()} for m, r in results.items()},
            "plots": plots,
        }
        per_label.append(pa.table({
            "protocol": pa.array([protocol.name] * len(labels), pa.string()),
            "label": pa.array(labels, pa.string()),
            "positives": pa.array(results["adapter"].positives, pa.int64()),
            "ap_adapter": pa.array(ap["adapter"], pa.float64(), from_pandas=True),
            "ap_zero_shot": pa.array(ap["zero-shot"], pa.float64(), from_pandas=True),
        }))

    atomic.write_parquet(out / "per_label.parquet", pa.concat_tables(per_label))
    atomic.write_json(out / "report.json", report)
    atomic.write_text(out / "report.md", eval_markdown(report))
    return _summary(report, out)


@dataclass
class Scorer:
    """One method's scores for any rows x label columns, computed on demand: never held as [images, labels]."""

    features: torch.Tensor  # [images, d]: the image vectors, or the adapter's features of them ([images, q, d])
    label_emb: torch.Tensor  # [labels, d] in score-label order
    logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    @torch.inference_mode()
    def scores(self, rows: np.ndarray | None, columns: np.ndarray) -> np.ndarray:
        """[rows, columns] scores (rows None: every image)."""
        features = self.features if rows is None else self.features[torch.from_numpy(rows)]
        return self.logits(features, self.label_emb[torch.from_numpy(columns)]).float().numpy()

    @property
    def images(self) -> int:
        return len(self.features)

    @property
    def labels(self) -> int:
        return len(self.label_emb)

    def of_images(self, rows: np.ndarray) -> Scorer:
        return Scorer(self.features[torch.from_numpy(rows)], self.label_emb, self.logits)


IMAGES_PER_PATCH_BATCH = 64  # patch scores of [batch, patches, labels] at a time


def _patch_pooling(adapter: Adapter, top_k: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """How each method turns patch features [n, patches, d] into label scores [n, labels].

    An adapter with a local head scores patches with it and pools them as it pooled caption tokens in training;
    zero-shot then pools its patch cosines the same way (at the adapter's logit scale, divided back), so the
    `+local` rows differ by the training alone. Without a local head both take the mean of the `top_k` best
    patch scores, the adapter scoring patches with its global head."""
    config = adapter.config
    if config.local_pooling is not None:
        def zero_shot(p: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return pool_tokens(config.scale * p @ w.T, None, config.local_pooling, config.local_top_k) / config.scale
        return {"adapter": adapter.patch_logits, "zero-shot": zero_shot}
    return {"adapter": lambda p, w: pool_tokens(adapter(p, w), None, "top-k", top_k),
            "zero-shot": lambda p, w: pool_tokens(p @ w.T, None, "top-k", top_k)}


@dataclass
class LocalScorer:
    """A global method fused with the same method on patch features (the `+local` rows):
    (1 - weight) * global score + weight * the pooled patch score (`_patch_pooling`)."""

    global_scorer: Scorer
    patches: np.ndarray  # [cached images, patches, d] float16, memory-mapped
    patch_rows: np.ndarray  # the cached row of each of this scorer's images
    patch_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # [n, patches, d], [labels, d] -> [n, labels]
    weight: float

    @property
    def images(self) -> int:
        return len(self.patch_rows)

    @property
    def labels(self) -> int:
        return self.global_scorer.labels

    @torch.inference_mode()
    def scores(self, rows: np.ndarray | None, columns: np.ndarray) -> np.ndarray:
        global_scores = self.global_scorer.scores(rows, columns)
        cached = self.patch_rows if rows is None else self.patch_rows[rows]
        label_emb = self.global_scorer.label_emb[torch.from_numpy(columns)]
        local = np.empty_like(global_scores)
        for start in range(0, len(cached), IMAGES_PER_PATCH_BATCH):
            batch = torch.from_numpy(np.asarray(self.patches[cached[start:start + IMAGES_PER_PATCH_BATCH]],
                                                dtype=np.float32))
            local[start:start + len(batch)] = self.patch_scores(batch, label_emb).float().numpy()
        return fuse_local(global_scores, local, self.weight)

    def of_images(self, rows: np.ndarray) -> LocalScorer:
        return LocalScorer(self.global_scorer.of_images(rows), self.patches, self.patch_rows[rows], self.patch_scores,
                           self.weight)


@dataclass
class Selection:
    """What one protocol scores: its labels (score columns) and its images (rows)."""

    protocol: Protocol
    labels: list[str]
    cols: np.ndarray
    rows: np.ndarray


@dataclass
class MethodResult:
    metrics: dict[str, float]  # mAP, then F1@K, P@K, R@K for each K
    ap: np.ndarray  # per label, NaN without a positive
    positives: np.ndarray  # per label: positives (not ignored) among the protocol's images
    curve: tuple[np.ndarray, np.ndarray]  # micro precision, recall


def _protocol_rows(truth: GroundTruth, cols: np.ndarray, n_images: int, with_a_positive_only: bool) -> np.ndarray:
    """The images a protocol scores: all, or (zero-shot protocols) those with a positive among its labels."""
    if not with_a_positive_only:
        return np.arange(n_images)
    kept = []
    for start in range(0, n_images, IMAGES_PER_CHUNK):
        pos, ign = truth.dense(np.arange(start, min(start + IMAGES_PER_CHUNK, n_images)), cols)
        kept.append(start + np.flatnonzero((pos & ~ign).any(axis=1)))
    return np.concatenate(kept)


def _score_method(method: str, scorer: Scorer | LocalScorer, truth: GroundTruth, selections: list[Selection],
                  write_scores: Callable[[str, np.ndarray, np.ndarray], None]) -> list[MethodResult]:
    """One method on every protocol. One pass over chunks of images scores every label once: scores.parquet's
    rows, and each protocol's F1@K (pooled counts add up) and score range. Then, per protocol, AP and the PR
    curve over blocks of labels, each block scored for all the protocol's images."""
    n_images = scorer.images
    all_cols = np.arange(scorer.labels)
    members = []
    for selection in selections:
        member = np.zeros(n_images, dtype=bool)
        member[selection.rows] = True
        members.append(member)
    counts = [{k: np.zeros(3, dtype=np.int64) for k in sel.protocol.ks} for sel in selections]
    ranges = [[np.inf, -np.inf] for _ in selections]
    for start in range(0, n_images, IMAGES_PER_CHUNK):
        rows = np.arange(start, min(start + IMAGES_PER_CHUNK, n_images))
        chunk_scores = scorer.scores(rows, all_cols)
        write_scores(method, rows, chunk_scores)
        for selection, member, count, score_range in zip(selections, members, counts, ranges, strict=True):
            keep = member[rows]
            scores = chunk_scores[np.ix_(keep, selection.cols)]
            pos, ign = truth.dense(rows[keep], selection.cols)
            for k in count:
                count[k] += f1_counts(scores, pos, k, ign)
            valid = scores[~ign]
            if valid.size:
                score_range[:] = min(score_range[0], float(valid.min())), max(score_range[1], float(valid.max()))
    results = []
    for selection, count, score_range in zip(selections, counts, ranges, strict=True):
        curve = MicroPR(*score_range)
        ap, positives = [], []
        protocol_images = scorer.of_images(selection.rows)
        for block in column_blocks(len(selection.cols), LABELS_PER_BLOCK):
            scores = protocol_images.scores(None, selection.cols[block])
            pos, ign = truth.dense(selection.rows, selection.cols[block])
            ap.append(average_precision(scores, pos, ign))
            curve.add(scores, pos, ign)
            positives.append((pos & ~ign).sum(axis=0))
        ap_all = np.concatenate(ap)
        metrics = {"mAP": mean_average_precision(ap_all)}
        for k in selection.protocol.ks:
            metrics.update(f1_from_counts(count[k], k))
        results.append(MethodResult(metrics, ap_all, np.concatenate(positives), curve.curve()))
    return results


def _protocols(dataset: str, info: dict[str, Any], vocabulary: list[str]) -> list[tuple[Protocol, list[str]]]:
    """The dataset's protocols whose label split the cache has (Open Images may lack the full class list),
    plus `unseen` where the dataset has no published split and the adapter was not trained on every label."""
    splits = {"all": info["labels"], **info.get("splits", {})}
    found = [(p, list(splits[p.split])) for p in DATASETS[dataset].protocols if splits.get(p.split)]
    if not found:
        raise OvmlError(f"{dataset}'s image cache lists no labels; re-run `ovml embed-images --force`")
    if not any(p.split == "unseen" for p, _ in found):
        known = {label.casefold() for label in vocabulary}
        unseen = [label for label in splits["all"] if label.casefold() not in known]
        if unseen and len(unseen) < len(splits["all"]):
            all_ks = next(p.ks for p, _ in found if p.split == "all")
            found.append((open_vocabulary_protocol(all_ks, len(unseen)), unseen))
    return found


def _score_labels(protocols: list[tuple[Protocol, list[str]]]) -> list[str]:
    """The largest protocol's labels, then any label only a smaller protocol has: one score column each."""
    ordered = sorted(protocols, key=lambda pair: -len(pair[1]))
    return list(dict.fromkeys(label for _, protocol_labels in ordered for label in protocol_labels))


@dataclass(frozen=True)
class GroundTruth:
    """Each image's positive, negative and ignored labels, sparse; dense only for the rows x columns asked for."""

    positives: LabelSets
    negatives: LabelSets
    ignored: LabelSets
    has_negatives: np.ndarray  # [images] bool: the row lists its negatives explicitly (Open Images)

    def dense(self, rows: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positives, ignored) [rows, columns]. A row with an explicit negatives list leaves every label in none
        of its lists unknown, i.e. ignored."""
        positives = self.positives.dense(rows, columns)
        unknown = self.has_negatives[rows, None] & ~positives & ~self.negatives.dense(rows, columns)
        return positives, self.ignored.dense(rows, columns) | unknown


def ground_truth(items: pa.Table, labels: list[str]) -> GroundTruth:
    """items.parquet's label lists against `labels` (names outside it are left out), without a per-row loop."""
    marks = {name: LabelSets.from_lists(items[name], labels)[0] for name in ("positives", "negatives", "ignored")}
    has_negatives = pc.is_valid(items["negatives"]).to_numpy(zero_copy_only=False)
    return GroundTruth(marks["positives"], marks["negatives"], marks["ignored"], has_negatives)


SCORES_SCHEMAS = {
    "top": pa.schema([("image_id", pa.string()), ("method", pa.string()), ("labels", pa.list_(pa.string())),
                      ("scores", pa.list_(pa.float32()))]),
    "all": pa.schema([("image_id", pa.string()), ("method", pa.string()), ("scores", pa.list_(pa.float32()))]),
}


@contextlib.contextmanager
def _scores_writer(path: Path, image_ids: pa.Array, score_labels: list[str],
                   keep: str) -> Iterator[Callable[[str, np.ndarray, np.ndarray], None]]:
    """scores.parquet, one row per image and method, written chunk by chunk: with keep='top' each image's
    TOP_SCORES best labels, best first (ties: the earlier score label); with 'all' every score in score-label
    order (the largest protocol's)."""
    names = pa.array(score_labels, pa.string())

    def write(method: str, rows: np.ndarray, scores: np.ndarray) -> None:
        table = {"image_id": image_ids.take(pa.array(rows)), "method": pa.array([method] * len(rows), pa.string())}
        if keep == "top":
            k = min(TOP_SCORES, len(score_labels))
            best = np.nonzero(top_k_mask(scores, k))[1].reshape(len(rows), k)
            best = np.take_along_axis(best, np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1,
                                                       kind="stable"), axis=1)
            table["labels"] = _lists(names.take(pa.array(best.ravel())), k)
            scores = np.take_along_axis(scores, best, axis=1)
        table["scores"] = _lists(pa.array(scores.ravel(), pa.float32()), scores.shape[1])
        writer.write_table(pa.table(table, schema=SCORES_SCHEMAS[keep]))

    with atomic.atomic_path(path) as tmp, pq.ParquetWriter(tmp, SCORES_SCHEMAS[keep]) as writer:
        yield write


def _lists(values: pa.Array, width: int) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, width, dtype=np.int32)), values)


def _json_float(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 6)


def _summary(report: dict[str, Any], out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {"dataset": report["dataset"], "images": report["images"],
                               "failures": report["failures"], "report": str(out / "report.md")}
    if report["random_weights"]:
        summary["note"] = "CLIP weights were random: cost only, never accuracy"
    if report["model"]:
        summary["model"] = report["model"]
    for name, protocol in report["protocols"].items():
        for metric in ["mAP"] + [f"F1@{k}" for k in protocol["ks"]]:
            summary[f"{name} {metric}"] = {m: values[metric] for m, values in protocol["metrics"].items()}
    return summary
