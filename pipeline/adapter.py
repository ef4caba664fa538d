"""The adapter: a residual MLP on CLIP embeddings, scored against frozen label embeddings.

Logits are taken against label embeddings passed in at call time, never against learned per-label weights,
so an adapter trained on one vocabulary scores any other label list.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ovml.pipeline import atomic
from ovml.pipeline.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ovml.pipeline.errors import OvmlError

ARCHITECTURE = "residual-mlp"
WEIGHTS = Path(ADAPTER_WEIGHTS).name
CONFIG = Path(ADAPTER_CONFIG).name


@dataclass
class AdapterConfig:
    """Everything needed to rebuild and use an adapter, saved beside its weights as config.json.

    `vocabulary` is the caption vocabulary it was trained on (labels outside it are unseen) and
    `label_templates` the prompt kind of its training label embeddings, which eval and predict reuse so
    that training and test labels are embedded alike.
    """

    dim: int
    clip: str
    vocabulary: list[str]
    label_templates: Literal["pool", "single"] = "pool"
    hidden: int = 512
    dropout: float = 0.1
    alpha: float = 0.5
    head: Literal["cosine", "magnitude", "query"] = "cosine"
    scale: float = 20.0
    queries: int = 8  # the query head's learnable label-agnostic queries (head "query" only)
    local_pooling: Literal["softmax", "top-k"] | None = None  # None: no local head (train-adapter without --local)
    local_top_k: int = 4  # top-k pooling: a label's local score is the mean of its k best tokens or patches
    architecture: str = ARCHITECTURE
    training: dict[str, Any] = field(default_factory=dict)  # how it was trained: noise, loss, seed, best epoch...
    ovml_version: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterConfig:
        """Raises KeyError/TypeError/ValueError on a file that is not an adapter config of this version."""
        config = cls(**data)
        if config.architecture != ARCHITECTURE:
            raise ValueError(f"architecture {config.architecture!r}")
        return config


class Adapter(torch.nn.Module):
    """h = x + alpha * MLP(x); logits s * cos(h, w_c) + b (cosine head) or s * <h, w_c> + b (magnitude head).

    The MLP's last layer starts at zero, so an untrained adapter is exactly zero-shot CLIP. The bias is one
    shared scalar: a per-label bias would not exist for labels unseen in training.

    With a local head (config.local_pooling), a second MLP of the same shape adapts token features: trained on
    a caption's word tokens, applied to an image's patches, its per-token logits pooled over tokens per label.

    The query head (head "query") replaces the global logits: a few learnable queries attend over the adapted
    global embedding and the adapted tokens (query_features), and each label scores the queries (query_logits);
    no parameter belongs to a label, so it scores any label list, as the other heads do.
    """

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.head, self.alpha, self.scale = config.head, config.alpha, config.scale
        self.mlp = _residual_mlp(config)
        self.bias = torch.nn.Parameter(torch.zeros(()))
        if config.local_pooling is not None or config.head == "query":
            self.local_mlp = _residual_mlp(config)
            self.local_bias = torch.nn.Parameter(torch.zeros(()))
        if config.head == "query":
            self.queries = torch.nn.Parameter(torch.randn(config.queries, config.dim) / config.dim ** 0.5)
            self.key = torch.nn.Linear(config.dim, config.dim, bias=False)
            torch.nn.init.eye_(self.key.weight)
            self.attention_scale = torch.nn.Parameter(torch.tensor(float(config.dim) ** 0.5))

    def forward(self, x: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x), label_emb)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """h, the adapted embedding (unit norm for the cosine head): computed once, scored against any labels."""
        return self._adapted(x, self.mlp)

    def logits(self, h: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        return self.scale * h @ F.normalize(label_emb, dim=-1).T + self.bias

    def local_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The local head's adapted token (or patch) features, [..., d]."""
        return self._adapted(tokens, self.local_mlp)

    def patch_logits(self, patches: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        """[n, labels] from an image's patch features [n, patches, d], through the local head."""
        return self.local_logits(self.local_features(patches), label_emb)

    def local_logits(self, h: torch.Tensor, label_emb: torch.Tensor, mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """[n, labels] from local features [n, tokens, d], pooled over tokens; `mask` [n, tokens] marks real ones."""
        z = self.scale * h @ F.normalize(label_emb, dim=-1).T + self.local_bias
        return pool_tokens(z, mask, self.config.local_pooling, self.config.local_top_k)

    def query_features(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """[n, queries, d]: each learnable query's attention-weighted mix of the adapted global embedding and the
        adapted tokens (an image's patches, a caption's words; `mask` [n, tokens] marks real ones), unit norm.
        Label-agnostic: computed once per image, then scored against any label list by query_logits."""
        h = self.features(x)[:, None]
        t = torch.cat([h, self.local_features(tokens)], dim=1)
        real = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
        if mask is not None:
            real[:, 1:] = mask
        attention = self.attention_scale * F.normalize(self.queries, dim=-1) @ F.normalize(self.key(t), dim=-1
                                                                                              ).transpose(1, 2)
        attention = attention.masked_fill(~real[:, None], torch.finfo(attention.dtype).min).softmax(dim=-1)
        return F.normalize(attention @ t, dim=-1)

    def query_logits(self, q: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        """[n, labels] from query features [n, queries, d]: every label pools its queries' scores (softmax-weighted,
        so each label leans on the queries that match it: QKS's selection), one shared bias."""
        z = self.scale * q @ F.normalize(label_emb, dim=-1).T
        return pool_tokens(z, None, "softmax", 0) + self.local_bias

    @torch.inference_mode()
    def all_query_features(self, x: torch.Tensor, patches, rows: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """query_features of images `rows` (vectors x [n, d]; patches a cache's [cached, patches, d] array read
        batch by batch), float32 [n, queries, d]."""
        out = torch.empty((len(x), self.config.queries, x.shape[1]), dtype=torch.float32, device=x.device)
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.asarray(patches[rows[start:start + batch_size]], dtype=np.float32))
            out[start:start + batch_size] = self.query_features(x[start:start + batch_size].float(), batch.to(x.device))
        return out

    def _adapted(self, x: torch.Tensor, mlp: torch.nn.Module) -> torch.Tensor:
        h = x + self.alpha * mlp(x)
        return h if self.head == "magnitude" else F.normalize(h, dim=-1)

    @torch.inference_mode()
    def all_features(self, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """features(x) batch by batch, so no [n, hidden] activation is ever built whole."""
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for start in range(0, len(x), batch_size):
            out[start:start + batch_size] = self.features(x[start:start + batch_size].float())
        return out

    @torch.inference_mode()
    def score(self, x: torch.Tensor, label_emb: torch.Tensor, batch_size: int = 8192) -> np.ndarray:
        """Logits [n, L] as float32 numpy, batch by batch so no [n, hidden] activation is ever built whole."""
        out = np.empty((len(x), len(label_emb)), dtype=np.float32)
        for start in range(0, len(x), batch_size):
            out[start:start + batch_size] = self(x[start:start + batch_size], label_emb).float().cpu().numpy()
        return out


def _residual_mlp(config: AdapterConfig) -> torch.nn.Sequential:
    mlp = torch.nn.Sequential(
        torch.nn.Linear(config.dim, config.hidden), torch.nn.GELU(), torch.nn.Dropout(config.dropout),
        torch.nn.Linear(config.hidden, config.dim),
    )
    torch.nn.init.zeros_(mlp[-1].weight)
    torch.nn.init.zeros_(mlp[-1].bias)
    return mlp


POOLINGS = ("softmax", "top-k")
HEADS = ("cosine", "magnitude", "query")
LOCAL_WEIGHT = 0.25  # eval's +local rows and predict --local: fuse_local's default weight


def fuse_local(global_scores, local_scores, weight: float = LOCAL_WEIGHT):
    """(1 - w) * global + w * local: the one fusion rule of eval's +local rows and predict --local."""
    return (1 - weight) * global_scores + weight * local_scores


def pool_tokens(z: torch.Tensor, mask: torch.Tensor | None, pooling: str, top_k: int) -> torch.Tensor:
    """Per-label token logits [n, tokens, labels] -> [n, labels]: softmax-weighted (sum over t of softmax_t(z) z,
    between the mean and the max) or the mean of the top_k. A row without a real token scores 0.

    Padding is filled with the dtype's lowest value rather than -inf, so no NaN reaches the gradient."""
    lowest = torch.finfo(z.dtype).min
    if mask is not None:
        z = z.masked_fill(~mask[..., None], lowest)
    if pooling == "softmax":
        pooled = (torch.softmax(z, dim=1) * (z if mask is None else z.masked_fill(~mask[..., None], 0.0))).sum(dim=1)
    elif pooling == "top-k":
        best = z.topk(min(top_k, z.shape[1]), dim=1).values
        real = best > lowest
        pooled = (best * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
    else:
        raise ValueError(f"pooling {pooling!r}")
    return pooled if mask is None else torch.where(mask.any(dim=1)[:, None], pooled, 0.0)


def perturb(x: torch.Tensor, sigma: float, renorm: bool, generator: torch.Generator) -> torch.Tensor:
    """x + N(0, sigma^2 I): text embeddings jittered to cover where image embeddings of the same content lie."""
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return F.normalize(x, dim=-1) if renorm else x


def save_adapter(adapter_dir: Path, model: Adapter) -> None:
    """Weights then config, each atomic: a config.json only ever sits beside the weights it describes."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic.write_bytes(Path(adapter_dir) / WEIGHTS, save(state))
    atomic.write_json(Path(adapter_dir) / CONFIG, asdict(model.config))


def load_adapter(adapter_dir: str | Path, clip_spec: str, dim: int) -> tuple[Adapter, AdapterConfig]:
    """The adapter in eval mode and its config; refuses one trained on another CLIP model's embeddings."""
    adapter_dir = Path(adapter_dir)
    for name in (CONFIG, WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise OvmlError(f"{adapter_dir / name} is missing; train an adapter first with `ovml train-adapter`")
    try:
        config = AdapterConfig.from_json(json.loads((adapter_dir / CONFIG).read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise OvmlError(f"{adapter_dir / CONFIG} is not an ovml adapter config; retrain with "
                        "`ovml train-adapter --force`") from None
    if config.clip != clip_spec:
        raise OvmlError(f"the adapter in {adapter_dir} was trained on '{config.clip}' embeddings, not "
                        f"'{clip_spec}'; pass --clip {config.clip} or retrain it with --clip {clip_spec}")
    if config.dim != dim:
        raise OvmlError(f"the adapter in {adapter_dir} expects {config.dim}-d embeddings, got {dim}-d; "
                        f"use the CLIP model it was trained on ('{config.clip}')")
    model = Adapter(config)
    try:
        model.load_state_dict(load_file(str(adapter_dir / WEIGHTS)))
    except (SafetensorError, RuntimeError):
        raise OvmlError(f"{adapter_dir / WEIGHTS} is damaged or does not match its config.json; retrain with "
                        "`ovml train-adapter --force`") from None
    return model.eval(), config
