"""The adapter: a residual MLP on CLIP embeddings, scored against frozen label embeddings.

Logits are taken against label embeddings passed in at call time, never against learned per-label weights,
so an adapter trained on one vocabulary scores any other label list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ovml.pipeline import atomic
from ovml.pipeline.errors import OvmlError

ARCHITECTURE = "residual-mlp"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class Adapter(torch.nn.Module):
    """h = x + alpha * MLP(x); logits s * cos(h, w_c) + b (cosine head) or s * <h, w_c> + b (magnitude head).

    The MLP's last layer starts at zero, so an untrained adapter is exactly zero-shot CLIP. The bias is one
    shared scalar: a per-label bias would not exist for labels unseen in training.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1, alpha: float = 0.5,
                 head: Literal["cosine", "magnitude"] = "cosine", scale: float = 20.0):
        super().__init__()
        self.head, self.alpha, self.scale = head, alpha, scale
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Dropout(dropout), torch.nn.Linear(hidden, dim)
        )
        torch.nn.init.zeros_(self.mlp[-1].weight)
        torch.nn.init.zeros_(self.mlp[-1].bias)
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
        h = x + self.alpha * self.mlp(x)
        if self.head == "cosine":
            h = F.normalize(h, dim=-1)
        return self.scale * h @ F.normalize(label_emb, dim=-1).T + self.bias

    @torch.inference_mode()
    def score(self, x: torch.Tensor, label_emb: torch.Tensor, batch_size: int = 8192) -> np.ndarray:
        """Logits [n, L] as float32 numpy, batch by batch so no [n, hidden] activation is ever built whole."""
        out = np.empty((len(x), len(label_emb)), dtype=np.float32)
        for start in range(0, len(x), batch_size):
            out[start:start + batch_size] = self(x[start:start + batch_size], label_emb).float().cpu().numpy()
        return out


def perturb(x: torch.Tensor, sigma: float, renorm: bool, generator: torch.Generator) -> torch.Tensor:
    """x + N(0, sigma^2 I): text embeddings jittered to cover where image embeddings of the same content lie."""
    if sigma > 0:
        x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return F.normalize(x, dim=-1) if renorm else x


def model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    arch = config["architecture"]
    return {"dim": config["dim"], "hidden": arch["hidden"], "dropout": arch["dropout"], "alpha": arch["alpha"],
            "head": arch["head"], "scale": arch["scale"]}


def save_adapter(adapter_dir: Path, model: Adapter, config: dict[str, Any]) -> None:
    """Weights then config, each atomic: a config.json only ever sits beside the weights it describes."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic.write_bytes(Path(adapter_dir) / WEIGHTS, save(state))
    atomic.write_json(Path(adapter_dir) / CONFIG, config)


def load_adapter(adapter_dir: str | Path, clip_spec: str, dim: int) -> tuple[Adapter, dict[str, Any]]:
    """The adapter in eval mode and its config; refuses one trained on another CLIP model's embeddings."""
    adapter_dir = Path(adapter_dir)
    for name in (CONFIG, WEIGHTS):
        if not (adapter_dir / name).is_file():
            raise OvmlError(f"{adapter_dir / name} is missing; train an adapter first with `ovml train-adapter`")
    try:
        config = json.loads((adapter_dir / CONFIG).read_text(encoding="utf-8"))
        kwargs = model_kwargs(config)
    except (json.JSONDecodeError, KeyError, TypeError):
        raise OvmlError(f"{adapter_dir / CONFIG} is not an ovml adapter config; retrain with "
                        "`ovml train-adapter --force`") from None
    if config["clip"] != clip_spec:
        raise OvmlError(f"the adapter in {adapter_dir} was trained on '{config['clip']}' embeddings, not "
                        f"'{clip_spec}'; pass --clip {config['clip']} or retrain it with --clip {clip_spec}")
    if config["dim"] != dim:
        raise OvmlError(f"the adapter in {adapter_dir} expects {config['dim']}-d embeddings, got {dim}-d; "
                        f"use the CLIP model it was trained on ('{config['clip']}')")
    model = Adapter(**kwargs)
    try:
        model.load_state_dict(load_file(str(adapter_dir / WEIGHTS)))
    except (SafetensorError, RuntimeError):
        raise OvmlError(f"{adapter_dir / WEIGHTS} is damaged or does not match its config.json; retrain with "
                        "`ovml train-adapter --force`") from None
    return model.eval(), config
