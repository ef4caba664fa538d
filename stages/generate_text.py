"""generate-text: an LLM writes captions that mention several labels -> captions/part-*.parquet.

Work goes in rounds: a round plans prompts for every label still short of its quota, in parts of
`part_size` prompts; each part is written atomically once all its answers are in. A round's plan is a
pure function of the seed and of the parts already written, so a killed run replays the plans over the
parts on disk, keeps them, and generates only what is missing: the same rows as an uninterrupted run.
Shards split the quota (each covers ceil(per_label / num_shards) per label) and number their parts
apart (part number = shard_index mod num_shards), so their captions/ folders merge by copying.

The caption pool only grows unless asked (LLM time is the most expensive thing ovml makes). The settings
that change how a caption is made form its recipe: backend, model, prompts file, temperature, top_p,
max_tokens, sampling (and its co-occurrence file or CLIP model), min/max labels, the vocabulary, seed and
extra_body. Every part is stamped with its recipe hash. A run keeps every part of the current recipe,
whichever shard or run made it, counts it toward --per-label, and numbers new parts after the highest
existing one: raising --per-label tops up, lowering it keeps every row. Parts of another recipe are set
aside, not deleted, in captions/archive/<recipe>/ (never read by later stages; move them back by hand to
use them). Parts written before recipes were stamped are kept as the current recipe's. How many captions
(per_label) and who makes them (base_url, concurrency, threads, max_rounds, part_size) are not part of the
recipe; base_url, concurrency, threads, max_rounds and part_size do not even make the stage run again. Only --force
deletes captions: it builds a new pool from nothing, which replaces the old one when complete; a killed
--force attempt is not resumed (run_stage drops its staging), so a plain run never takes its parts for a top-up.

A part is stamped with the digest of its rows too. Parts copied in from other shards are new names to this
run directory and count if their rows still match their stamp; a part this run directory's manifest recorded
must still be the file it recorded. An edited part is damage, never re-recorded as genuine: one line names it,
and deleting it makes the next run regenerate only its captions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import statistics
import string
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import TextColumn

from ovml.pipeline import atomic
from ovml.pipeline.artifacts import CAPTIONS, VOCABULARY, caption_parts, part_name
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.llm import SMOLLM2_GGUF, ChatRequest, LlmBackend, Sampling, open_backend, parse_caption
from ovml.pipeline.paths import input_file
from ovml.pipeline.progress import progress_bar
from ovml.pipeline.ray_engine import check_engine, ray_chat, ray_session
from ovml.pipeline.rundir import RunDir, StageOutcome, run_stage
from ovml.pipeline.settings import GenerateTextConfig, as_params, check_settings
from ovml.pipeline.vocabulary import MentionMatcher, Vocabulary, load_vocabulary
from ovml.prompts import read_prompt_file

PROMPTS_FILE = "caption_prompts.json"
ARCHIVE = "archive"
RECIPE_KEY = b"ovml.recipe"  # part schema metadata: the recipe hash of the captions in the part
ROWS_KEY = b"ovml.rows_sha256"  # part schema metadata: the digest of its rows, so an edit shows
NOT_RECIPE = ("labels", "dataset_root", "cooccurrence", "per_label", "num_shards", "shard_index")
MIN_WORDS = 3  # "dog beach" is a tag list, not a caption
MAX_WORDS = 40  # longer answers are rambling past the requested single sentence
DROP_REASONS = ("unparseable", "too_short", "too_long", "no_requested_label", "duplicate")
MIN_YIELD = 0.2  # cap on over-planning when the model rarely mentions what it was asked for
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


@dataclass(frozen=True)
class PlannedPrompt:
    labels: tuple[str, ...]
    prompt_id: str
    seed: int


def generate_text(cfg: GenerateTextConfig) -> StageOutcome:
    vocabulary = check(cfg)
    run_dir = RunDir(cfg.run_dir)
    if cfg.sampling == "similar":  # the only sampler that embeds
        cfg = replace(cfg, clip=run_dir.clip(cfg.clip))
    params = as_params(cfg)
    params["prompts_sha256"] = hashlib.sha256(read_prompt_file(PROMPTS_FILE).encode()).hexdigest()
    inputs = list(vocabulary.sources)
    models = {"llm": cfg.model or (SMOLLM2_GGUF if cfg.backend == "llama-cpp" else "served by base_url")}
    if cfg.sampling == "cooccurrence":
        inputs.append(Path(cfg.cooccurrence))
    if cfg.sampling == "similar":
        models["clip"] = cfg.clip
    else:
        del params["clip"]
    recipe = _recipe(params, vocabulary, cfg)

    def body(out: Path, resume: bool) -> dict:
        recorded = (run_dir.stage_record("generate_text") or {}).get("outputs", {})
        with ray_session(cfg.ray_address) if cfg.engine == "ray" else contextlib.nullcontext():  # one for all rounds
            return _generate(cfg, vocabulary, recipe, run_dir / CAPTIONS, out / CAPTIONS, recorded)

    # A killed attempt resumes whatever --per-label says now: its parts are of the same recipe and shard.
    attempt = f"{recipe}-{cfg.shard_index}-of-{cfg.num_shards}"
    return run_stage(run_dir, "generate_text", params=params, inputs=inputs, outputs=[CAPTIONS], body=body,
                     force=cfg.force, models=models, attempt=attempt)


def _recipe(params: dict, vocabulary: Vocabulary, cfg: GenerateTextConfig) -> str:
    """Hash of everything that changes how a caption is made (see the module docstring), never of paths."""
    made_by = {k: v for k, v in params.items() if k not in NOT_RECIPE}
    made_by["vocabulary"] = vocabulary.as_json()
    if cfg.sampling == "cooccurrence":
        made_by["cooccurrence_sha256"] = atomic.sha256_file(cfg.cooccurrence)
    return hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).hexdigest()[:16]


def check(cfg: GenerateTextConfig) -> Vocabulary:
    """The settings, the labels and the files named, before anything runs (`ovml run` checks every stage's before
    the first); the model is opened, and the longest prompt checked, when the stage starts. Returns the labels."""
    check_settings(cfg)
    if cfg.min_labels > cfg.max_labels:
        raise OvmlError(f"need --min-labels <= --max-labels, got {cfg.min_labels} and {cfg.max_labels}")
    if cfg.shard_index >= cfg.num_shards:
        raise OvmlError(f"--shard-index must be in 0..{cfg.num_shards - 1} for --num-shards {cfg.num_shards}, "
                        f"got {cfg.shard_index}")
    check_engine(cfg.engine)
    if cfg.sampling == "cooccurrence":
        tag_file = "a tag file, one image per line, labels separated by commas"
        if not cfg.cooccurrence:
            raise OvmlError(f"--sampling cooccurrence needs --cooccurrence FILE ({tag_file})")
        input_file(cfg.cooccurrence, "--cooccurrence file", f"pass {tag_file}")
    if cfg.sampling == "similar":
        from ovml.pipeline.clip import check_run_clip

        check_run_clip(cfg.run_dir, cfg.clip, cfg.device)
    return load_vocabulary(cfg.labels, cfg.dataset_root)


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
            self.seen_texts.add(_dedup_key(text))
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


class LabelSetSampler:
    """Draws the companions of an anchor label with probability proportional to a weight matrix row.

    uniform: every other label weighs 1; similar: the nearest labels in CLIP text space weigh 1;
    cooccurrence: weights are co-occurrence counts. Labels with no weight fill any remaining slots uniformly.
    """

    def __init__(self, labels: list[str], weights: np.ndarray):
        self.labels = labels
        self.weights = weights.astype(np.float64)
        np.fill_diagonal(self.weights, 0.0)

    def label_set(self, anchor: int, size: int, rng: np.random.Generator) -> list[int]:
        weights = self.weights[anchor]
        partners = np.flatnonzero(weights > 0)
        take = min(size - 1, len(partners))
        chosen = list(rng.choice(partners, size=take, replace=False, p=weights[partners] / weights[partners].sum())
                      ) if take else []
        rest = np.setdiff1d(np.arange(len(self.labels)), [anchor, *chosen])
        fill = min(size - 1 - take, len(rest))
        chosen += list(rng.choice(rest, size=fill, replace=False)) if fill else []
        return [anchor, *(int(i) for i in chosen)]


def _sampler(cfg: GenerateTextConfig, vocabulary: Vocabulary) -> LabelSetSampler:
    n = len(vocabulary.labels)
    if cfg.sampling == "uniform":
        return LabelSetSampler(vocabulary.labels, np.ones((n, n)))
    if cfg.sampling == "similar":
        from ovml.pipeline.clip import load_clip

        embeddings = load_clip(cfg.clip, cfg.device).encode_text(vocabulary.labels)
        similarity = embeddings @ embeddings.T
        np.fill_diagonal(similarity, -np.inf)
        neighbours = min(n - 1, max(8, 2 * cfg.max_labels))
        weights = np.zeros((n, n))
        nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :neighbours]
        np.put_along_axis(weights, nearest, 1.0, axis=1)
        return LabelSetSampler(vocabulary.labels, weights)
    return LabelSetSampler(vocabulary.labels, _cooccurrence_counts(Path(cfg.cooccurrence), vocabulary))


def _cooccurrence_counts(path: Path, vocabulary: Vocabulary) -> np.ndarray:
    """Pair counts from a tag file (one image per line, labels or their synonyms separated by commas)."""
    index = {label.lower(): i for i, label in enumerate(vocabulary.labels)}
    for label, names in vocabulary.synonyms.items():
        index.update({name.lower(): index[label.lower()] for name in names})
    counts = np.zeros((len(vocabulary.labels),) * 2)
    for line in path.read_text(encoding="utf-8").splitlines():
        present = sorted({index[t] for t in (" ".join(tag.split()).lower() for tag in line.split(",")) if t in index})
        for a in present:
            counts[a, present] += 1
    if not (counts - np.diag(np.diag(counts))).any():  # the diagonal counts lone labels, not pairs
        raise OvmlError(f"co-occurrence file {path} has no line with two vocabulary labels; "
                        "write one image per line with its labels separated by commas")
    return counts


@dataclass(frozen=True)
class CaptionPrompts:
    """One system prompt, worked examples as earlier chat turns, and request variants for diversity.

    Small models follow a format far better after seeing it answered. Everything before the final request
    is the same for every prompt, so llama.cpp reuses its cache for that prefix instead of re-reading it.
    """

    system: str
    examples: list[dict]
    variants: dict[str, str]

    @classmethod
    def load(cls) -> CaptionPrompts:
        data = json.loads(read_prompt_file(PROMPTS_FILE))
        return cls(data["system"], data["examples"], dict(sorted(data["variants"].items())))

    def messages(self, prompt_id: str, labels: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        turns = [("system", self.system)]
        for example in self.examples:
            turns += [("user", _fill(example["request"], example["labels"])),
                      ("assistant", json.dumps({"caption": example["caption"]}))]
        return (*turns, ("user", _fill(self.variants[prompt_id], labels)))


def _fill(template: str, labels: tuple[str, ...] | list[str]) -> str:
    named = labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]
    return string.Template(template).substitute(labels=named)


def _plan_round(tally: ShardTally, target: int, sampler: LabelSetSampler, prompt_ids: list[str],
                cfg: GenerateTextConfig, rng: np.random.Generator) -> list[PlannedPrompt]:
    """Prompts for every label short of `target`, scaled up by how often asked labels end up kept."""
    scale = 1 / max(tally.label_yield(), MIN_YIELD)
    position = {label: i for i, label in enumerate(sampler.labels)}
    remaining = {label: math.ceil(short * scale) for label, short in tally.shortfall(target).items()}
    anchors = [label for label, n in remaining.items() for _ in range(n)]
    plan = []
    for anchor in (anchors[i] for i in rng.permutation(len(anchors))):
        if remaining.get(anchor, 0) <= 0:
            continue
        size = min(int(rng.integers(cfg.min_labels, cfg.max_labels + 1)), len(sampler.labels))
        chosen = sampler.label_set(position[anchor], size, rng)
        labels = tuple(sampler.labels[i] for i in rng.permutation(chosen))
        for label in labels:
            if label in remaining:
                remaining[label] -= 1
        plan.append(PlannedPrompt(labels, prompt_ids[int(rng.integers(len(prompt_ids)))],
                                  int(rng.integers(2**31))))
    return plan


def _dedup_key(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _verify(raw: str, prompt: PlannedPrompt, matcher: MentionMatcher, seen_texts: set[str]
            ) -> tuple[str | None, str, list[str]]:
    """(drop reason or None, caption text, vocabulary labels the caption mentions)."""
    text = parse_caption(raw)
    if text is None:
        return "unparseable", "", []
    words = len(text.split())
    if words < MIN_WORDS:
        return "too_short", text, []
    if words > MAX_WORDS:
        return "too_long", text, []
    mentioned = matcher.mentions(text)
    if not set(mentioned) & set(prompt.labels):
        return "no_requested_label", text, []
    if _dedup_key(text) in seen_texts:
        return "duplicate", text, []
    return None, text, mentioned


def _generate_part(plan: list[PlannedPrompt], part: int, recipe: str, cfg: GenerateTextConfig,
                   backend: LlmBackend, prompts: CaptionPrompts, matcher: MentionMatcher, seen_texts: set[str],
                   on_answer) -> pa.Table:
    requests = [ChatRequest(prompts.messages(p.prompt_id, p.labels), p.seed) for p in plan]
    rows, dropped, seen = [], Counter(), set(seen_texts)
    for i, (prompt, raw) in enumerate(zip(plan, backend.complete(requests), strict=True)):
        reason, text, mentioned = _verify(raw, prompt, matcher, seen)
        if reason:
            dropped[reason] += 1
        else:
            seen.add(_dedup_key(text))
            rows.append({"caption_id": f"{cfg.shard_index}-{part}-{i}", "text": text, "labels": mentioned,
                         "requested": list(prompt.labels), "prompt_id": prompt.prompt_id,
                         "backend": backend.name, "model": backend.model, "seed": prompt.seed})
        on_answer(kept=reason is None)
    table = pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)
    metadata = {RECIPE_KEY: recipe, ROWS_KEY: _rows_digest(table), "ovml.requested": str(len(plan)),
                "ovml.asked_mentions": str(sum(len(p.labels) for p in plan)),
                "ovml.dropped": json.dumps({r: dropped[r] for r in DROP_REASONS})}
    return table.replace_schema_metadata(metadata)


def _rows_digest(table: pa.Table) -> str:
    return hashlib.sha256(json.dumps(table.select(CAPTION_SCHEMA.names).to_pydict(), sort_keys=True,
                                     ensure_ascii=False).encode()).hexdigest()


def _read_part(path: Path, shown: Path | None = None) -> pa.Table:
    """The part's rows, checked against the digest stamped in it; errors name `shown` (the pool's copy of a
    staged link) when given."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise OvmlError(f"{shown or path} is unreadable ({e}); delete it and run again to regenerate it") from None
    stamp = (table.schema.metadata or {}).get(ROWS_KEY)
    if stamp is not None and (set(CAPTION_SCHEMA.names) - set(table.column_names)
                              or stamp.decode() != _rows_digest(table)):
        raise OvmlError(f"{shown or path} was edited after generate-text wrote it (its rows no longer match the digest "
                        f"stamped in it); restore it, or delete it and run the same command again to regenerate "
                        f"only its captions (the rest of the pool is kept)")
    return table


