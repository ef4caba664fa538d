"""generate-text stage logic with a scripted LLM (the real SmolLM2 runs in test_generate_text_llm.py).

The scripted backend answers from the labels named in the prompt, so these tests control exactly what
the "model" says: broken JSON, omitted labels, repeats, and an interruption at a chosen request.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import ovml.pipeline.llm as llm
import ovml.stages.generate_text as stage
from ovml import cli
from ovml.pipeline.clip import load_clip
from ovml.pipeline.errors import OvmlError
from ovml.pipeline.llm import ChatRequest
from ovml.pipeline.vocabulary import MentionMatcher, parse_vocabulary

LABELS = ["dog", "cat", "car", "tree", "boat", "horse", "chair", "bicycle"]


class ScriptedBackend:
    """Answers `script(labels named in the prompt, seed)`; raises KeyboardInterrupt at answer `interrupt_at`."""

    name = "scripted"
    model = "script-1"

    def __init__(self, script: Callable[[list[str], int], str], interrupt_at: int | None = None,
                 vocabulary: list[str] = LABELS):
        self.script = script
        self.interrupt_at = interrupt_at
        self.matcher = MentionMatcher(parse_vocabulary("\n".join(vocabulary)))
        self.answers: list[str] = []

    def complete(self, requests: list[ChatRequest]) -> Iterator[str]:
        for request in requests:
            if len(self.answers) == self.interrupt_at:
                raise KeyboardInterrupt
            self.answers.append(self.script(self.matcher.mentions(request.messages[-1][1]), request.seed))
            yield self.answers[-1]


def faithful(labels: list[str], seed: int) -> str:
    return json.dumps({"caption": f"A photo of {' and '.join(labels)}, take {seed}."})


@pytest.fixture
def labels_file(tmp_path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def use_backend(monkeypatch) -> Callable[[ScriptedBackend], ScriptedBackend]:
    def install(backend: ScriptedBackend) -> ScriptedBackend:
        monkeypatch.setattr(llm, "open_backend", lambda *args, **kwargs: backend)  # what the engine's worker opens
        return backend

    return install


def config(labels_file: Path, run_dir: Path, **overrides) -> stage.GenerateTextConfig:
    return stage.GenerateTextConfig(run_dir=run_dir, labels=str(labels_file), **{"per_label": 3, "part_size": 4,
                                                                                 **overrides})


def read_captions(run_dir: Path):
    return pq.read_table(sorted((run_dir / "captions").glob("part-*.parquet"))).to_pylist()


def part_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "captions").glob("part-*.parquet"))}


def staged_part_bytes(run_dir: Path) -> dict[str, bytes]:
    """Parts an unfinished attempt wrote: beside the pool, not in it, until the attempt completes."""
    return {p.name: p.read_bytes() for p in sorted((run_dir / ".staging").rglob("part-*.parquet"))}


def test_every_label_reaches_per_label_kept_captions(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run"))
    per_label = Counter(label for row in read_captions(tmp_path / "run") for label in row["labels"])
    assert set(per_label) == set(LABELS)
    assert min(per_label.values()) >= 3


def test_rows_follow_the_artifact_schema(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run"))
    rows = read_captions(tmp_path / "run")
    assert pq.read_schema(next((tmp_path / "run" / "captions").glob("part-*.parquet"))).names == \
        ["caption_id", "text", "labels", "requested", "prompt_id", "backend", "model", "seed"]
    assert len({row["caption_id"] for row in rows}) == len(rows)
    prompt_ids = set(json.loads(stage.read_prompt_file(stage.PROMPTS_FILE))["variants"])
    for row in rows:
        assert set(row["labels"]) <= set(row["requested"]) and row["labels"]
        assert row["prompt_id"] in prompt_ids
        assert (row["backend"], row["model"]) == ("scripted", "script-1")


def test_vocabulary_json_keeps_the_file_order_and_synonyms(tmp_path, use_backend):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("tree\ndog: puppy\ncat\n", encoding="utf-8")
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run", per_label=1))
    written = json.loads((tmp_path / "run" / "captions" / "vocabulary.json").read_text())
    assert written == {"labels": ["tree", "dog", "cat"], "synonyms": {"dog": ["puppy"]}}


def test_malformed_answers_are_dropped_and_counted_not_fatal(tmp_path, labels_file, use_backend):
    def sometimes_broken(labels: list[str], seed: int) -> str:
        return '{"caption": "A photo of' if seed % 3 == 0 else faithful(labels, seed)

    backend = use_backend(ScriptedBackend(sometimes_broken))
    outcome = stage.generate_text(config(labels_file, tmp_path / "run"))
    broken = sum(answer.endswith("photo of") for answer in backend.answers)
    assert broken > 0
    assert outcome.summary["dropped"]["unparseable"] == broken
    assert outcome.summary["kept"] == len(read_captions(tmp_path / "run")) == len(backend.answers) - broken


def test_each_drop_reason_is_counted(tmp_path, labels_file, use_backend):
    def flawed(labels: list[str], seed: int) -> str:
        return [json.dumps({"caption": "Dog."}),  # too short
                json.dumps({"caption": "word " * 60}),  # too long
                json.dumps({"caption": "An empty street at night."}),  # no requested label
                json.dumps({"caption": f"A photo of {labels[0]}."}),  # repeats once per label
                faithful(labels, seed)][seed % 5]

    backend = use_backend(ScriptedBackend(flawed))
    outcome = stage.generate_text(config(labels_file, tmp_path / "run"))
    dropped = outcome.summary["dropped"]
    assert all(dropped[reason] > 0 for reason in ("too_short", "too_long", "no_requested_label", "duplicate"))
    assert sum(dropped.values()) + outcome.summary["kept"] == outcome.summary["requested"] == len(backend.answers)
    texts = [row["text"] for row in read_captions(tmp_path / "run")]
    assert len(texts) == len(set(texts))


def test_summary_is_recorded_in_the_manifest(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    outcome = stage.generate_text(config(labels_file, tmp_path / "run"))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    recorded = manifest["stages"]["generate_text"]["summary"]
    assert recorded == json.loads(json.dumps(outcome.summary))
    assert recorded["captions_per_label"]["min"] >= 3
    assert recorded["distinct_ratio"] == 1.0


def test_interrupted_run_resumes_to_the_same_parts_as_an_uninterrupted_one(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    straight = stage.generate_text(config(labels_file, tmp_path / "straight"))
    use_backend(ScriptedBackend(faithful, interrupt_at=6))
    with pytest.raises(KeyboardInterrupt):
        stage.generate_text(config(labels_file, tmp_path / "resumed"))
    assert part_bytes(tmp_path / "resumed") == {}
    parts_before = staged_part_bytes(tmp_path / "resumed")
    assert 0 < len(parts_before) < len(part_bytes(tmp_path / "straight"))
    resumed_backend = use_backend(ScriptedBackend(faithful))
    resumed = stage.generate_text(config(labels_file, tmp_path / "resumed"))
    assert part_bytes(tmp_path / "resumed") == part_bytes(tmp_path / "straight")
    assert resumed.summary == straight.summary
    assert len(resumed_backend.answers) == straight.summary["requested"] - 4 * len(parts_before)


def test_unchanged_rerun_is_skipped_without_calling_the_model(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run"))
    backend = use_backend(ScriptedBackend(faithful))
    assert stage.generate_text(config(labels_file, tmp_path / "run")).status == "skipped"
    assert backend.answers == []


def test_shards_split_the_work_into_disjoint_mergeable_parts(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    for shard in (0, 1):
        stage.generate_text(config(labels_file, tmp_path / f"shard{shard}", num_shards=2, shard_index=shard))
    names = [set(part_bytes(tmp_path / f"shard{shard}")) for shard in (0, 1)]
    assert names[0] and names[1] and not names[0] & names[1]
    rows = read_captions(tmp_path / "shard0") + read_captions(tmp_path / "shard1")
    assert len({row["caption_id"] for row in rows}) == len(rows)
    assert len({row["text"] for row in rows}) == len(rows)
    per_label = Counter(label for row in rows for label in row["labels"])
    assert min(per_label[label] for label in LABELS) >= 3


def test_same_seed_reproduces_the_same_prompts_and_another_seed_does_not(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    requested = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        stage.generate_text(config(labels_file, tmp_path / name, seed=seed))
        requested[name] = [(row["requested"], row["prompt_id"]) for row in read_captions(tmp_path / name)]
    assert requested["a"] == requested["b"] != requested["c"]


def test_a_label_the_model_never_mentions_stops_after_max_rounds(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(lambda labels, seed: faithful([x for x in labels if x != "horse"] or ["dog"], seed)))
    with pytest.raises(OvmlError, match="after 3 rounds, 1 labels still have fewer than 3 kept captions \\(horse\\)"):
        stage.generate_text(config(labels_file, tmp_path / "run", max_rounds=3))


def test_a_run_whose_answers_are_cut_off_says_to_raise_max_tokens(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(lambda labels, seed: '{"caption": "A ' + labels[0]))  # unterminated, as cut off
    with pytest.raises(OvmlError, match=r"0 of \d+ answers kept \(dropped: \d+ unparseable\); most answers were "
                                        r"cut off: raise --max-tokens \(now \d+\)"):
        stage.generate_text(config(labels_file, tmp_path / "run", max_rounds=2))


def test_cooccurrence_sampling_pairs_labels_seen_together(tmp_path, labels_file, use_backend):
    tags = tmp_path / "tags.txt"
    tags.write_text("dog, cat\ncar, tree\nboat, horse\nchair, bicycle\ndog,cat,unknown tag\n", encoding="utf-8")
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run", sampling="cooccurrence", cooccurrence=str(tags),
                               min_labels=2, max_labels=2))
    pairs = {frozenset(row["requested"]) for row in read_captions(tmp_path / "run")}
    assert pairs == {frozenset(p) for p in (("dog", "cat"), ("car", "tree"), ("boat", "horse"), ("chair", "bicycle"))}


def test_cooccurrence_file_without_a_pair_of_labels_is_a_one_line_error(tmp_path, labels_file, use_backend):
    tags = tmp_path / "tags.txt"
    tags.write_text("dog\ncat\ncar, unknown tag\n", encoding="utf-8")
    use_backend(ScriptedBackend(faithful))
    with pytest.raises(OvmlError, match="no line with two vocabulary labels"):
        stage.generate_text(config(labels_file, tmp_path / "run", sampling="cooccurrence", cooccurrence=str(tags)))


def test_similar_sampling_draws_companions_from_the_nearest_labels(tmp_path, use_backend, tiny_clip):
    many = LABELS + ["bird", "sheep", "cow", "kite", "truck", "bench"]
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(many) + "\n", encoding="utf-8")
    use_backend(ScriptedBackend(faithful, vocabulary=many))
    stage.generate_text(config(labels_file, tmp_path / "run", sampling="similar", clip=tiny_clip, device="cpu",
                               min_labels=2, max_labels=2, per_label=2))
    embeddings = load_clip(tiny_clip, "cpu").encode_text(many)
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = {many[i]: {many[j] for j in np.argsort(-similarity[i], kind="stable")[:8]} for i in range(len(many))}
    for row in read_captions(tmp_path / "run"):
        a, b = row["requested"]
        assert b in nearest[a] or a in nearest[b]


def test_cli_reports_a_missing_labels_file_in_one_line(tmp_path):
    result = CliRunner().invoke(cli.app, ["generate-text", "--labels", str(tmp_path / "missing.txt"),
                                          "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert "Traceback" not in result.output


def test_cli_reports_threads_below_one_in_one_line_before_loading_a_model(tmp_path, labels_file):
    result = CliRunner().invoke(cli.app, ["generate-text", "--labels", str(labels_file), "--threads", "0",
                                          "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "--threads must be at least 1, got 0" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "captions").exists()


def rows_by_id(run_dir: Path) -> dict[str, dict]:
    return {row["caption_id"]: row for row in read_captions(run_dir)}


def test_raising_per_label_tops_up_keeping_every_row_and_id(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run", per_label=2))
    before, old_parts = rows_by_id(tmp_path / "run"), part_bytes(tmp_path / "run")
    outcome = stage.generate_text(config(labels_file, tmp_path / "run", per_label=4))
    after, new_parts = rows_by_id(tmp_path / "run"), part_bytes(tmp_path / "run")
    assert {k: new_parts[k] for k in old_parts} == old_parts
    assert min(new_parts.keys() - old_parts.keys()) > max(old_parts)
    assert {k: after[k] for k in before} == before and len(after) > len(before)
    assert outcome.summary["pool"]["kept"] == len(before)
    assert outcome.summary["pool"]["added"] == len(after) - len(before)
    assert min(Counter(label for row in after.values() for label in row["labels"]).values()) >= 4


def test_lowering_per_label_keeps_every_row_and_says_so(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run", per_label=3))
    before = part_bytes(tmp_path / "run")
    backend = use_backend(ScriptedBackend(faithful))
    outcome = stage.generate_text(config(labels_file, tmp_path / "run", per_label=1))
    assert part_bytes(tmp_path / "run") == before and backend.answers == []
    assert "nothing generated" in outcome.summary["pool"]["note"]


@pytest.mark.parametrize("setting", [{"base_url": "http://other-host:8000/v1"}, {"concurrency": 9},
                                     {"max_rounds": 7}, {"part_size": 2}])
def test_settings_that_do_not_change_how_captions_are_made_do_not_rerun(tmp_path, labels_file, use_backend,
                                                                        setting):
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run", backend="openai", base_url="http://host:8000/v1"))
    outcome = stage.generate_text(config(labels_file, tmp_path / "run", backend="openai",
                                         **{"base_url": "http://host:8000/v1", **setting}))
    assert outcome.status == "skipped"


def test_a_recipe_change_sets_the_old_parts_aside_and_makes_new_ones(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    first = stage.generate_text(config(labels_file, tmp_path / "run"))
    old_parts = part_bytes(tmp_path / "run")
    outcome = stage.generate_text(config(labels_file, tmp_path / "run", temperature=0.3))
    pool = outcome.summary["pool"]
    archive = tmp_path / "run" / pool["archive"][0]
    assert archive.parent == tmp_path / "run" / "captions" / "archive"
    assert {p.name: p.read_bytes() for p in archive.glob("part-*.parquet")} == old_parts
    assert pool["set_aside"] == first.summary["kept"] and pool["kept"] == 0 and pool["added"] > 0
    assert pool["recipe"] != first.summary["pool"]["recipe"]


def test_a_new_default_model_sets_the_old_defaults_captions_aside(tmp_path, labels_file, use_backend, monkeypatch):
    """The default LLM changed once (SmolLM2 Q4_1 -> Q8_0): a pool the old default began is not topped up with
    captions of the new one."""
    use_backend(ScriptedBackend(faithful))
    first = stage.generate_text(config(labels_file, tmp_path / "run"))
    monkeypatch.setattr(stage, "SMOLLM2_GGUF", "another-default.gguf")
    pool = stage.generate_text(config(labels_file, tmp_path / "run")).summary["pool"]
    assert pool["set_aside"] == first.summary["kept"] and pool["kept"] == 0
    assert pool["recipe"] != first.summary["pool"]["recipe"]


def test_archived_parts_survive_later_recipe_changes(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    for temperature in (0.8, 0.3, 0.5):
        stage.generate_text(config(labels_file, tmp_path / "run", temperature=temperature))
    assert len(list((tmp_path / "run" / "captions" / "archive").iterdir())) == 2


def two_shards_merged_into_shard0(tmp_path: Path, labels_file: Path, use_backend) -> None:
    """Shards 0 and 1 generated apart, then shard 1's parts copied into shard 0's captions/ (a manual merge)."""
    use_backend(ScriptedBackend(faithful))
    for shard in (0, 1):
        stage.generate_text(config(labels_file, tmp_path / f"shard{shard}", num_shards=2, shard_index=shard))
    for part in (tmp_path / "shard1" / "captions").glob("part-*.parquet"):
        (tmp_path / "shard0" / "captions" / part.name).write_bytes(part.read_bytes())


def test_parts_merged_from_another_shard_are_kept_and_counted(tmp_path, labels_file, use_backend):
    two_shards_merged_into_shard0(tmp_path, labels_file, use_backend)
    merged = part_bytes(tmp_path / "shard0")
    backend = use_backend(ScriptedBackend(faithful))
    outcome = stage.generate_text(config(labels_file, tmp_path / "shard0"))
    assert part_bytes(tmp_path / "shard0") == merged and backend.answers == []
    assert outcome.summary["pool"]["kept"] == len(read_captions(tmp_path / "shard0"))


def test_a_part_written_by_another_tool_is_kept_and_counted_as_its_rows(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run"))
    rows = read_captions(tmp_path / "run")
    for row in rows:
        row["caption_id"] = "hand-" + row["caption_id"]
    # Same schema, no ovml counters in its metadata: a part merged in from elsewhere.
    merged_in = tmp_path / "run" / "captions" / "part-90000.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=stage.CAPTION_SCHEMA), merged_in)
    outcome = stage.generate_text(config(labels_file, tmp_path / "run", per_label=4))
    assert outcome.status == "ran" and outcome.summary["pool"]["kept"] == 2 * len(rows)
    assert len(read_captions(tmp_path / "run")) >= 2 * len(rows)


def test_only_force_deletes_captions(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run", per_label=4))
    stage.generate_text(config(labels_file, tmp_path / "run", temperature=0.3, per_label=4))
    stage.generate_text(config(labels_file, tmp_path / "run", per_label=1, force=True))
    stage.generate_text(config(labels_file, tmp_path / "fresh", per_label=1))
    assert part_bytes(tmp_path / "run") == part_bytes(tmp_path / "fresh")
    assert not (tmp_path / "run" / "captions" / "archive").exists()


def test_a_stalled_run_resumes_as_its_message_says(tmp_path, labels_file, use_backend):
    def rarely_horse(labels: list[str], seed: int) -> str:
        return faithful([x for x in labels if x != "horse" or seed % 4 == 0] or ["dog"], seed)

    use_backend(ScriptedBackend(rarely_horse))
    with pytest.raises(OvmlError, match="lower --per-label or raise --max-rounds, then run again to resume"):
        stage.generate_text(config(labels_file, tmp_path / "run", max_rounds=1))
    staged = staged_part_bytes(tmp_path / "run")
    assert staged and not (tmp_path / "run" / "captions").exists()
    stage.generate_text(config(labels_file, tmp_path / "run", max_rounds=20))
    assert {k: part_bytes(tmp_path / "run")[k] for k in staged} == staged


def test_a_failing_backend_leaves_the_previous_pool_intact(tmp_path, labels_file, use_backend):
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run"))
    before = part_bytes(tmp_path / "run")
    use_backend(ScriptedBackend(faithful, interrupt_at=5))
    with pytest.raises(KeyboardInterrupt):
        stage.generate_text(config(labels_file, tmp_path / "run", per_label=6))
    assert part_bytes(tmp_path / "run") == before


def generate_cli(labels_file: Path, run_dir: Path, *extra: str):
    return CliRunner().invoke(cli.app, ["generate-text", "--labels", str(labels_file), "--run-dir", str(run_dir),
                                        *extra])


def caption_hashes(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run_dir / "captions").rglob("*")) if p.is_file()}


def reworded(labels: list[str], seed: int) -> str:
    return json.dumps({"caption": f"Someone painted {' and '.join(labels)}, version {seed}."})


def test_a_killed_force_attempt_is_never_resumed_as_a_top_up_of_the_pool(tmp_path, labels_file, use_backend):
    run = tmp_path / "run"
    use_backend(ScriptedBackend(faithful))
    assert generate_cli(labels_file, run, "--per-label", "2", "--part-size", "1").exit_code == 0
    rows, before = rows_by_id(run), caption_hashes(run)
    use_backend(ScriptedBackend(reworded, interrupt_at=3))  # the forced rebuild's parts share the pool's names
    killed = generate_cli(labels_file, run, "--per-label", "2", "--part-size", "1", "--force")
    assert killed.exit_code == 130 and caption_hashes(run) == before
    use_backend(ScriptedBackend(faithful))
    plain = generate_cli(labels_file, run, "--per-label", "2", "--part-size", "1")
    assert plain.exit_code == 0 and "skipped" in plain.output and not (run / ".staging" / "generate_text").exists()
    top_up = generate_cli(labels_file, run, "--per-label", "4", "--part-size", "1")
    assert top_up.exit_code == 0 and "Traceback" not in top_up.output
    after = caption_hashes(run)
    assert {k: after[k] for k in before} == before and {k: rows_by_id(run)[k] for k in rows} == rows
    assert "Someone painted" not in json.dumps(read_captions(run))


def rewrite_one_caption(path: Path) -> None:
    """An edit that keeps the part's metadata (pyarrow round trip)."""
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["text"] = "An edited caption of a dog."
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)


