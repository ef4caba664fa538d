"""TaI-DPT, the peer the adapter is measured against, re-written for open_clip's text tower (benchmark code).

"Texts as Images in Prompt Tuning for Multi-Label Image Recognition" (Guo et al., CVPR'23; github
guozix/TaI-DPT, trainer `Caption_distill_double`) learns prompts from captions alone, as ovml's adapter does,
but in the text tower's input instead of after it:
- two shared contexts of `n_ctx` token vectors, each put in front of every label name ("X X ... X name.") and
  pushed through the frozen text tower: the **global** prompt is scored against a caption's pooled (EOT)
  embedding, the **local** one against each of its word tokens, aggregated over the tokens with a softmax;
- the loss is the ranking loss of the paper on both streams (ovml's `rank`: the same hinge over every
  positive-negative pair, margin 1, summed over pairs, averaged over captions);
- at test time images stand in for captions: the global image embedding for the pooled one, the patch features
  of `embed-images --local` for the word tokens, and the two scores are averaged (the repository's merge).

The repository's settings are kept: 16 context tokens initialised N(0, 0.02), the class name at the end, a fixed
logit scale of 4, softmax temperatures 50 over caption tokens and 40 over image patches, merge weight 0.5, SGD
with momentum 0.9 and weight decay 5e-4 on a cosine schedule, the best epoch chosen on held-out data. Only the
batch size, epochs and learning rate are set for a few hundred captions (the paper: 512 per batch, 20 epochs
over tens of thousands); the learning rate is chosen on held-out *captions*, never on images.

Every step runs the text tower forwards and backwards over 2 x labels prompts: that is its cost as labels grow.
The captions' own features are computed once (embed-text --local), as their tower is frozen.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ovml.pipeline.clip import CausalTextTower, ClipEncoder
from ovml.pipeline.losses import rank
from ovml.pipeline.metrics import average_precision, mean_average_precision

N_CTX = 16
LOGIT_SCALE = 4.0  # TRAIN.IF_LEARN_SCALE False: the repository's fixed scale
TEXT_TEMPERATURE = 50.0  # spatial_SCALE_text: softmax over a caption's tokens
IMAGE_TEMPERATURE = 40.0  # spatial_SCALE_image: softmax over an image's patches
MERGE = 0.5  # GL_merge_rate: global and local scores averaged


class PromptLearner(torch.nn.Module):
    """The two learnable contexts and the frozen text tower that turns "ctx... name." into label features.

    Shared (not class-specific) contexts, so any label list can be scored, unseen names included."""

    def __init__(self, encoder: ClipEncoder, n_ctx: int = N_CTX, seed: int = 0):
        super().__init__()
        tower = CausalTextTower.of(encoder.model)
        if tower is None or tower.pool_type not in ("argmax", "eos"):
            raise ValueError(f"TaI-DPT needs a causal text tower pooled at its end token; {encoder.spec.arch} "
                             "has another kind")
        self.tower, self.encoder, self.n_ctx = tower, encoder, n_ctx
        for p in encoder.model.parameters():
            p.requires_grad_(False)
        width = tower.tower.token_embedding.embedding_dim
        generator = torch.Generator().manual_seed(seed)
        self.global_ctx = torch.nn.Parameter(0.02 * torch.randn(n_ctx, width, generator=generator))
        self.local_ctx = torch.nn.Parameter(0.02 * torch.randn(n_ctx, width, generator=generator))

    def tokens(self, labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of "X X ... X name." per label (the X's are placeholders for the context) and where each
        is pooled."""
        tokens, _ = self.encoder.tokenize([" ".join(["X"] * self.n_ctx) + f" {name}." for name in labels])
        return tokens, self.tower.pool_positions(tokens)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global, local) label features [L, d], L2-normalised, with gradients to the contexts.

        Both contexts go through the tower in one batch; like ovml's encoder the tower runs only up to the last
        pooled position (nothing after it can change a causal tower's output there)."""
        t = self.tower.tower
        length = int(positions.max()) + 1
        embedded = t.token_embedding(tokens[:, :length])
        prompts = [torch.cat([embedded[:, :1], ctx.expand(len(tokens), -1, -1), embedded[:, 1 + self.n_ctx:]], 1)
                   for ctx in (self.global_ctx, self.local_ctx)]
        x = torch.cat(prompts) + t.positional_embedding[:length]
        x = t.transformer(x, attn_mask=t.attn_mask[:length, :length])
        x = t.ln_final(x[torch.arange(len(x)), positions.repeat(2)])
        if isinstance(t.text_projection, torch.nn.Linear):
            x = t.text_projection(x)
        elif t.text_projection is not None:
            x = x @ t.text_projection
        return F.normalize(x, dim=-1).split(len(tokens))

    def label_features(self, labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(global, local) features of any label list, without gradients (scoring)."""
        with torch.no_grad():
            return self(*self.tokens(labels))


def global_logits(x: torch.Tensor, label_feats: torch.Tensor) -> torch.Tensor:
    """[n, L]: the pooled caption (or global image) embedding against the global prompts."""
    return LOGIT_SCALE * x @ label_feats.T


def local_logits(tokens: torch.Tensor, real: torch.Tensor, label_feats: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """[n, L]: each token's (patch's) logit, weighted by a softmax over the tokens of its cosine x temperature:
    a label is scored by the few tokens most like it (the repository's `logits_local`). `real` [n, T] marks
    tokens that exist (padding is left out)."""
    cos = tokens @ label_feats.T  # [n, T, L]
    weights = torch.softmax((temperature * cos).masked_fill(~real[..., None], -math.inf), dim=1)
    return (LOGIT_SCALE * cos * weights).sum(dim=1)


def loss(global_z: torch.Tensor, local_z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The repository's `double_ranking`: the ranking loss on each stream, summed."""
    return rank(global_z, targets) + rank(local_z, targets)


def merged(global_z: torch.Tensor, local_z: torch.Tensor) -> torch.Tensor:
    return MERGE * global_z + (1 - MERGE) * local_z


@dataclass
class Captions:
    """What TaI-DPT trains on: each caption's pooled embedding, word-token features and labels (text only)."""

    pooled: torch.Tensor  # [n, d] float32, L2-normalised
    words: torch.Tensor  # [n, T, d] float32, zero-padded: the word tokens then the end token (= pooled)
    real: torch.Tensor  # [n, T] bool
    targets: torch.Tensor  # [n, L] bool


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 16
    lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)  # the one with the best held-out caption mAP is kept
    momentum: float = 0.9
    weight_decay: float = 5e-4
    val_fraction: float = 0.2
    seed: int = 0
    log: list[dict] = field(default_factory=list)  # filled by train: per learning rate and epoch
    seconds: dict[float, float] = field(default_factory=dict)  # filled by train: CPU seconds per learning rate


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) caption rows, drawn as train-adapter draws them for the same seed."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = round(val_fraction * n)
    return order[n_val:], order[:n_val]


