"""Where every artifact lives in a run directory: the one module producers and consumers both import.

    captions/part-*.parquet, captions/vocabulary.json      generate-text
    captions/archive/<recipe>/part-*.parquet    captions set aside when the caption recipe changed (never read)
    text_emb/part-*.parquet, labels/train.parquet          embed-text
    adapter/{model.safetensors, config.json, train_log.parquet}   train-adapter
    images/<dataset>/                                      embed-images
    eval/<dataset>/                                        eval
    cache/labels/                   label embeddings eval and predict compute for their own label lists
                                    (named by fingerprint; any file there may be deleted)
    cache/search/<dataset>/         search's FAISS indexes of adapted image vectors and IVF indexes, named by
                                    what they were built from (any file there may be deleted)
"""

from __future__ import annotations

import re
from pathlib import Path

from ovml.pipeline.errors import OvmlError

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


DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")  # every name in pipeline/datasets.py DATASETS


def _folder(dataset: str) -> str:
    """A dataset name where it becomes a folder name: one plain path component, so no name (`../../other-run`,
    `/tmp/x`) can lead a stage to read or write outside its own folder of the run directory."""
    if not DATASET_NAME.fullmatch(dataset):
        raise OvmlError(f"'{dataset}' is not a dataset name (lower-case letters, digits and '-', such as folder "
                        "or nuswide); pass the --dataset that embed-images cached")
    return dataset


def image_cache(dataset: str) -> str:
    return f"images/{_folder(dataset)}"


def eval_dir(dataset: str) -> str:
    return f"eval/{_folder(dataset)}"


def search_cache(dataset: str) -> str:
    """Not under images/<dataset>/: eval fingerprints that folder, and a search must not make eval re-run."""
    return f"cache/search/{_folder(dataset)}"