def rewrite_without_metadata(path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(pq.read_table(path).to_pylist(), schema=stage.CAPTION_SCHEMA), path)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("edit", [rewrite_one_caption, rewrite_without_metadata, truncate], ids=lambda f: f.__name__)
def test_an_edited_part_of_the_pool_is_damage_named_with_a_repair_that_keeps_the_pool(tmp_path, labels_file,
                                                                                      use_backend, edit):
    run = tmp_path / "run"
    use_backend(ScriptedBackend(faithful))
    assert generate_cli(labels_file, run, "--per-label", "2", "--part-size", "4").exit_code == 0
    recorded = json.loads((run / "manifest.json").read_text())["stages"]["generate_text"]["outputs"]
    victim = run / "captions" / "part-00001.parquet"
    edit(victim)
    before, backend = caption_hashes(run), use_backend(ScriptedBackend(faithful))
    result = generate_cli(labels_file, run, "--per-label", "2", "--part-size", "4")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert f"{victim} is not the part generate-text wrote" in " ".join(result.output.split())
    assert "delete it and run the same command again" in " ".join(result.output.split())
    assert caption_hashes(run) == before and backend.answers == []
    assert json.loads((run / "manifest.json").read_text())["stages"]["generate_text"]["outputs"] == recorded
    victim.unlink()  # the repair the message names: only that part's captions are made again
    assert generate_cli(labels_file, run, "--per-label", "2", "--part-size", "4").exit_code == 0
    after = caption_hashes(run)
    assert {k: after[k] for k in before if k != "captions/part-00001.parquet"} == \
        {k: v for k, v in before.items() if k != "captions/part-00001.parquet"}
    assert min(Counter(label for row in read_captions(run) for label in row["labels"]).values()) >= 2