def _part_recipe(path: Path) -> str | None:
    try:
        stamp = (pq.read_schema(path).metadata or {}).get(RECIPE_KEY)
    except (pa.ArrowInvalid, OSError) as e:
        raise OvmlError(f"{path} is unreadable ({e}); delete it and run again to regenerate it") from None
    return stamp.decode() if stamp else None


def _check_recorded(committed: Path, staged: Path, recorded: dict[str, str]) -> None:
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


def _carry_over(committed: Path, staged: Path, recipe: str) -> tuple[list[Path], dict[str, list[Path]]]:
    """Put the committed pool into the staged one: (parts kept, {recipe: parts set aside to the archive})."""
    kept, set_aside = [], {}
    for part in caption_parts(committed.parent):
        part_recipe = _part_recipe(part)
        if part_recipe in (None, recipe):
            atomic.link_or_copy(part, staged / part.name)
            kept.append(staged / part.name)
        else:
            atomic.link_or_copy(part, staged / ARCHIVE / part_recipe / part.name)
            set_aside.setdefault(part_recipe, []).append(part)
    archive = committed / ARCHIVE
    for old in sorted(archive.rglob("*.parquet")) if archive.is_dir() else []:
        atomic.link_or_copy(old, staged / ARCHIVE / old.relative_to(archive))
    return kept, set_aside


