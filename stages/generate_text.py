"""generate-text: an LLM writes captions that mention several labels -> captions/part-*.parquet.

Work goes in rounds: a round plans prompts for every label still short of its quota, in parts of
`part_size` prompts; each part is written atomically once all its answers are in. A round's plan is a
pure function of the seed and of the parts already written, so a killed run replays the plans over the
parts on disk, keeps them, and generates only what is missing: the same rows as an uninterrupted run.
Shards split the quota (each covers ceil(per_label / num_shards) per label) and number their parts
apart (part number = shard_index mod num_shards), so their captions/ folders merge by copying.

The caption pool only grows unless asked. The settings that change how a caption is made form its recipe:
backend, model (the default's file name when none is given), prompts file, temperature, top_p, max_tokens,
sampling (and its co-occurrence file or CLIP model), min/max labels, the vocabulary, seed and extra_body; how many
captions (per_label) and who makes them (base_url, concurrency, threads, max_rounds, part_size) are not part of
it, and base_url, concurrency, threads, max_rounds and part_size do not even make the stage run again. Raising
--per-label tops the pool up, lowering it keeps every row; only --force deletes captions (it builds a new pool
from nothing, which replaces the old one when complete; a killed --force attempt is never resumed by a plain
run). The pool's rules (recipe stamps, the archive, edited parts) are in pipeline/caption_pool.py; what is asked
of the LLM in pipeline/caption_prompts.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import TextColumn

from ovml.pipeline import atomic
from ovml.pipeline.artifacts import CAPTIONS, VOCABULARY, caption_parts, part_name
from ovml.pipeline.caption_pool import (
    ARCHIVE,
    CAPTION_SCHEMA,
    DROP_REASONS,
    RECIPE_KEY,
    ROWS_KEY,
    ShardTally,
    carry_over,
    check_recorded,
    dedup_key,
    part_index,
    read_part,
    rows_digest,
)
from ovml.pipeline.caption_prompts import (
    PROMPTS_FILE,
    CaptionPrompts,
    LabelSetSampler,
    PlannedPrompt,
    cooccurrence_counts,
    plan_round,
)
from ovml.pipeline.engine import UNIT, check_engine, open_engine
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.llm import (
    SMOLLM2_GGUF,
    ChatRequest,
    LlmWorker,
    LongestPrompt,
    Sampling,
    check_gguf,
    llama_cpp_threads,
    parse_caption,
)
from ovml.pipeline.paths import input_file
from ovml.pipeline.progress import progress_bar
from ovml.pipeline.rundir import RunDir, StageOutcome, run_stage
from ovml.pipeline.settings import GenerateTextConfig, as_params, check_settings
from ovml.pipeline.vocabulary import MentionMatcher, Vocabulary, load_vocabulary
from ovml.prompts import read_prompt_file

NOT_RECIPE = ("labels", "dataset_root", "cooccurrence", "per_label", "num_shards", "shard_index")
MIN_WORDS = 3  # "dog beach" is a tag list, not a caption
MAX_WORDS = 40  # longer answers are rambling past the requested single sentence


def generate_text(cfg: GenerateTextConfig) -> StageOutcome:
    vocabulary = check(cfg)
    run_dir = RunDir(cfg.run_dir)
    if cfg.sampling == "similar":  # the only sampler that embeds
        cfg = replace(cfg, clip=run_dir.clip(cfg.clip))
    params = as_params(cfg)
    params["prompts_sha256"] = hashlib.sha256(read_prompt_file(PROMPTS_FILE).encode()).hexdigest()
    default_model = SMOLLM2_GGUF if cfg.backend == "llama-cpp" and not cfg.model else None
    if default_model:  # a new default model is a new recipe: the stage runs again
        params["default_model"] = default_model
    inputs = list(vocabulary.sources)
    models = {"llm": cfg.model or default_model or "served by base_url"}
    if cfg.sampling == "cooccurrence":
        inputs.append(Path(cfg.cooccurrence))
    if cfg.sampling == "similar":
        models["clip"] = cfg.clip
    else:
        del params["clip"]
    recipe = _recipe(params, vocabulary, cfg)

    def body(out: Path, resume: bool) -> dict:
        recorded = (run_dir.stage_record("generate_text") or {}).get("outputs", {})
        with open_engine(cfg.engine, address=cfg.ray_address, actors=cfg.ray_actors) as engine:  # for all rounds
            return _generate(cfg, engine, vocabulary, recipe, run_dir / CAPTIONS, out / CAPTIONS, recorded)

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
    if cfg.backend == "llama-cpp":
        check_gguf(cfg.model)
        llama_cpp_threads(cfg.threads, cfg.engine == "ray")
    if cfg.sampling == "cooccurrence":
        tag_file = "a tag file, one image per line, labels separated by commas"
        if not cfg.cooccurrence:
            raise OvmlError(f"--sampling cooccurrence needs --cooccurrence FILE ({tag_file})")
        input_file(cfg.cooccurrence, "--cooccurrence file", f"pass {tag_file}")
    if cfg.sampling == "similar":
        from ovml.pipeline.clip import check_run_clip

        check_run_clip(cfg.run_dir, cfg.clip, cfg.device)
    return load_vocabulary(cfg.labels, cfg.dataset_root)


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
    return LabelSetSampler(vocabulary.labels, cooccurrence_counts(Path(cfg.cooccurrence), vocabulary))


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
    if dedup_key(text) in seen_texts:
        return "duplicate", text, []
    return None, text, mentioned


def _generate_part(plan: list[PlannedPrompt], part: int, recipe: str, cfg: GenerateTextConfig,
                   answers: Iterator[dict], matcher: MentionMatcher, seen_texts: set[str], on_answer) -> pa.Table:
    """One part from its prompts' answers (rows of LlmWorker, in plan order), verified as they arrive."""
    rows, dropped, seen = [], Counter(), set(seen_texts)
    for i, (prompt, answer) in enumerate(zip(plan, answers, strict=True)):
        reason, text, mentioned = _verify(answer["raw"], prompt, matcher, seen)
        if reason:
            dropped[reason] += 1
        else:
            seen.add(dedup_key(text))
            rows.append({"caption_id": f"{cfg.shard_index}-{part}-{i}", "text": text, "labels": mentioned,
                         "requested": list(prompt.labels), "prompt_id": prompt.prompt_id,
                         "backend": answer["backend"], "model": answer["model"], "seed": prompt.seed})
        on_answer(kept=reason is None)
    table = pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)
    metadata = {RECIPE_KEY: recipe, ROWS_KEY: rows_digest(table), "ovml.requested": str(len(plan)),
                "ovml.asked_mentions": str(sum(len(p.labels) for p in plan)),
                "ovml.dropped": json.dumps({r: dropped[r] for r in DROP_REASONS})}
    return table.replace_schema_metadata(metadata)


