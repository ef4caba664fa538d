"""The one place that turns a CLIP spec into an encoder.

A spec is `ARCH:PRETRAINED`: `ViT-B-16:openai` (a tag open_clip downloads and caches),
`ViT-B-16:/path/to/checkpoint.safetensors` (a local file), or `ARCH:random` (seeded random weights:
same cost as the real model, meaningless as accuracy; for tests, benchmarks and the offline demo).
`ovml-tiny` is a small architecture registered here for tests and the demo.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.transformer import ResidualAttentionBlock, TextTransformer

from ovml.pipeline.device import pick_device
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.paths import input_file
from ovml.pipeline.rundir import RunDir

RANDOM = "random"
RANDOM_SEED = 0
TINY_ARCH = "ovml-tiny"

open_clip.add_model_config(Path(str(files("ovml.pipeline").joinpath("clip_configs"))))


@dataclass(frozen=True)
class ClipSpec:
    arch: str
    pretrained: str

    @classmethod
    def parse(cls, spec: str) -> ClipSpec:
        arch, sep, pretrained = spec.partition(":")
        if not sep or not arch or not pretrained:
            raise OvmlError(
                f"CLIP spec '{spec}' must look like ARCH:PRETRAINED, e.g. ViT-B-16:openai or "
                "ViT-B-16:/path/to/checkpoint.safetensors"
            )
        return cls(arch, pretrained)

    @property
    def is_path(self) -> bool:
        return "/" in self.pretrained or self.pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))

    def __str__(self) -> str:
        return f"{self.arch}:{self.pretrained}"


OVML_METADATA = "ovml"  # one safetensors metadata key holding sorted JSON: the file's bytes stay deterministic


def save_checkpoint(model: torch.nn.Module, path: str | Path, info: dict[str, Any]) -> Path:
    """An open_clip state dict as safetensors, with what ovml knows of it (random? testbed?) in its metadata.

    safetensors writes its metadata map in no fixed order, so everything goes under one key as sorted JSON.
    """
    from safetensors.torch import save_file

    from ovml.pipeline import atomic

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={OVML_METADATA: json.dumps(info, sort_keys=True)})
    return path


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """What ovml wrote into a checkpoint's metadata ({} for other checkpoints)."""
    if not str(path).endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get(OVML_METADATA, "{}"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise OvmlError(f"cannot read CLIP checkpoint {path}: {str(e).strip()[:160] or type(e).__name__}") from None


def save_random_checkpoint(arch: str, path: str | Path, seed: int = RANDOM_SEED) -> Path:
    """Write a seeded random open_clip checkpoint (safetensors, flagged as random in its metadata)."""
    torch.manual_seed(seed)
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(arch, pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    return save_checkpoint(model, path, {"random_weights": True, "arch": arch, "seed": seed})


class ClipEncoder:
    """Batched CLIP text and image encoders returning L2-normalised float32 numpy arrays."""

    def __init__(self, spec: ClipSpec, model: torch.nn.Module, preprocess, tokenizer, device: str,
                 random_weights: bool, description: str | None = None):
        self.spec = spec
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.random_weights = random_weights
        self.description = description  # what the model is, for reports (the testbed model says so)
        self.dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else None
        if self.dim is None:
            with torch.inference_mode():
                self.dim = int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
        self._causal_text = CausalTextTower.of(model)

    def encode_text(self, texts: list[str], batch_size: int = 256, *, precision: str = "fp32",
                    progress: Callable[[int], None] | None = None) -> np.ndarray:
        tokens, _ = self.tokenize(texts)
        return self.encode_tokens(tokens, batch_size, precision=precision, progress=progress)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, np.ndarray]:
        """Token ids exactly as `self.tokenizer(texts)` gives them, and which texts were cut to fit the context."""
        if not isinstance(self.tokenizer, open_clip.SimpleTokenizer) or self.tokenizer.reduction_fn is not None:
            # HF-style tokenizers cut and pad their own way and do not say what they cut: counted as none.
            return self.tokenizer(texts), np.zeros(len(texts), dtype=bool)
        # One extra position tells whether a text fits; cutting it off as open_clip does (keep the first
        # context_length - 1 ids, end with EOT) then gives its exact token ids without a second pass.
        context = self.tokenizer.context_length
        longer = self.tokenizer(texts, context_length=context + 1)
        truncated = longer[:, context] != 0
        tokens = longer[:, :context].clone()
        tokens[truncated, context - 1] = self.tokenizer.eot_token_id
        return tokens, truncated.numpy()

    def encode_tokens(self, tokens: torch.Tensor, batch_size: int = 256, *, precision: str = "fp32",
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Embed token rows; `progress(n)` hears of every n rows done.

        On a causal tower the rows are sorted by length and each batch runs only up to its longest pooled
        position, which gives open_clip's `encode_text` result at a fraction of the padded 77-token cost.
        """
        half = autocast_dtype(precision, self.device)
        out = np.empty((len(tokens), self.dim), dtype=np.float32)
        causal = self._causal_text
        if causal is not None:
            positions = causal.pool_positions(tokens)
            order = torch.argsort(positions, descending=True, stable=True)
        else:
            order = torch.arange(len(tokens))
        with torch.inference_mode(), torch.autocast(self.device.split(":")[0], dtype=half, enabled=half is not None):
            for start in range(0, len(tokens), batch_size):
                rows = order[start:start + batch_size]
                batch = tokens[rows].to(self.device)
                if causal is not None:
                    features = causal.encode(batch, positions[rows].to(self.device))
                else:
                    features = self.model.encode_text(batch)
                out[rows.numpy()] = _normalise(features)
                if progress is not None:
                    progress(len(rows))
        return out

    def encode_token_features(self, tokens: torch.Tensor, batch_size: int = 256, *,
                              progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """Per-token features of each row in the joint space (TaI-DPT's fine-grained text features): the last
        block's output at every word token (after the start token, before the pooled one), through the final
        norm and projection, L2-normalised, float16 [words, d] per row.

        The pooled embedding of the same pass is `encode_tokens`' (tests check it), so a word token is scored
        against labels exactly as a caption is."""
        causal = self._causal_text
        if causal is None or causal.pool_type not in ("argmax", "eos"):
            raise OvmlError(f"--local needs a causal open_clip text tower pooled at its end token; {self.spec.arch} "
                            "has another kind")
        positions = causal.pool_positions(tokens)
        out: list[np.ndarray] = [np.empty(0)] * len(tokens)
        with torch.inference_mode():
            for start in range(0, len(tokens), batch_size):
                rows = torch.arange(start, min(start + batch_size, len(tokens)))
                features = torch.nn.functional.normalize(
                    causal.encode_all_positions(tokens[rows].to(self.device), positions[rows]).float(), dim=-1)
                words = features.to(torch.float16).cpu().numpy()
                for i, row in enumerate(rows.tolist()):
                    out[row] = words[i, 1:int(positions[row])]
                if progress is not None:
                    progress(len(rows))
        return out

    def encode_image_batch(self, pixels: torch.Tensor) -> np.ndarray:
        """`pixels` is a batch already passed through `self.preprocess`."""
        with torch.inference_mode():
            return _normalise(self.model.encode_image(pixels.to(self.device)))

    def encode_image_patches(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(global [n, d], patches [n, patches, d]), both L2-normalised, from one pass of the image tower.

        The global vector is `encode_image`'s. Patch vectors take the value path in the last block (MaskCLIP /
        CLIP Surgery): a patch token gets the v-projection and out-projection of its own ln_1 input instead of
        attention's query-key mixing, which in CLIP mostly copies the global token into every patch; the
        residual and MLP then run as usual, and the final norm and projection put it in the joint space.
        """
        visual = getattr(self.model, "visual", None)
        transformer = getattr(visual, "transformer", None)
        blocks = getattr(transformer, "resblocks", None)
        if (not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.attn_pool is not None
                or visual.pool_type != "tok" or visual.final_ln_after_pool or blocks is None
                or type(blocks[-1]) is not ResidualAttentionBlock or hasattr(blocks[-1], "ln_1_kv")
                or not getattr(transformer, "batch_first", True)):
            raise OvmlError(f"--local needs an open_clip ViT image tower with a class token; {self.spec.arch} "
                            "has another kind")
        with torch.inference_mode():
            x = visual._embeds(pixels.to(self.device))
            *first, last = blocks
            for block in first:
                x = block(x)
            h = last.ln_1(x[:, 1:])
            width = h.shape[-1]
            value = torch.nn.functional.linear(h, last.attn.in_proj_weight[2 * width:],
                                               last.attn.in_proj_bias[2 * width:])
            patches = x[:, 1:] + last.ls_1(last.attn.out_proj(value))
            patches = patches + last.ls_2(last.mlp(last.ln_2(patches)))
            pooled = last(x)[:, 0]
            tokens = visual.ln_post(torch.cat([pooled[:, None], patches], dim=1))
            if visual.proj is not None:
                tokens = tokens @ visual.proj
            return _normalise(tokens[:, 0]), _normalise(tokens[:, 1:])


PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype of a text precision (None for fp32); half precisions are for GPUs only."""
    if precision not in PRECISIONS:
        raise OvmlError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    half = PRECISIONS[precision]
    if half is not None and not device.startswith("cuda"):
        raise OvmlError(f"precision {precision} needs a CUDA device (this run uses {device}); "
                        "use --precision fp32 on CPU")
    return half


@dataclass(frozen=True)
class CausalTextTower:
    """A standard causal CLIP text tower, run only up to each batch's longest pooled position.

    Under the causal mask position i attends to positions <= i only, so nothing after the pooled (EOT)
    token can change it: dropping the padding keeps open_clip's result and removes most of the cost.
    `tower` is the open_clip `CLIP` itself (text parts inlined) or a `CustomTextCLIP`'s `TextTransformer`;
    both name their parts alike.
    """

    tower: torch.nn.Module
    pool_type: str
    eos_id: int | None

    @classmethod
    def of(cls, model: torch.nn.Module) -> CausalTextTower | None:
        """None where the shortcut would not be exact (bidirectional, CLS token, HF tower, 'last' pooling):
        those towers run through plain `model.encode_text` on the full padded context."""
        if isinstance(model, open_clip.CLIP):
            tower, pool_type, eos_id = model, model.text_pool_type, model.text_eos_id
        elif (isinstance(model, open_clip.CustomTextCLIP) and isinstance(model.text, TextTransformer)
              and model.text.cls_emb is None and not model.text.use_pad_mask):
            tower, pool_type, eos_id = model.text, model.text.pool_type, model.text.eos_id
        else:
            return None
        if tower.attn_mask is None or pool_type not in ("argmax", "eos", "first"):
            return None
        return cls(tower, pool_type, eos_id)

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """The position each row is pooled at, as open_clip's `text_global_pool` picks it."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return torch.zeros(len(tokens), dtype=torch.long)

    def encode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """open_clip's `encode_text` (unnormalised) on `tokens` cut after the last pooled position."""
        length = int(positions.max()) + 1
        x = self._pooled_hidden(self._embedded(tokens, length), positions, self.tower.attn_mask[:length, :length])
        return self._to_joint_space(x)

    def encode_all_positions(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Every position's output up to the last pooled one, in the joint space (unnormalised [n, length, d]):
        row i's `encode` is its output at positions[i]."""
        length = int(positions.max()) + 1
        x = self.tower.transformer(self._embedded(tokens, length), attn_mask=self.tower.attn_mask[:length, :length])
        return self._to_joint_space(x)

    def _embedded(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        t = self.tower
        cast_dtype = t.transformer.get_cast_dtype()
        return t.token_embedding(tokens[:, :length]).to(cast_dtype) + t.positional_embedding[:length].to(cast_dtype)

    def _to_joint_space(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm (per token) and the text projection."""
        x = self.tower.ln_final(x)
        if isinstance(self.tower.text_projection, torch.nn.Linear):
            return self.tower.text_projection(x)
        return x if self.tower.text_projection is None else x @ self.tower.text_projection

    def _pooled_hidden(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The last block's output at the pooled positions only.

        No later layer reads the other positions, so the last block runs its attention query and MLP for
        the pooled token alone (keys after it are masked, as the causal mask would): ~1/layers less work.
        """
        transformer = self.tower.transformer
        rows = torch.arange(len(x), device=x.device)
        *blocks, last = transformer.resblocks
        batch_first = getattr(transformer, "batch_first", True)  # open_clip main drops the flag: always batch-first
        if not batch_first or type(last) is not ResidualAttentionBlock or hasattr(last, "ln_1_kv"):
            return transformer(x, attn_mask=mask)[rows, positions]
        for block in blocks:
            x = block(x, attn_mask=mask)
        h = last.ln_1(x)
        after = torch.arange(x.shape[1], device=x.device) > positions[:, None]
        attended = last.attn(h[rows, positions].unsqueeze(1), h, h, need_weights=False, key_padding_mask=after)[0]
        pooled = x[rows, positions] + last.ls_1(attended[:, 0])
        return pooled + last.ls_2(last.mlp(last.ln_2(pooled)))


def _normalise(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return torch.nn.functional.normalize(features, dim=-1).cpu().numpy().astype(np.float32, copy=False)


def check_clip(spec: str, device: str = "auto") -> ClipSpec:
    """What load_clip would refuse, found without loading a model (so `ovml run` can check it before the first
    stage): the spec's form, the architecture, the checkpoint file or the pretrained tag, and the device."""
    parsed = ClipSpec.parse(spec)
    pick_device(device)
    if parsed.arch not in open_clip.list_models():
        raise OvmlError(
            f"unknown CLIP architecture '{parsed.arch}' in '{spec}'; see `python -c \"import open_clip; "
            "print(open_clip.list_models())\"` for the names open_clip knows"
        )
    if parsed.pretrained == RANDOM:
        return parsed
    if parsed.is_path:
        input_file(parsed.pretrained, "CLIP checkpoint", f"check the path in '{spec}'")
        checkpoint_metadata(parsed.pretrained)  # a damaged header is one line here too
    elif not open_clip.get_pretrained_cfg(parsed.arch, parsed.pretrained):
        tags = ", ".join(t for a, t in open_clip.list_pretrained() if a == parsed.arch) or "none"
        raise OvmlError(
            f"'{parsed.pretrained}' is not a pretrained tag of {parsed.arch} (known: {tags}); "
            f"or pass a local checkpoint as {parsed.arch}:/path/to/checkpoint"
        )
    elif not _hub_reachable():  # offline: the weights must already be in the local cache
        try:
            with _offline():
                open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(parsed.arch, parsed.pretrained))
        except Exception as e:  # noqa: BLE001 - whatever the hub client raises for a file it does not have
            raise _weights_unavailable(spec, parsed, e) from None
    return parsed


def check_run_clip(run_dir: Path, requested: str | None, device: str) -> None:
    """A command's CLIP, before anything runs: the spec given (its file, tag, device), then that it is the run
    directory's own (RunDir.clip); the run directory's spec when none is given."""
    if requested is not None:
        check_clip(requested, device)
    resolved = RunDir(run_dir).clip(requested)
    if requested is None:
        check_clip(resolved, device)


def _weights_unavailable(spec: str, parsed: ClipSpec, e: Exception) -> OvmlError:
    return OvmlError(
        f"CLIP weights for '{spec}' are not available ({type(e).__name__}); on a machine without the "
        f"model hub pass a local checkpoint instead: --clip {parsed.arch}:/path/to/open_clip_model.safetensors"
    )


@contextlib.contextmanager
def _offline():
    """The Hugging Face client in cache-only mode for this call only (the process keeps its own setting)."""
    from huggingface_hub import constants

    was_offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was_offline


def has_random_weights(spec: str) -> bool:
    """Whether a spec's weights are random (`random`, or a checkpoint saved as such), without loading them."""
    parsed = ClipSpec.parse(spec)
    if parsed.pretrained == RANDOM:
        return True
    return parsed.is_path and checkpoint_metadata(parsed.pretrained).get("random_weights") is True


@functools.lru_cache(maxsize=2)
def load_clip(spec: str, device: str = "auto") -> ClipEncoder:
    parsed = check_clip(spec, device)
    device = pick_device(device)
    random_weights, description, pretrained = has_random_weights(spec), None, parsed.pretrained
    if parsed.pretrained == RANDOM:
        torch.manual_seed(RANDOM_SEED)
        pretrained = None
    elif parsed.is_path:
        description = checkpoint_metadata(pretrained).get("description")
    try:
        model, _, preprocess = _create(parsed.arch, pretrained, device)
    except OvmlError:
        raise
    except Exception as e:  # noqa: BLE001 - any download/load failure becomes the one-line error below
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if parsed.is_path:
            raise OvmlError(f"cannot load CLIP checkpoint {parsed.pretrained} as {parsed.arch}: {first}") from None
        raise _weights_unavailable(spec, parsed, e) from None
    return ClipEncoder(parsed, model, preprocess, open_clip.get_tokenizer(parsed.arch), device, random_weights,
                       description)


def _create(arch: str, pretrained: str | None, device: str):
    """open_clip's loader, quiet, and cache-only when the hub cannot be reached (instead of ~45 s of retries)."""
    offline = pretrained and not Path(pretrained).is_file() and not _hub_reachable()
    logging.disable(logging.ERROR)
    try:
        with _offline() if offline else contextlib.nullcontext():
            return open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device,
                                                         weights_only=True)
    finally:
        logging.disable(logging.NOTSET)


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