def _check_longest_prompt(backend: LlmBackend, prompts: CaptionPrompts, labels: list[str],
                          cfg: GenerateTextConfig) -> None:
    """A model with a known context (llama.cpp) must fit the longest prompt this run can send: checked first."""
    if not hasattr(backend, "tokens_needed"):
        return
    longest = tuple(sorted(labels, key=len, reverse=True)[:cfg.max_labels])
    variant = max(prompts.variants, key=lambda v: len(prompts.variants[v]))
    need = backend.tokens_needed(ChatRequest(prompts.messages(variant, longest), 0))
    if need > backend.context:
        raise OvmlError(f"a prompt naming the longest labels (such as {longest[0][:40]!r}..., {len(longest[0])} "
                        f"characters) needs {need} tokens with --max-tokens {cfg.max_tokens}, more than the model's "
                        f"{backend.context}-token context; shorten those labels or lower --max-labels")


def _open_checked(cfg: GenerateTextConfig, prompts: CaptionPrompts, labels: list[str]) -> LlmBackend | None:
    """The model opened (file loaded, server reached) and the longest prompt checked before any work, so a
    typo fails at once. On Ray the actors open their own copies and the driver's serves only these checks
    (so it is dropped: None); a vLLM engine is not opened here at all, it would take a GPU from the replicas."""
    if cfg.engine == "ray" and cfg.backend == "vllm":
        return None
    backend = open_backend(cfg.backend, cfg.model, cfg.base_url, _sampling(cfg), cfg.concurrency, cfg.extra_body,
                           cfg.threads)
    _check_longest_prompt(backend, prompts, labels, cfg)
    return None if cfg.engine == "ray" else backend