def train(encoder: ClipEncoder, labels: list[str], captions: Captions, cfg: TrainConfig) -> PromptLearner:
    """The prompt learner with the best held-out caption mAP (merged score) over learning rates and epochs."""
    train_rows, val_rows = split(len(captions.pooled), cfg.val_fraction, cfg.seed)
    best: tuple[float, PromptLearner | None] = (-math.inf, None)
    for lr in cfg.lrs:
        cpu = time.process_time()
        learner, val_map = _train_one(encoder, labels, captions, train_rows, val_rows, lr, cfg)
        cfg.seconds[lr] = time.process_time() - cpu
        if val_map > best[0]:
            best = (val_map, learner)
    return best[1]


def _train_one(encoder: ClipEncoder, labels: list[str], captions: Captions, train_rows: np.ndarray,
               val_rows: np.ndarray, lr: float, cfg: TrainConfig) -> tuple[PromptLearner, float]:
    torch.manual_seed(cfg.seed)
    learner = PromptLearner(encoder, seed=cfg.seed)
    tokens, positions = learner.tokens(labels)
    optimizer = torch.optim.SGD([learner.global_ctx, learner.local_ctx], lr=lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train_rows) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    best = (-math.inf, None)
    for epoch in range(1, cfg.epochs + 1):
        for batch in torch.from_numpy(train_rows)[torch.randperm(len(train_rows), generator=shuffle)].split(
                cfg.batch_size):
            value = step(learner, optimizer, tokens, positions, captions.pooled[batch], captions.words[batch],
                         captions.real[batch], captions.targets[batch])
            scheduler.step()
        val_map = caption_map(learner, labels, captions, val_rows) if len(val_rows) else float(epoch)
        cfg.log.append({"lr": lr, "epoch": epoch, "loss": value, "val_mAP": val_map})
        if val_map > best[0]:
            best = (val_map, copy.deepcopy([learner.global_ctx.data, learner.local_ctx.data]))
    learner.global_ctx.data, learner.local_ctx.data = best[1]
    return learner, best[0]


