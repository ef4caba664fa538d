"""The caption pool's rules: what a captions part holds, and how a pool is carried into a new run.

The caption pool only grows unless asked (LLM time is the most expensive thing ovml makes). Every part is
stamped with its recipe hash (what changes how a caption is made) and the digest of its rows. A run keeps every
part of the current recipe, whichever shard or run made it, and sets the parts of another recipe aside, not
deleted, in captions/archive/<recipe>/ (never read by later stages; move them back by hand to use them). Parts
written before recipes were stamped are kept as the current recipe's. Parts copied in from other shards are new
names to a run directory and count if their rows still match their stamp; a part the run directory's manifest
recorded must still be the file it recorded: an edit is damage, never re-recorded as genuine.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ovml.pipeline import atomic
from ovml.pipeline.artifacts import caption_parts
from ovml.pipeline.errors import OvmlError

ARCHIVE = "archive"
RECIPE_KEY = b"ovml.recipe"  # part schema metadata: the recipe hash of the captions in the part
ROWS_KEY = b"ovml.rows_sha256"  # part schema metadata: the digest of its rows, so an edit shows
DROP_REASONS = ("unparseable", "too_short", "too_long", "no_requested_label", "duplicate")
CAPTION_SCHEMA = pa.schema([
    ("caption_id", pa.string()),
    ("text", pa.string()),
    ("labels", pa.list_(pa.string())),
    ("requested", pa.list_(pa.string())),
    ("prompt_id", pa.string()),
    ("backend", pa.string()),
    ("model", pa.string()),
    ("seed", pa.int64()),
])


class ShardTally:
    """What the parts written so far add up to; planning reads only this, so replays plan the same."""

    def __init__(self, labels: list[str]):
        self.kept_per_label = dict.fromkeys(labels, 0)
        self.seen_texts: set[str] = set()
        self.requested = 0
        self.kept = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.asked_mentions = 0  # label slots in prompts
        self.verified_mentions = 0  # of those, mentioned by a kept caption

    def add_part(self, table: pa.Table) -> None:
        """A part's counters come from its metadata; a part written by another tool (captions merged in by hand)
        has none and counts as its own rows: each one requested and kept, nothing dropped."""
        meta = table.schema.metadata or {}
        self.requested += int(meta.get(b"ovml.requested", table.num_rows))
        self.asked_mentions += int(meta.get(b"ovml.asked_mentions",
                                            sum(len(r) for r in table["requested"].to_pylist())))
        for reason, n in json.loads(meta.get(b"ovml.dropped", b"{}")).items():
            self.dropped[reason] += n
        for text, labels, requested in zip(table["text"].to_pylist(), table["labels"].to_pylist(),
                                           table["requested"].to_pylist(), strict=True):
            self.seen_texts.add(dedup_key(text))
            self.kept += 1
            self.verified_mentions += len(set(labels) & set(requested))
            for label in labels:
                if label in self.kept_per_label:  # a part made before recipes were stamped may name others
                    self.kept_per_label[label] += 1

    def shortfall(self, target: int) -> dict[str, int]:
        return {label: target - n for label, n in self.kept_per_label.items() if n < target}

    def label_yield(self) -> float:
        """Share of requested label mentions that ended in a kept caption (1 before any evidence)."""
        return self.verified_mentions / self.asked_mentions if self.asked_mentions else 1.0

    def summary(self, rounds: int, parts: int) -> dict:
        counts = list(self.kept_per_label.values())
        return {
            "requested": self.requested,
            "kept": self.kept,
            "dropped": dict(self.dropped),
            "captions_per_label": {"min": min(counts), "median": statistics.median(counts), "max": max(counts)},
            "distinct_ratio": round(self.kept / (self.kept + self.dropped["duplicate"]), 4) if self.kept else 0.0,
            "rounds": rounds,
            "parts": parts,
        }


def dedup_key(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def rows_digest(table: pa.Table) -> str:
    return hashlib.sha256(json.dumps(table.select(CAPTION_SCHEMA.names).to_pydict(), sort_keys=True,
                                     ensure_ascii=False).encode()).hexdigest()


def read_part(path: Path, shown: Path | None = None) -> pa.Table:
    """The part's rows, checked against the digest stamped in it; errors name `shown` (the pool's copy of a
    staged link) when given."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise OvmlError(f"{shown or path} is unreadable ({e}); delete it and run again to regenerate it") from None
    stamp = (table.schema.metadata or {}).get(ROWS_KEY)
    if stamp is not None and (set(CAPTION_SCHEMA.names) - set(table.column_names)
                              or stamp.decode() != rows_digest(table)):
        raise OvmlError(f"{shown or path} was edited after generate-text wrote it (its rows no longer match the digest "
                        f"stamped in it); restore it, or delete it and run the same command again to regenerate "
                        f"only its captions (the rest of the pool is kept)")
    return table


def part_recipe(path: Path) -> str | None:
    try:
        stamp = (pq.read_schema(path).metadata or {}).get(RECIPE_KEY)
    except (pa.ArrowInvalid, OSError) as e:
        raise OvmlError(f"{path} is unreadable ({e}); delete it and run again to regenerate it") from None
    return stamp.decode() if stamp else None


def check_recorded(committed: Path, staged: Path, recorded: dict[str, str]) -> None:
    """Every part the manifest recorded is still the file it recorded (an edit is damage, not new captions); a
    staged copy of one that is not (an earlier attempt linked it before the edit) is dropped, to be linked anew."""
    root = committed.parent
    for rel, digest in recorded.items():
        if not rel.endswith(".parquet"):
            continue
        part, copy = root / rel, staged.parent / rel
        if part.is_file() and atomic.sha256_file(part) != digest:
            raise OvmlError(f"{part} is not the part generate-text wrote (its sha256 differs from manifest.json: "
                            f"edited or damaged); restore it, or delete it and run the same command again to "
                            f"regenerate only its captions (the rest of the pool is kept)")
        if copy.is_file() and not (part.is_file() and part.samefile(copy)) and atomic.sha256_file(copy) != digest:
            copy.unlink()


def carry_over(committed: Path, staged: Path, recipe: str) -> tuple[list[Path], dict[str, list[Path]]]:
    """Put the committed pool into the staged one: (parts kept, {recipe: parts set aside to the archive})."""
    kept, set_aside = [], {}
    for part in caption_parts(committed.parent):
        stamp = part_recipe(part)
        if stamp in (None, recipe):
            atomic.link_or_copy(part, staged / part.name)
            kept.append(staged / part.name)
        else:
            atomic.link_or_copy(part, staged / ARCHIVE / stamp / part.name)
            set_aside.setdefault(stamp, []).append(part)
    archive = committed / ARCHIVE
    for old in sorted(archive.rglob("*.parquet")) if archive.is_dir() else []:
        atomic.link_or_copy(old, staged / ARCHIVE / old.relative_to(archive))
    return kept, set_aside


def part_index(path: Path) -> int:
    return int(path.stem.removeprefix("part-"))