def _longest_prompt(prompts: CaptionPrompts, labels: list[str], cfg: GenerateTextConfig) -> LongestPrompt:
    """The longest prompt this run can send: the worker checks it against its model's context before any work."""
    longest = tuple(sorted(labels, key=len, reverse=True)[:cfg.max_labels])
    variant = max(prompts.variants, key=lambda v: len(prompts.variants[v]))
    return LongestPrompt(ChatRequest(prompts.messages(variant, longest), 0), longest[0])


def _generate(cfg: GenerateTextConfig, engine, vocabulary: Vocabulary, recipe: str, committed: Path, out_dir: Path,
              recorded: dict[str, str]) -> dict:
    """Top the pool up to --per-label; parts of this recipe already in the pool count and are kept."""
    if not cfg.force:
        check_recorded(committed, out_dir, recorded)
    kept, set_aside = ([], {}) if cfg.force else carry_over(committed, out_dir, recipe)
    atomic.write_json(out_dir.parent / VOCABULARY, vocabulary.as_json())
    prompts = CaptionPrompts.load()
    matcher = MentionMatcher(vocabulary)
    sampler = _sampler(cfg, vocabulary)
    target = math.ceil(cfg.per_label / cfg.num_shards)
    tally = ShardTally(vocabulary.labels)
    for part in kept:
        tally.add_part(read_part(part, committed / part.name))
    # New parts go after every kept one; index mod num_shards stays the shard's, so shards never collide.
    base = math.ceil((max(map(part_index, kept), default=-1) + 1) / cfg.num_shards)
    threads = llama_cpp_threads(cfg.threads, cfg.engine == "ray")
    worker_args = (cfg.backend, cfg.model, cfg.base_url, _sampling(cfg), cfg.concurrency, cfg.extra_body,
                   threads, _longest_prompt(prompts, vocabulary.labels, cfg))
    dialects: set[str] = set()  # the structured-output dialects the OpenAI-compatible server took
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
            plan = plan_round(tally, target, sampler, list(prompts.variants), cfg, rng)
            progress.update(task, total=progress.tasks[task].total + len(plan))
            chunks = [plan[start:start + cfg.part_size] for start in range(0, len(plan), cfg.part_size)]
            paths = [out_dir / part_name((base + part + k) * cfg.num_shards + cfg.shard_index)
                     for k in range(len(chunks))]
            missing = {k: chunk for k, (chunk, path) in enumerate(zip(chunks, paths, strict=True)) if not path.exists()}
            items = [{UNIT: k, "index": i, "messages": json.dumps(prompts.messages(p.prompt_id, p.labels)),
                      "head": prompts.head(p.prompt_id), "seed": p.seed}
                     for k, chunk in missing.items() for i, p in enumerate(chunk)]
            answered = engine.map(LlmWorker, worker_args, items,
                                  batch_size=LlmWorker.items_per_call(cfg.backend, cfg.concurrency, threads))
            for k, (chunk, path) in enumerate(zip(chunks, paths, strict=True)):
                if path.exists():
                    table = read_part(path)
                    kept_on_disk += table.num_rows
                    progress.update(task, advance=len(chunk), kept=kept_on_disk + kept_here)
                else:
                    unit, tables = next(answered)
                    assert unit == k, (unit, k)
                    answers = _answers(tables, dialects)
                    table = _generate_part(chunk, base + part + k, recipe, cfg, answers, matcher, tally.seen_texts,
                                           on_answer)
                    atomic.write_parquet(path, table)
                tally.add_part(table)
                added += table.num_rows
            part += len(chunks)
            answered.close()
    for extra in caption_parts(out_dir.parent)[len(kept) + part:]:  # staged by an attempt that asked for more
        table = read_part(extra)
        tally.add_part(table)
        added += table.num_rows
    summary = tally.summary(round_index, len(caption_parts(out_dir.parent)))
    summary["pool"] = {"recipe": recipe, "kept": tally.kept - added, "added": added,
                       "set_aside": sum(pq.ParquetFile(p).metadata.num_rows for ps in set_aside.values() for p in ps),
                       "archive": [f"{CAPTIONS}/{ARCHIVE}/{r}" for r in sorted(set_aside)]}
    if not added and kept:
        summary["pool"]["note"] = (f"the pool already has --per-label {cfg.per_label}; nothing generated, "
                                   f"all {tally.kept} captions kept (only --force deletes captions)")
    if dialects:  # the structured-output dialect the OpenAI-compatible server took
        summary["structured_output"] = ", ".join(sorted(dialects))
    return summary