def step(learner: PromptLearner, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, positions: torch.Tensor,
         pooled: torch.Tensor, words: torch.Tensor, real: torch.Tensor, targets: torch.Tensor,
         label_chunk: int | None = None) -> float:
    """One optimisation step on a batch of captions; the loss.

    With `label_chunk`, the labels' prompts go through the tower a chunk at a time, so memory is bounded at any
    number of labels: all label features first without gradients, the loss's gradient with respect to them,
    then each chunk again with gradients, back-propagated from its share. The same gradient as one pass, for
    one more forward pass of the tower (how TaI-DPT has to run at thousands of labels)."""
    optimizer.zero_grad(set_to_none=True)
    labels = len(tokens)
    chunked = label_chunk is not None and label_chunk < labels
    if not chunked:
        global_w, local_w = learner(tokens, positions)
    else:
        with torch.no_grad():
            parts = [learner(tokens[c:c + label_chunk], positions[c:c + label_chunk])
                     for c in range(0, labels, label_chunk)]
        global_w, local_w = (torch.cat(p).requires_grad_() for p in zip(*parts, strict=True))
    value = loss(global_logits(pooled, global_w), local_logits(words, real, local_w, TEXT_TEMPERATURE), targets)
    value.backward()
    if chunked:  # push each chunk's share of the gradient through the tower
        for c in range(0, labels, label_chunk):
            torch.autograd.backward(learner(tokens[c:c + label_chunk], positions[c:c + label_chunk]),
                                    [global_w.grad[c:c + label_chunk], local_w.grad[c:c + label_chunk]])
    optimizer.step()
    return value.item()


def caption_map(learner: PromptLearner, labels: list[str], captions: Captions, rows: np.ndarray) -> float:
    """mAP of the merged score on held-out captions (text only): the model-selection signal."""
    global_w, local_w = learner.label_features(labels)
    rows = torch.from_numpy(rows)
    with torch.no_grad():
        scores = merged(global_logits(captions.pooled[rows], global_w),
                        local_logits(captions.words[rows], captions.real[rows], local_w, TEXT_TEMPERATURE))
    return mean_average_precision(average_precision(scores.numpy(), captions.targets[rows].numpy()))


def score_images(learner: PromptLearner, labels: list[str], images: np.ndarray, patches: np.ndarray,
                 batch_size: int = 256) -> dict[str, np.ndarray]:
    """TaI (global only), the local stream alone, and TaI-DPT (both merged) for images [n, d] and their
    patches [n, P, d]."""
    global_w, local_w = learner.label_features(labels)
    out: dict[str, list[np.ndarray]] = {"global": [], "local": [], "merged": []}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            g = global_logits(torch.from_numpy(np.asarray(images[start:start + batch_size], np.float32)), global_w)
            p = torch.from_numpy(np.asarray(patches[start:start + batch_size], np.float32))
            local = local_logits(p, torch.ones(p.shape[:2], dtype=torch.bool), local_w, IMAGE_TEMPERATURE)
            for name, z in (("global", g), ("local", local), ("merged", merged(g, local))):
                out[name].append(z.numpy())
    return {name: np.concatenate(z) for name, z in out.items()}