def _part_index(path: Path) -> int:
    return int(path.stem.removeprefix("part-"))


def _generate(cfg: GenerateTextConfig, vocabulary: Vocabulary, recipe: str, committed: Path, out_dir: Path,
              recorded: dict[str, str]) -> dict:
    """Top the pool up to --per-label; parts of this recipe already in the pool count and are kept."""
    if not cfg.force:
        _check_recorded(committed, out_dir, recorded)
    kept, set_aside = ([], {}) if cfg.force else _carry_over(committed, out_dir, recipe)
    atomic.write_json(out_dir.parent / VOCABULARY, vocabulary.as_json())
    prompts = CaptionPrompts.load()
    matcher = MentionMatcher(vocabulary)
    sampler = _sampler(cfg, vocabulary)
    target = math.ceil(cfg.per_label / cfg.num_shards)
    tally = ShardTally(vocabulary.labels)
    for part in kept:
        tally.add_part(_read_part(part, committed / part.name))
    # New parts go after every kept one; index mod num_shards stays the shard's, so shards never collide.
    base = math.ceil((max(map(_part_index, kept), default=-1) + 1) / cfg.num_shards)
    backend = _open_checked(cfg, prompts, vocabulary.labels) if tally.shortfall(target) else None
    ray_answers: _Answers | None = None  # the last part's answers from Ray: its model and dialect
    part = added = 0
    round_index = 0
    with progress_bar(TextColumn("prompts, {task.fields[kept]} kept, {task.fields[rate]}")) as progress:
        task = progress.add_task("generate-text", total=0, kept=tally.kept, rate="")
        started, kept_on_disk, kept_here = time.perf_counter(), tally.kept, 0

        def on_answer(kept: bool) -> None:
            nonlocal kept_here
            kept_here += kept
            rate = kept_here / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=1, kept=kept_on_disk + kept_here, rate=f"{rate:.2f} kept captions/s")

        for round_index in range(cfg.max_rounds + 1):
            if not tally.shortfall(target):
                break
            if round_index == cfg.max_rounds:
                raise _stalled(tally, target, cfg)
            rng = np.random.default_rng([cfg.seed, cfg.shard_index, round_index])
            plan = _plan_round(tally, target, sampler, list(prompts.variants), cfg, rng)
            progress.update(task, total=progress.tasks[task].total + len(plan))
            chunks = [plan[start:start + cfg.part_size] for start in range(0, len(plan), cfg.part_size)]
            paths = [out_dir / part_name((base + part + k) * cfg.num_shards + cfg.shard_index)
                     for k in range(len(chunks))]
            missing = {k: chunk for k, (chunk, path) in enumerate(zip(chunks, paths, strict=True)) if not path.exists()}
            on_ray = _RayRound(cfg, prompts, missing) if cfg.engine == "ray" else None
            for k, (chunk, path) in enumerate(zip(chunks, paths, strict=True)):
                if path.exists():
                    table = _read_part(path)
                    kept_on_disk += table.num_rows
                    progress.update(task, advance=len(chunk), kept=kept_on_disk + kept_here)
                else:
                    ray_answers = on_ray.answers(k) if on_ray else None
                    table = _generate_part(chunk, base + part + k, recipe, cfg, ray_answers or backend, prompts,
                                           matcher, tally.seen_texts, on_answer)
                    atomic.write_parquet(path, table)
                tally.add_part(table)
                added += table.num_rows
            part += len(chunks)
            if on_ray:
                on_ray.close()
    for extra in caption_parts(out_dir.parent)[len(kept) + part:]:  # staged by an attempt that asked for more
        table = _read_part(extra)
        tally.add_part(table)
        added += table.num_rows
    summary = tally.summary(round_index, len(caption_parts(out_dir.parent)))
    summary["pool"] = {"recipe": recipe, "kept": tally.kept - added, "added": added,
                       "set_aside": sum(pq.ParquetFile(p).metadata.num_rows for ps in set_aside.values() for p in ps),
                       "archive": [f"{CAPTIONS}/{ARCHIVE}/{r}" for r in sorted(set_aside)]}
    if not added and kept:
        summary["pool"]["note"] = (f"the pool already has --per-label {cfg.per_label}; nothing generated, "
                                   f"all {tally.kept} captions kept (only --force deletes captions)")
    answered_by = ray_answers or backend
    if getattr(answered_by, "dialect", None):  # the structured-output dialect the OpenAI-compatible server took
        summary["structured_output"] = answered_by.dialect
    return summary


