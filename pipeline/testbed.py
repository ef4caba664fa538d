"""The testbed CLIP: a small open_clip model trained here, so that accuracy can be measured offline.

No real CLIP weights exist on this machine; random weights measure cost, never accuracy. The testbed is
open_clip's own CLIP class (architecture `ovml-testbed` in clip_configs) trained with open_clip's own
contrastive loss on pictures made from the Fashion-MNIST **train** split only (the t10k files stay for
evaluation): K x K mosaics holding 1..K^2 items with blank cells allowed, and single items. Each picture's
caption comes from a grammar written for this project (prompts/testbed_grammar.json) and names exactly its
items, with varied templates, synonyms, counts and filler words. Contrastive training gives the model a
real learned modality gap, which is what ovml's noise is about. Its numbers are the testbed's, never CLIP's.

Images go through the model's own eval preprocessing (the one embed-images uses), so training and
evaluation pictures are made alike. Training is deterministic: the same config gives a byte-identical
checkpoint on the same machine and thread count.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from ovml.pipeline.clip import CausalTextTower, checkpoint_metadata, save_checkpoint
from ovml.pipeline.datasets import FASHION_MNIST_CLASSES, read_fashion_mnist_split
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.progress import progress_bar
from ovml.pipeline.rundir import StageOutcome
from ovml.pipeline.settings import TestbedConfig, as_params, check_settings
from ovml.prompts import read_prompt_file

GRAMMAR_FILE = "testbed_grammar.json"
TRAIN_SPLIT = "train"
DESCRIPTION = ("the ovml testbed model: a small CLIP trained here on Fashion-MNIST; its numbers are not "
               "comparable with published CLIP results")


class CaptionGrammar:
    """Captions that name exactly a picture's items (class ids), in varied words."""

    def __init__(self, spec: dict):
        self.names = [spec["classes"][label] for label in FASHION_MNIST_CLASSES]
        self.adjectives = spec["adjectives"]
        self.counts = {int(k): v for k, v in spec["counts"].items()}
        self.joiners = spec["joiners"]
        self.templates = spec["templates"]

    @classmethod
    def load(cls) -> CaptionGrammar:
        return cls(json.loads(read_prompt_file(GRAMMAR_FILE)))

    def caption(self, class_ids: list[int], rng: np.random.Generator) -> str:
        counts = Counter(class_ids)
        order = list(counts)
        rng.shuffle(order)
        phrases = [self._phrase(c, counts[c], rng) for c in order]
        if len(phrases) == 1:
            items = phrases[0]
        else:
            joiner = self.joiners[rng.integers(len(self.joiners))]
            items = ", ".join(phrases[:-1]) + joiner + phrases[-1]
        return self.templates[rng.integers(len(self.templates))].replace("{items}", items)

    def _phrase(self, class_id: int, count: int, rng: np.random.Generator) -> str:
        singular, plural = self.names[class_id][rng.integers(len(self.names[class_id]))]
        adjective = self.adjectives[rng.integers(len(self.adjectives))]
        noun = f"{adjective} {singular if count == 1 else plural}".strip()
        if count == 1:
            return ("an " if noun[0] in "aeiou" else "a ") + noun
        words = self.counts[count]
        return f"{words[rng.integers(len(words))]} {noun}"


class PictureSampler:
    """Training pictures (PIL, as embed-images would read them) with the class ids of their items."""

    def __init__(self, images: np.ndarray, classes: np.ndarray, cfg: TestbedConfig):
        self.images, self.classes, self.cfg = images, classes, cfg

    def sample(self, rng: np.random.Generator) -> tuple[Image.Image, list[int]]:
        cfg = self.cfg
        if rng.random() < cfg.single_fraction:
            index = int(rng.integers(len(self.images)))
            return Image.fromarray(self.images[index]).convert("RGB"), [int(self.classes[index])]
        cells = cfg.mosaic * cfg.mosaic
        filled = rng.random(cells) >= cfg.blank_fraction
        if not filled.any():
            filled[rng.integers(cells)] = True
        members = rng.integers(len(self.images), size=cells)
        side = self.images.shape[1]
        grid = np.zeros((cfg.mosaic * side, cfg.mosaic * side), dtype=np.uint8)
        for cell in np.flatnonzero(filled):
            row, col = divmod(int(cell), cfg.mosaic)
            grid[row * side:(row + 1) * side, col * side:(col + 1) * side] = self.images[members[cell]]
        return Image.fromarray(grid).convert("RGB"), [int(self.classes[m]) for m in members[filled]]


