"""How results look to people: the eval report in Markdown, its PNG plots, and predict's table or JSON."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from ovml.pipeline import atomic
from ovml.pipeline.probe import headroom_recovered

RANDOM_WEIGHTS_NOTE = "CLIP weights were random: these numbers measure cost only, never accuracy."


def json_line(value: Any) -> str:
    """One line of strict JSON for --json: NaN and infinity have no JSON spelling, so they are written as null
    (Python's json would print `NaN`, which JSON parsers reject)."""
    return json.dumps(_finite(value), default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def eval_markdown(report: dict[str, Any]) -> str:
    """report.json as a page: the headline tables, then plots, data counts, CLIP spec and adapter config."""
    lines = [eval_tables(report), ""]
    if report.get("local"):
        local = report["local"]
        pooled = f"the mean of its {local['top_k']} best" if local["pooling"] == "top-k" else "the softmax-weighted"
        scored = ("the adapter's local head (train-adapter --local)" if local.get("local_head") else
                  "the method's own global scoring")
        lines += [f"`+local` rows: (1 − {local['weight']}) × the method's global score + {local['weight']} × "
                  f"{pooled} patch scores ({local['patches']} patches per image, embed-images --local; patches "
                  f"scored by {scored}).", ""]
    for name, protocol in report["protocols"].items():
        lines += [f"![per-label AP, {name}]({protocol['plots']['ap']}) "
                  f"![precision-recall, {name}]({protocol['plots']['pr']})", ""]
    lines += ["## Data", "",
              f"- images scored: {report['images']}",
              f"- images that could not be read (skipped by embed-images): {report['failures']}"]
    for name, protocol in report["protocols"].items():
        rule = " (only images with a positive among its labels, as in the papers)" \
            if protocol["images_with_a_positive_only"] else ""
        lines.append(f"- {name}: {protocol['images']} images scored{rule}; "
                     f"{protocol['labels_with_positives']} of {len(protocol['labels'])} labels have a positive")
    lines += ["", "## CLIP", "", f"- spec: `{report['clip']}`", f"- random weights: {report['random_weights']}",
              "", "## Adapter", "", "```json", json.dumps(report["adapter"], indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def eval_tables(report: dict[str, Any]) -> str:
    """The headline of a report: the random-weights warning, then a method x metric table per protocol."""
    lines = [f"> **{RANDOM_WEIGHTS_NOTE}**", ""] if report["random_weights"] else []
    if report.get("model"):
        lines += [f"> **Model: {report['model']}.**", ""]
    lines.append(f"# ovml eval: {report['dataset']}")
    for name, protocol in report["protocols"].items():
        columns = list(protocol["metrics"]["adapter"])
        lines += ["", f"## {name} ({len(protocol['labels'])} labels, {protocol['images']} images), in %", "",
                  "| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for method, values in protocol["metrics"].items():  # adapter, zero-shot, then any +local rows
            lines.append(f"| {method} | " + " | ".join(_percent(values[c]) for c in columns) + " |")
        if "ceiling" in protocol["metrics"]:
            lines += ["", _headroom_line(protocol["metrics"])]
    if report.get("ceiling"):
        ceiling = report["ceiling"]
        lines += ["", f"ceiling: a linear probe trained WITH the labels of {ceiling['images']} images of the "
                  f"`{ceiling['cache']}` cache (labels the adapter never sees): the reference for what a head on "
                  "these image features can reach."]
    return "\n".join(lines)


def _headroom_line(metrics: dict[str, dict[str, float | None]]) -> str:
    """The share of the zero-shot-to-ceiling gap in mAP that the adapter recovers."""
    values = [metrics[m]["mAP"] for m in ("adapter", "zero-shot", "ceiling")]
    share = None if None in values else headroom_recovered(*values)
    shown = "n/a (the ceiling is not above zero-shot)" if share is None else f"{100 * share:.1f} %"
    return f"headroom recovered by the adapter, (adapter - zero-shot) / (ceiling - zero-shot) in mAP: {shown}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{100 * value:.2f}"


def plot_ap_scatter(path: Path, ap_adapter: np.ndarray, ap_zero_shot: np.ndarray, title: str) -> None:
    """One dot per label: above the diagonal the adapter ranks that label better than zero-shot CLIP."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    defined = ~(np.isnan(ap_adapter) | np.isnan(ap_zero_shot))
    ax.scatter(ap_zero_shot[defined], ap_adapter[defined], s=8, alpha=0.6)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="AP zero-shot CLIP", ylabel="AP adapter", title=title)
    _save(fig, path)


def plot_pr_curves(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """Micro-averaged precision-recall over every image-label pair, one line per method."""
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    for method, (precision, recall) in curves.items():
        ax.plot(recall, precision, label=method)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="recall", ylabel="precision", title=title)
    ax.legend()
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    atomic.write_bytes(path, buffer.getvalue())


def print_predictions(predictions: list[dict[str, Any]], json_out: bool, console: Console) -> None:
    """predict's output: one JSON line, or a table with each image's labels best first."""
    if json_out:
        print(json_line(predictions))
        return
    if not predictions:
        return
    table = Table(title=f"ovml predict ({predictions[0]['method']})")
    table.add_column("image", overflow="fold")
    table.add_column("label")
    table.add_column("score", justify="right")
    for prediction in predictions:
        for rank, item in enumerate(prediction["labels"]):
            table.add_row(prediction["image"] if rank == 0 else "", item["label"], f"{item['score']:.4f}",
                          end_section=rank == len(prediction["labels"]) - 1)
    if predictions[0]["random_weights"]:
        table.caption = "CLIP weights are random: these scores are meaningless."
    console.print(table)


def print_search(found: dict[str, Any], json_out: bool, console: Console) -> None:
    """search's output: one JSON line, or a table of the images best first."""
    if json_out:
        print(json_line(found))
        return
    table = Table(title=f"ovml search {found['query']!r} in {found['dataset']} ({found['method']}, {found['index']})")
    table.add_column("rank", justify="right")
    table.add_column("image", overflow="fold")
    table.add_column("score", justify="right")
    for item in found["results"]:
        table.add_row(str(item["rank"]), item["path"], f"{item['score']:.4f}")
    if found["random_weights"]:
        table.caption = "CLIP weights are random: these scores are meaningless."
    console.print(table)