def _sampling(cfg: GenerateTextConfig) -> Sampling:
    return Sampling(cfg.temperature, cfg.top_p, cfg.max_tokens)


class _RayRound:
    """A round's missing parts generated on Ray all at once, handed to the part loop in plan order.

    Actors only generate; verification and dedup stay in the part loop, part after part, so the kept
    captions are those of the local engine. Answers that arrive early wait here for their turn.
    """

    def __init__(self, cfg: GenerateTextConfig, prompts: CaptionPrompts, chunks: dict[int, list[PlannedPrompt]]):
        requests = {k: [ChatRequest(prompts.messages(p.prompt_id, p.labels), p.seed) for p in chunk]
                    for k, chunk in chunks.items()}
        self._stream = ray_chat(requests, cfg.backend, cfg.model, cfg.base_url, _sampling(cfg), cfg.concurrency,
                                cfg.extra_body, cfg.threads, address=cfg.ray_address, actors=cfg.ray_actors
                                ) if requests else None
        self._arrived: dict[int, _Answers] = {}
        self.backend = cfg.backend

    def answers(self, k: int) -> _Answers:
        while k not in self._arrived:
            unit, raw, model, dialect = next(self._stream)
            self._arrived[unit] = _Answers(self.backend, model, raw, dialect)
        return self._arrived.pop(k)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


@dataclass
class _Answers:
    """One part's answers from Ray, in the shape of an LlmBackend for `_generate_part`."""

    name: str
    model: str
    raw: list[str]
    dialect: str | None

    def complete(self, requests: list[ChatRequest]):
        return iter(self.raw)


def _stalled(tally: ShardTally, target: int, cfg: GenerateTextConfig) -> OvmlError:
    short = sorted(tally.shortfall(target))
    names = ", ".join(short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
    return OvmlError(f"after {cfg.max_rounds} rounds, {len(short)} labels still have fewer than {target} kept "
                     f"captions ({names}); the model rarely mentions them: add synonyms to the labels file, "
                     "lower --per-label or raise --max-rounds, then run again to resume")