def train_testbed(cfg: TestbedConfig) -> StageOutcome:
    """Train the testbed CLIP into `cfg.out` (safetensors), unless it already holds this recipe."""
    out = Path(cfg.out)
    recipe = as_params(cfg)
    if out.is_file() and checkpoint_metadata(out).get("recipe") == recipe:
        return StageOutcome("train-testbed", "skipped", "up to date", 0.0, {"checkpoint": str(out)})
    _check(cfg)
    _check_out(out)
    images, classes, images_file, _ = read_fashion_mnist_split(Path(cfg.root), TRAIN_SPLIT)
    if len(images) < cfg.train_images:
        raise OvmlError(f"{images_file} has {len(images)} images, fewer than train_images={cfg.train_images}")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model, seconds, loss = _train(cfg, images[:cfg.train_images], classes[:cfg.train_images])
    finally:
        torch.set_num_threads(threads)
    data = f"{images_file.name}[0:{cfg.train_images}] (the t10k files are never read)"
    save_checkpoint(model, out, {"testbed": True, "random_weights": False, "arch": cfg.arch, "recipe": recipe,
                                 "description": DESCRIPTION, "data": data, "final_loss": round(loss, 4)})
    summary = {"checkpoint": str(out), "use it as": f"--clip {cfg.arch}:{out}", "data": data,
               "final loss": round(loss, 4)}
    return StageOutcome("train-testbed", "ran", "trained", seconds, summary)


def _train(cfg: TestbedConfig, images: np.ndarray, classes: np.ndarray) -> tuple[torch.nn.Module, float, float]:
    """open_clip's CLIP and contrastive loss on (picture, grammar caption) batches: (model, seconds, last loss)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    logging.disable(logging.WARNING)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.arch, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    tokenizer = open_clip.get_tokenizer(cfg.arch)
    text_tower = CausalTextTower.of(model)
    grammar = CaptionGrammar.load()
    pictures = PictureSampler(images, classes, cfg)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, cfg))
    model.train()
    t0 = time.perf_counter()
    with progress_bar("steps") as bar:
        task = bar.add_task("training the testbed CLIP", total=cfg.steps)
        for _ in range(cfg.steps):
            batch = [pictures.sample(rng) for _ in range(cfg.batch_size)]
            pixels = torch.stack([preprocess(image) for image, _ in batch])
            tokens = tokenizer([grammar.caption(ids, rng) for _, ids in batch])
            image_features = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
            text_features = torch.nn.functional.normalize(
                text_tower.encode(tokens, text_tower.pool_positions(tokens)), dim=-1)
            loss = loss_fn(image_features, text_features, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            bar.update(task, advance=1, description=f"training the testbed CLIP (loss {loss.item():.3f})")
    return model, time.perf_counter() - t0, loss.item()


def _check(cfg: TestbedConfig) -> None:
    check_settings(cfg)
    if cfg.batch_size < 2:  # a contrastive loss needs a negative in every batch
        raise OvmlError(f"--batch-size must be at least 2 for a contrastive loss, got {cfg.batch_size}")
    if cfg.arch not in open_clip.list_models():
        raise OvmlError(f"unknown CLIP architecture '{cfg.arch}'")


def _check_out(out: Path) -> None:
    """Before minutes of training: the checkpoint's folder exists (or can be made) and takes a new file."""
    try:
        if out.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(out))
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise OvmlError(f"cannot write the checkpoint {out} ({e.strerror}); pass --out PATH in a writable "
                        "folder") from None


def _lr_factor(step: int, cfg: TestbedConfig) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

