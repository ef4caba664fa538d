"""Where every artifact lives in a run directory: the one module producers and consumers both import.

    captions/part-*.parquet, captions/vocabulary.json      generate-text
    captions/archive/<recipe>/part-*.parquet    captions set aside when the caption recipe changed (never read)
    text_emb/part-*.parquet, labels/train.parquet          embed-text
    adapter/{model.safetensors, config.json, train_log.parquet}   train-adapter
    images/<dataset>/                                      embed-images
    eval/<dataset>/                                        eval
    cache/labels/                   label embeddings eval and predict compute for their own label lists
                                    (named by fingerprint; any file there may be deleted)
"""

from __future__ import annotations

from pathlib import Path

CAPTIONS = "captions"
PART_GLOB = "part-*.parquet"
VOCABULARY = "captions/vocabulary.json"
TEXT_EMB = "text_emb"
TRAIN_LABELS = "labels/train.parquet"
ADAPTER = "adapter"
ADAPTER_WEIGHTS = "adapter/model.safetensors"
ADAPTER_CONFIG = "adapter/config.json"
TRAIN_LOG = "adapter/train_log.parquet"
LABEL_CACHE = "cache/labels"


def caption_parts(root: Path) -> list[Path]:
    """The caption pool: captions/part-*.parquet, in part order (captions/archive/ is not part of it)."""
    return sorted((Path(root) / CAPTIONS).glob(PART_GLOB))


def part_name(index: int) -> str:
    """captions/ and text_emb/ parts share names, so a text_emb part belongs to the captions part of its name."""
    return f"part-{index:05d}.parquet"


def image_cache(dataset: str) -> str:
    return f"images/{dataset}"


def eval_dir(dataset: str) -> str:
    return f"eval/{dataset}"