def test_a_part_merged_from_another_shard_and_then_edited_is_named_as_damage(tmp_path, labels_file, use_backend):
    two_shards_merged_into_shard0(tmp_path, labels_file, use_backend)
    victim = sorted((tmp_path / "shard1" / "captions").glob("part-*.parquet"))[0].name
    rewrite_one_caption(tmp_path / "shard0" / "captions" / victim)
    before = caption_hashes(tmp_path / "shard0")
    result = generate_cli(labels_file, tmp_path / "shard0", "--per-label", "3", "--part-size", "4")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert f"{tmp_path / 'shard0' / 'captions' / victim} was edited after generate-text wrote it" in \
        " ".join(result.output.split())
    assert caption_hashes(tmp_path / "shard0") == before


@pytest.mark.parametrize("engine, threads, expected", [("local", None, 3), ("local", 2, 2), ("ray", None, 1),
                                                     ("ray", 5, 5)])
def test_llama_cpp_threads_default_to_the_cores_but_to_one_per_ray_actor(tmp_path, labels_file, use_backend,
                                                                          monkeypatch, engine, threads, expected):
    """With 3 cores: the local engine's backend takes them all unless told; a Ray actor holds one CPU of Ray's, so
    it takes one (and may be told more than the driver has: the actor's machine is another)."""
    import inspect
    import os

    from ovml.pipeline.engine import LocalEngine

    opened = []

    class RecordingEngine(LocalEngine):
        def map(self, worker, args, items, **kwargs):
            opened.append(inspect.signature(worker).bind(*args).arguments["threads"])
            return super().map(worker, args, items, **kwargs)

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr(stage, "open_engine", lambda *args, **kwargs: RecordingEngine())
    monkeypatch.setattr(stage, "check_engine", lambda name: None)  # no Ray needed to record what an actor gets
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run", engine=engine, threads=threads))
    assert opened and set(opened) == {expected}


def test_more_threads_than_cores_fails_before_the_stage_starts_leaving_the_pool_intact(tmp_path, labels_file,
                                                                                      use_backend):
    use_backend(ScriptedBackend(faithful))
    stage.generate_text(config(labels_file, tmp_path / "run"))
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    result = CliRunner().invoke(cli.app, ["generate-text", "--run-dir", str(tmp_path / "run"), "--labels",
                                          str(labels_file), "--per-label", "5", "--threads", "10000"])
    assert result.exit_code == 2 and "use --threads" in result.output and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
