"""eval: adapter vs zero-shot CLIP on a cached dataset, with the published protocols -> eval/<dataset>/.

The command is `ovml eval`; the module is `evaluate` (`eval` is a Python builtin) and its config EvalConfig.
Both methods score the same cached image vectors, so the report compares the adapter and zero-shot CLIP and
nothing else. Each dataset's protocols (label split, K values, which images count) are declared once, in
pipeline/datasets.py DATASETS: NUS-WIDE ZSL/GZSL with F1@3/5, Open Images ZSL/GZSL with F1@10/20, the others
all labels with F1@3. In the zero-shot protocols an image counts only if it has a positive among the
protocol's labels, as in the papers; elsewhere every image counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ovml.pipeline import atomic
from ovml.pipeline.adapter import AdapterConfig, load_adapter
from ovml.pipeline.artifacts import ADAPTER, LABEL_CACHE, eval_dir, image_cache
from ovml.pipeline.clip import load_clip
from ovml.pipeline.config import as_params, not_fingerprinted
from ovml.pipeline.datasets import DATASETS, Protocol, open_vocabulary_protocol
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.image_cache import read_dataset_info, read_image_cache
from ovml.pipeline.label_embeddings import label_embeddings
from ovml.pipeline.metrics import evaluate_scores, micro_pr_curve
from ovml.pipeline.report import METHODS, eval_markdown, plot_ap_scatter, plot_pr_curves
from ovml.pipeline.rundir import RunDir, StageOutcome, files_under, run_stage
from ovml.pipeline.vocabulary import multi_hot


@dataclass
class EvalConfig:
    run_dir: Path = not_fingerprinted(Path("runs/default"))
    clip: str = "ViT-B-16:openai"
    device: str = not_fingerprinted("auto")
    dataset: str = "folder"
    force: bool = not_fingerprinted(False)


def evaluate(cfg: EvalConfig) -> StageOutcome:
    if cfg.dataset not in DATASETS:
        raise OvmlError(f"unknown dataset '{cfg.dataset}'; choose one of: {', '.join(DATASETS)}")
    run_dir = RunDir(cfg.run_dir)
    cache = image_cache(cfg.dataset)
    if not (run_dir / cache / "dataset.json").is_file():
        raise OvmlError(f"{run_dir / cache} holds no image cache; run `ovml embed-images --dataset {cfg.dataset} "
                        f"--root DIR --run-dir {run_dir.path}` first")
    info = read_dataset_info(run_dir / cache)
    if not info.get("images"):
        raise OvmlError(f"{run_dir / cache} holds no image (all {info.get('failures', 0)} failed to read or the "
                        f"dataset lists none); fix the images under --root and re-run `ovml embed-images --force`")
    embedded_with = info["clip"]
    if embedded_with != cfg.clip:
        raise OvmlError(f"{run_dir / cache} was embedded with '{embedded_with}', not '{cfg.clip}'; pass --clip "
                        f"{embedded_with} or re-run embed-images with --clip {cfg.clip}")
    run_dir.require(ADAPTER, produced_by="train_adapter")
    output = eval_dir(cfg.dataset)
    return run_stage(
        run_dir, f"eval/{cfg.dataset}", params=as_params(cfg),
        inputs=files_under(run_dir.path, [cache, ADAPTER]), outputs=[output],
        body=lambda out, resume: _evaluate(cfg, run_dir, run_dir / cache, out / output),
        force=cfg.force, models={"clip": cfg.clip},
    )


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
    scores = {"adapter": adapter.score(torch.from_numpy(vectors), torch.from_numpy(adapter_emb)),
              "zero-shot": vectors @ zero_shot_emb.T}
    positives, ignored = ground_truth(items, score_labels)
    column = {label: i for i, label in enumerate(score_labels)}

    report: dict[str, Any] = {
        "dataset": cfg.dataset, "clip": cfg.clip, "random_weights": bool(encoder.random_weights),
        "model": encoder.description,
        "images": len(items), "failures": int(info.get("failures", 0)),
        "adapter": _adapter_summary(adapter_config), "protocols": {},
    }
    per_label = []
    for protocol, labels in protocols:
        cols = np.array([column[label] for label in labels])
        pos, ign = positives[:, cols], ignored[:, cols]
        rows = np.flatnonzero((pos & ~ign).any(axis=1)) if protocol.images_with_a_positive_only \
            else np.arange(len(items))
        pos, ign = pos[rows], ign[rows]
        metrics, ap, curves = {}, {}, {}
        for method in METHODS:
            method_scores = scores[method][np.ix_(rows, cols)]
            metrics[method], ap[method] = evaluate_scores(method_scores, pos, ign, protocol.ks)
            curves[method] = micro_pr_curve(method_scores, pos, ign)
        plots = {"ap": f"ap_{protocol.name}.png", "pr": f"pr_{protocol.name}.png"}
        title = f"{cfg.dataset} {protocol.name}"
        plot_ap_scatter(out / plots["ap"], ap["adapter"], ap["zero-shot"], f"{title}: AP per label")
        plot_pr_curves(out / plots["pr"], curves, f"{title}: micro precision-recall")
        report["protocols"][protocol.name] = {
            "labels": labels, "ks": list(protocol.ks), "images": len(rows),
            "images_with_a_positive_only": protocol.images_with_a_positive_only,
            "labels_with_positives": int((~np.isnan(ap["adapter"])).sum()),
            "metrics": {m: {k: _json_float(v) for k, v in values.items()} for m, values in metrics.items()},
            "plots": plots,
        }
        per_label.append(pa.table({
            "protocol": pa.array([protocol.name] * len(labels), pa.string()),
            "label": pa.array(labels, pa.string()),
            "positives": pa.array((pos & ~ign).sum(axis=0), pa.int64()),
            "ap_adapter": pa.array(ap["adapter"], pa.float64(), from_pandas=True),
            "ap_zero_shot": pa.array(ap["zero-shot"], pa.float64(), from_pandas=True),
        }))

    atomic.write_parquet(out / "per_label.parquet", pa.concat_tables(per_label))
    atomic.write_parquet(out / "scores.parquet", _scores_table(items["image_id"], scores))
    atomic.write_json(out / "report.json", report)
    atomic.write_text(out / "report.md", eval_markdown(report))
    return _summary(report, out)


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


def ground_truth(items: pa.Table, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(positives, ignored) [n_items, n_labels] from items.parquet's label lists, without a per-row loop.

    A row with an explicit negatives list leaves every label in none of its lists unknown, i.e. ignored.
    """
    marks = {name: multi_hot(items[name], labels)[0] for name in ("positives", "negatives", "ignored")}
    has_negatives = pc.is_valid(items["negatives"]).to_numpy(zero_copy_only=False)
    unknown = has_negatives[:, None] & ~marks["positives"] & ~marks["negatives"]
    return marks["positives"], marks["ignored"] | unknown


def _scores_table(image_ids: pa.ChunkedArray, scores: dict[str, np.ndarray]) -> pa.Table:
    """One row per image and method; scores in score-label order (the largest protocol's)."""
    n, n_labels = scores[METHODS[0]].shape
    values = np.concatenate([scores[m].astype(np.float32).ravel() for m in METHODS])
    offsets = pa.array(np.arange(0, len(values) + 1, n_labels, dtype=np.int64), pa.int64())
    return pa.table({
        "image_id": pa.concat_arrays([image_ids.combine_chunks()] * len(METHODS)),
        "method": pa.array([m for m in METHODS for _ in range(n)], pa.string()),
        "scores": pa.LargeListArray.from_arrays(offsets, pa.array(values, pa.float32())).cast(
            pa.list_(pa.float32())),
    })


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
            summary[f"{name} {metric}"] = {m: protocol["metrics"][m][metric] for m in METHODS}
    return summary