def _sampling(cfg: GenerateTextConfig) -> Sampling:
    return Sampling(cfg.temperature, cfg.top_p, cfg.max_tokens, max_words=MAX_WORDS)


def _answers(tables: Iterator[pa.Table], dialects: set[str]) -> Iterator[dict]:
    """A part's answer rows as the engine streams them, noting the structured-output dialect each was given in."""
    for table in tables:
        for answer in table.to_pylist():
            if answer["dialect"]:
                dialects.add(answer["dialect"])
            yield answer


def _stalled(tally: ShardTally, target: int, cfg: GenerateTextConfig) -> OvmlError:
    """The labels still short, what became of the answers, and the fix for the commonest drop."""
    short = sorted(tally.shortfall(target))
    names = ", ".join(short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
    dropped = {reason: n for reason, n in tally.dropped.items() if n}
    counts = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(dropped.items(), key=lambda x: -x[1]))
    if dropped.get("unparseable", 0) > tally.kept:  # answers cut off at --max-tokens are unterminated
        fix = f"most answers were cut off: raise --max-tokens (now {cfg.max_tokens}) and run again"
    else:
        fix = ("the model rarely mentions them: add synonyms to the labels file, lower --per-label or raise "
               "--max-rounds, then run again to resume")
    return OvmlError(f"after {cfg.max_rounds} rounds, {len(short)} labels still have fewer than {target} kept "
                     f"captions ({names}); {tally.kept} of {tally.requested} answers kept"
                     + (f" (dropped: {counts})" if counts else "") + f"; {fix}")
